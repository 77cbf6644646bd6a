"""Training images kept on the devices, and batches gathered there from a plan.

With ``train.steps_per_call`` > 1 (:mod:`oscqat_jax.training.calls`) an in-memory source
(:class:`~oscqat_jax.training.data.base.ArrayDataset`: digits, synthetic, Fashion-MNIST)
whose training split takes at most ``data.resident_max_mb`` is copied once to every device.
Each step then receives only its :class:`~oscqat_jax.training.data.base.BatchPlan`, drawn on
the host from ``(seed, step)`` exactly as the host batches are (a few bytes per image), and
:func:`gather` reads and augments the images on the device: the same rows, shifts and flips,
so the same batch bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from oscqat_jax.training.data.base import ArrayDataset, BatchPlan


def nbytes(dataset: ArrayDataset) -> int:
    """Bytes of the training images and labels (one device's copy)."""
    return dataset.train_images.nbytes + dataset.train_labels.nbytes


def fits(source, max_mb: int) -> bool:
    """Whether ``source`` is in memory and its training split at most ``max_mb`` MiB."""
    return isinstance(source, ArrayDataset) and nbytes(source) <= max_mb * 2**20


def put(dataset: ArrayDataset, sharding: Sharding) -> dict[str, jax.Array]:
    """The training split as device arrays with ``sharding`` (replicated: each device holds
    all of it): ``images`` ``(N, H, W, C)`` float32 and ``labels`` ``(N,)`` int32."""

    def place(array: np.ndarray) -> jax.Array:
        # Every process holds the whole split, so each fills its own devices' copies.
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return {"images": place(dataset.train_images), "labels": place(dataset.train_labels)}


def plan_arrays(plan: BatchPlan) -> dict[str, np.ndarray]:
    """A plan as the arrays :func:`gather` takes (int32 indices and offsets, bool flips)."""
    return {
        "indices": plan.indices.astype(np.int32),
        "dy": plan.dy.astype(np.int32),
        "dx": plan.dx.astype(np.int32),
        "mirror": plan.mirror.astype(bool),
    }


def gather(
    data: dict[str, jax.Array], plan: dict[str, jax.Array], *, max_shift: int, flip: bool
) -> tuple[jax.Array, jax.Array]:
    """The batch ``(images (B, H, W, C), labels (B,))`` of ``plan`` (:func:`plan_arrays`)
    from the resident ``data`` (:func:`put`): the host's ``train_batch`` on the device,
    translations with zero fill and horizontal flips included."""
    images = data["images"][plan["indices"]]
    labels = data["labels"][plan["indices"]]
    if max_shift or flip:
        _, h, w, c = images.shape
        m = max_shift
        padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))

        def crop(image, dy, dx):
            return jax.lax.dynamic_slice(image, (dy, dx, 0), (h, w, c))

        images = jax.vmap(crop)(padded, plan["dy"], plan["dx"])
        images = jnp.where(plan["mirror"][:, None, None, None], images[:, :, ::-1], images)
    return images, labels
