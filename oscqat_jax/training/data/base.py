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
    order = epoch_order(num_records, epoch, seed)
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

    def train_plans(
        self, start_step, *, batch_size, seed, process_index=0, process_count=1
    ) -> Iterator[BatchPlan]:
        """The :class:`BatchPlan` of this process's rows of each step's global batch from
        ``start_step`` on: what :meth:`train_batches` reads, for a copy of the images kept
        elsewhere (on the devices, :mod:`.resident`)."""
        rows = local_rows(batch_size, process_index, process_count)
        per_epoch = steps_per_epoch(self, batch_size)
        step, epoch, order = start_step, None, None
        while True:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                order = epoch_order(self.num_train, epoch, seed)
            plan = batch_plan(
                self.num_train,
                step,
                batch_size=batch_size,
                seed=seed,
                max_shift=self.max_shift,
                flip=self.flip,
                order=order,
            )
            yield plan.rows(rows)
            step += 1

    def eval_batches(self, *, batch_size, process_index=0, process_count=1):
        rows = local_rows(batch_size, process_index, process_count)
        for batch in eval_batches(self.val_images, self.val_labels, batch_size):
            yield tuple(b[rows.start : rows.stop] for b in batch)

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What the training batch of one step reads from an :class:`ArrayDataset` and how it
    is augmented, one entry per row: the record ``indices``, the shift draws ``dy``/``dx``
    (offsets into the image zero-padded by ``max_shift``, ``0 .. 2 * max_shift``) and
    ``mirror`` (flipped or not). A few bytes per row, so the images can be gathered wherever
    they are kept (the host, or the devices: :mod:`.resident`)."""

    indices: np.ndarray  # (B,) record indices
    dy: np.ndarray  # (B,) int32
    dx: np.ndarray  # (B,) int32
    mirror: np.ndarray  # (B,) bool

    def rows(self, rows: range) -> BatchPlan:
        """The plan of the rows ``rows`` of the batch (a process's part)."""
        return BatchPlan(*(a[rows.start : rows.stop] for a in dataclasses.astuple(self)))


def _augmentation_draws(rng: np.random.Generator, n: int, max_shift: int, flip: bool):
    """``(dy, dx, mirror)`` of ``n`` images, drawn in this order from ``rng``."""
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    mirror = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    return dy.astype(np.int32), dx.astype(np.int32), mirror


def epoch_order(num_records: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of the records that epoch ``epoch`` reads (see :func:`epoch_indices`)."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batch_plan(
    num_records: int,
    step: int,
    *,
    batch_size: int,
    seed: int,
    max_shift: int = 0,
    flip: bool = False,
    order: np.ndarray | None = None,
) -> BatchPlan:
    """The :class:`BatchPlan` of the global batch of ``step`` (0-based): the records of
    :func:`epoch_indices` and the augmentation drawn from ``(seed, epoch, index)``.

    ``order``: the step's epoch permutation (:func:`epoch_order`) when the caller holds it,
    so that the steps of one epoch draw it once.
    """
    per_epoch = num_records // batch_size
    if order is None:
        indices = epoch_indices(num_records, step, batch_size, seed)
    else:
        index = step % per_epoch
        indices = order[index * batch_size : (index + 1) * batch_size]
    n = len(indices)
    if max_shift or flip:
        epoch, index = divmod(step, per_epoch)
        rng = np.random.default_rng([seed, epoch, index, 1])
        dy, dx, mirror = _augmentation_draws(rng, n, max_shift, flip)
    else:
        dy = dx = np.zeros(n, np.int32)
        mirror = np.zeros(n, bool)
    return BatchPlan(indices, dy, dx, mirror)


def _shift(images: np.ndarray, plan: BatchPlan, max_shift: int) -> np.ndarray:
    """The plan's translations (zero fill) and horizontal flips of ``images``."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = plan.dy, plan.dx
    out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[plan.mirror] = out[plan.mirror, :, ::-1]
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
    plan = batch_plan(
        dataset.num_train, step, batch_size=batch_size, seed=seed, max_shift=max_shift, flip=flip
    )
    images = dataset.train_images[plan.indices]
    if max_shift or flip:
        images = _shift(images, plan, max_shift)
    return images, dataset.train_labels[plan.indices]


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
