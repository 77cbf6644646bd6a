"""In-memory image-classification data for the training program.

A dataset is an :class:`ArrayDataset` of NHWC float32 images (already normalised) and int32
labels. Training batches are a pure function of ``(seed, step)``: the order of an epoch is a
permutation drawn from ``(seed, epoch)`` and the augmentation from ``(seed, step)``, so a
resumed run reads exactly the batches an uninterrupted run would, without replaying the ones
already consumed. Evaluation batches are padded to a fixed size with a mask, so every batch
has the same shape (one compilation) and divides over the devices.

Sources:

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (they ship inside the wheel),
  bilinearly upsampled, with a fixed stratified train/validation split.
- ``synthetic``: random images and labels of any size, for tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ("digits", "synthetic")


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Images ``(N, H, W, C)`` float32 (normalised) and labels ``(N,)`` int32 per split."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_labels)


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, h, w)`` images to ``(N, size, size)``."""
    out = jax.image.resize(
        jnp.asarray(images, jnp.float32), (len(images), size, size), method="bilinear"
    )
    return np.asarray(out)


def load_digits(*, image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's digits, upsampled to ``image_size`` and split by class (stratified).

    Pixel values 0..16 are scaled to [0, 1], then normalised with the training split's mean
    and standard deviation. One channel.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8:
        raise ValueError(f"data.image_size must be at least 8 for digits, got {image_size}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    digits = sklearn_digits()
    images = _upsample(digits.images / 16.0, image_size)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=split_seed
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).astype(np.float32)
    return ArrayDataset(
        name="digits",
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        val_images=images[val_idx],
        val_labels=labels[val_idx],
        num_classes=10,
    )


def synthetic(
    *,
    image_size: int,
    num_classes: int,
    num_train: int = 64,
    num_val: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ArrayDataset:
    """Random normal images and uniform labels: a stand-in with the shapes of real data."""
    rng = np.random.default_rng(seed)

    def split(n):
        images = rng.normal(size=(n, image_size, image_size, channels)).astype(np.float32)
        return images, rng.integers(0, num_classes, size=n).astype(np.int32)

    train_images, train_labels = split(num_train)
    val_images, val_labels = split(num_val)
    return ArrayDataset(
        "synthetic", train_images, train_labels, val_images, val_labels, num_classes
    )


def load_dataset(data_config) -> ArrayDataset:
    """The dataset named by ``config.data.name`` (see ``SOURCES``)."""
    name = data_config.name
    if name == "digits":
        return load_digits(
            image_size=data_config.image_size,
            val_fraction=data_config.val_fraction,
            split_seed=data_config.split_seed,
        )
    if name == "synthetic":
        return synthetic(
            image_size=data_config.image_size,
            num_classes=data_config.num_classes,
            num_train=data_config.get("num_train", 64),
            num_val=data_config.get("num_val", 32),
            channels=data_config.get("channels", 3),
            seed=data_config.split_seed,
        )
    raise ValueError(
        f"data.name must be one of {', '.join(SOURCES)}, got {name!r} "
        "(ImageNet-scale input pipelines are not part of this version yet)."
    )


def steps_per_epoch(dataset: ArrayDataset, batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped)."""
    steps = dataset.num_train // batch_size
    if steps < 1:
        raise ValueError(
            f"data.batch_size {batch_size} is larger than the {dataset.num_train} training images."
        )
    return steps


def _shift(images: np.ndarray, rng: np.random.Generator, max_shift: int, flip: bool):
    """Random translations by up to ``max_shift`` pixels (zero fill) and optional h-flips."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if flip:
        mirror = rng.random(n) < 0.5
        out[mirror] = out[mirror, :, ::-1]
    return out


def train_batch(
    dataset: ArrayDataset,
    step: int,
    *,
    batch_size: int,
    seed: int,
    max_shift: int = 0,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of global step ``step`` (0-based): ``(images, labels)``.

    Depends only on its arguments, so any step can be produced directly (resumption).
    """
    per_epoch = steps_per_epoch(dataset, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(dataset.num_train)
    idx = order[index * batch_size : (index + 1) * batch_size]
    images = dataset.train_images[idx]
    if max_shift or flip:
        images = _shift(images, np.random.default_rng([seed, epoch, index, 1]), max_shift, flip)
    return images, dataset.train_labels[idx]


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed-size batches ``(images, labels, mask)``; the last is zero-padded, mask marks real rows."""
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        mask = np.ones(len(y), np.float32)
        pad = batch_size - len(y)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        yield x, y, mask
