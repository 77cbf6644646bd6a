"""Image-classification data for the training program.

Every source the trainer reads implements :class:`Source`: training batches are a pure
function of ``(seed, step)``, read as the rows this process feeds, from any start step;
evaluation batches have a fixed size and a mask. In-memory sources are
:class:`ArrayDataset` s of NHWC float32 images (already normalised) and int32 labels; the
file-based pipelines (an ImageNet-style folder, datasets prepared by tensorflow-datasets)
live in :mod:`oscqat_jax.training.pipelines`. Training batches are a pure function of ``(seed, step)``: the order of an epoch is a
permutation drawn from ``(seed, epoch)`` and the augmentation from ``(seed, step)``, so a
resumed run reads exactly the batches an uninterrupted run would, without replaying the ones
already consumed. Evaluation batches are padded to a fixed size with a mask, so every batch
has the same shape (one compilation) and divides over the devices.

Sources:

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (they ship inside the wheel),
  bilinearly upsampled, with a fixed stratified train/validation split.
- ``synthetic``: random images and labels of any size, for tests and benchmarks.
- ``fashion_mnist``: the 70,000 Fashion-MNIST images (see :mod:`.fashion_mnist`).
- ``imagenet_folder`` and ``tfds``: streaming pipelines (see :mod:`.pipelines`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ("digits", "synthetic", "fashion_mnist", "imagenet_folder", "tfds")


class Source(Protocol):
    """What the trainer needs of a data source.

    ``train_batches`` yields, for global steps ``start_step, start_step + 1, ...`` (without
    end: epochs follow each other), the rows ``[p * n, (p + 1) * n)`` of each global batch of
    ``batch_size`` rows, where ``p = process_index`` and ``n = batch_size // process_count``.
    The global batch of a step is a pure function of ``(seed, step)`` and the data, so a run
    resumed at ``start_step`` reads what an uninterrupted run would, without reading the
    earlier steps, and the hosts of a multi-host run read disjoint rows.
    ``eval_batches`` yields this process's rows of fixed-size global batches
    ``(images, labels, mask)`` over the whole validation split (mask 0 marks padding).
    ``stats`` returns counters for the metrics (e.g. ``decode_failures``).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_val: int

    def train_batches(
        self,
        start_step: int,
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def eval_batches(
        self, *, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def local_rows(array: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Rows ``[p * n, (p + 1) * n)`` of a global batch, ``n = len(array) // process_count``."""
    n = len(array) // process_count
    return array[process_index * n : (process_index + 1) * n]


def steps_per_epoch(source, batch_size: int) -> int:
    """Full training batches per epoch (the last partial batch is dropped)."""
    steps = source.num_train // batch_size
    if steps < 1:
        raise ValueError(
            f"data.batch_size {batch_size} is larger than the {source.num_train} training images."
        )
    return steps


def epoch_indices(num_records: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Record indices of the global batch of ``step``: epoch ``e`` reads the permutation drawn
    from ``(seed, e)`` in consecutive slices of ``batch_size`` (the remainder is dropped)."""
    per_epoch = num_records // batch_size
    if per_epoch < 1:
        raise ValueError(
            f"data.batch_size {batch_size} is larger than the {num_records} training images."
        )
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_records)
    return order[index * batch_size : (index + 1) * batch_size]


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

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    # Augmentation of the training batches (set by ``load_dataset`` from the config).
    max_shift: int = 0
    flip: bool = False

    def train_batches(
        self, start_step, *, batch_size, seed, process_index=0, process_count=1
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = start_step
        while True:
            images, labels = train_batch(
                self,
                step,
                batch_size=batch_size,
                seed=seed,
                max_shift=self.max_shift,
                flip=self.flip,
            )
            yield (
                local_rows(images, process_index, process_count),
                local_rows(labels, process_index, process_count),
            )
            step += 1

    def eval_batches(self, *, batch_size, process_index=0, process_count=1):
        for batch in eval_batches(self.val_images, self.val_labels, batch_size):
            yield tuple(local_rows(b, process_index, process_count) for b in batch)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


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


def load_dataset(data_config) -> Source:
    """The source named by ``config.data.name`` (see ``SOURCES``)."""
    name = data_config.name
    if name == "digits":
        dataset = load_digits(
            image_size=data_config.image_size,
            val_fraction=data_config.val_fraction,
            split_seed=data_config.split_seed,
        )
    elif name == "synthetic":
        dataset = synthetic(
            image_size=data_config.image_size,
            num_classes=data_config.num_classes,
            num_train=data_config.get("num_train", 64),
            num_val=data_config.get("num_val", 32),
            channels=data_config.get("channels", 3),
            seed=data_config.split_seed,
        )
    elif name == "fashion_mnist":
        from oscqat_jax.training import fashion_mnist

        dataset = fashion_mnist.load(data_config)
    elif name == "imagenet_folder":
        from oscqat_jax.training import pipelines

        return pipelines.imagenet_folder(data_config)
    elif name == "tfds":
        from oscqat_jax.training import pipelines

        return pipelines.tfds_source(data_config)
    else:
        raise ValueError(
            f"config.data.name = {name!r} is not valid: use one of {', '.join(SOURCES)}."
        )
    return dataclasses.replace(
        dataset, max_shift=data_config.max_shift, flip=bool(data_config.flip)
    )


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
    idx = epoch_indices(dataset.num_train, step, batch_size, seed)
    epoch, index = divmod(step, dataset.num_train // batch_size)
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
