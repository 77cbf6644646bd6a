"""What every data source shares: the :class:`Source` interface, the rows a process feeds, the
order of an epoch, and :class:`ArrayDataset`, the in-memory source.

Training batches are a pure function of ``(seed, step)``: the order of an epoch is a
permutation drawn from ``(seed, epoch)`` and the augmentation from ``(seed, step)``, so a
resumed run reads exactly the batches an uninterrupted run would, without replaying the ones
already consumed. Evaluation batches are padded to a fixed size with a mask, so every batch
has the same shape (one compilation) and divides over the devices.

An :class:`ArrayDataset` holds NHWC float32 images (already normalised) and int32 labels; its
training batches may be shifted by a few pixels and mirrored (``data.max_shift``,
``data.flip``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np


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


def local_rows(batch_size: int, process_index: int, process_count: int) -> range:
    """The rows ``[p * n, (p + 1) * n)``, ``n = batch_size // process_count``, of a global batch
    that process ``p = process_index`` feeds."""
    if batch_size % process_count:
        raise ValueError(
            f"The batch size {batch_size} does not divide over {process_count} processes."
        )
    n = batch_size // process_count
    return range(process_index * n, (process_index + 1) * n)


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
        rows = local_rows(batch_size, process_index, process_count)
        step = start_step
        while True:
            batch = train_batch(
                self,
                step,
                batch_size=batch_size,
                seed=seed,
                max_shift=self.max_shift,
                flip=self.flip,
            )
            yield tuple(b[rows.start : rows.stop] for b in batch)
            step += 1

    def eval_batches(self, *, batch_size, process_index=0, process_count=1):
        rows = local_rows(batch_size, process_index, process_count)
        for batch in eval_batches(self.val_images, self.val_labels, batch_size):
            yield tuple(b[rows.start : rows.stop] for b in batch)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


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
