"""What the file-based sources (:mod:`.folder`, :mod:`.tfds`) share: decoded rows of a global
batch, decode-failure counts, their streams, and the grain pipeline of random-access records.

Determinism and resumption. The global batch of training step ``k`` is a pure function of
``(seed, k)`` and the data, and so is its augmentation: row ``j`` of the global batch draws its
crop and flip from ``numpy.random.default_rng([seed, k, j])``. A run that starts at step ``k``
therefore reads what an uninterrupted run reads at step ``k``, without touching earlier
steps, and the batches do not depend on the number of decoding workers or of processes.

Random-access sources (the folder, and tfds datasets stored as array_record files) read the
records ``base.epoch_indices(num_train, k, batch_size, seed)``: epoch ``e`` is the permutation
drawn from ``(seed, e)``. They run on grain: one element per step, decoded by
``data.num_workers`` worker processes (0: in the main process); grain hands the elements back
in step order whatever the number of workers. Workers are spawned (each imports this package,
a second or two) by every ``train_batches`` / ``eval_batches`` call, so a stream is meant to be
opened once per phase or evaluation and iterated. (tfds tfrecord files, which have no random
access, are read by :mod:`.tfrecord`.)

Sharding over processes. Process ``p`` of ``P`` decodes only rows ``[p * n, (p + 1) * n)``,
``n = batch_size // P``, of each global batch (evaluation included; see
:func:`.base.local_rows`).

Images that fail to decode (or to be read) are skipped: in training, the row takes the next
record of the same global batch (cyclically) that decodes, with its own label and the row's
augmentation; in evaluation, the row is masked out. Each failure is counted in
``stats()["decode_failures"]`` (a failure met twice counts twice) and the first few are logged
with their file or record. Workers return the failed record indices with each batch, so the
counts are exact whatever process decoded them.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from oscqat_jax.training.data.base import epoch_indices, local_rows, steps_per_epoch
from oscqat_jax.training.data.transforms import DECODE_ERRORS, Transform, eval_image, train_image

_LOGGED_FAILURES = 5  # failures logged by name; the rest are only counted

log = logging.getLogger(__name__)

# A record: its encoded image and its label. ``read(index)`` returns the record ``index``.
Read = Callable[[int], tuple[bytes, int]]


# --------------------------------------------------------------------------------------------
# Batches: rows of a global batch, shared by the grain and the tf.data paths.


def _train_row(
    records: Sequence[int], read: Read, position: int, rng, transform: Transform
) -> tuple[np.ndarray, int, list[int]]:
    """Row ``position`` of a global batch of ``records``: ``(image, label, failed records)``.

    A record that fails is replaced by the next one of the batch (cyclically) that decodes.
    """
    failed = []
    for offset in range(len(records)):
        record = int(records[(position + offset) % len(records)])
        try:
            encoded, label = read(record)
            return train_image(encoded, rng, transform), label, failed
        except DECODE_ERRORS:
            failed.append(record)
    raise ValueError(
        f"None of the {len(records)} images of a training batch decodes (records {failed})."
    )


def train_rows(
    records: Sequence[int],
    read: Read,
    *,
    step: int,
    seed: int,
    rows: range,
    transform: Transform,
) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the global batch of ``step`` (whose records are ``records``)."""
    decoded = [
        _train_row(records, read, j, np.random.default_rng([seed, step, j]), transform)
        for j in rows
    ]
    return {
        "images": np.stack([image for image, _, _ in decoded]),
        "labels": np.array([label for _, label, _ in decoded], np.int32),
        "failed": np.array([r for _, _, failed in decoded for r in failed], np.int64),
    }


def eval_rows(
    read: Read, *, first: int, num_records: int, rows: range, transform: Transform
) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the evaluation batch of records ``first, first + 1, ...``: rows past
    ``num_records`` (padding) and records that fail to decode have mask 0."""
    size = transform.image_size
    images = np.zeros((len(rows), size, size, 3), np.float32)
    labels = np.zeros(len(rows), np.int32)
    mask = np.zeros(len(rows), np.float32)
    failed = []
    for i, j in enumerate(rows):
        record = first + j
        if record >= num_records:
            continue
        try:
            encoded, label = read(record)
            images[i] = eval_image(encoded, transform)
        except DECODE_ERRORS:
            failed.append(record)
            continue
        labels[i], mask[i] = label, 1.0
    return {"images": images, "labels": labels, "mask": mask, "failed": np.array(failed, np.int64)}


# --------------------------------------------------------------------------------------------
# What every file-based source holds.


class _FailureLog:
    """Counts decode failures and logs the first few by name (main process only)."""

    def __init__(self, describe: Callable[[int], str]):
        self.count = 0
        self._describe = describe

    def add(self, records: np.ndarray) -> None:
        for record in records:
            self.count += 1
            if self.count <= _LOGGED_FAILURES:
                log.warning("Skipped an image that does not decode: %s", self._describe(record))
            if self.count == _LOGGED_FAILURES:
                log.warning("Further decode failures are only counted (stats: decode_failures).")


class _Streams:
    """The live iterators of a source, closed together by ``close``."""

    def __init__(self):
        self._live = weakref.WeakSet()

    def track(self, iterator: Iterator) -> Iterator:
        self._live.add(iterator)
        return iterator

    def close(self) -> None:
        for iterator in list(self._live):
            iterator.close()


class FileSource:
    """What the file-based sources share: their splits, the transform, the decode-failure
    counts of both splits and the open streams (closed by :meth:`close`)."""

    def __init__(
        self,
        name: str,
        train,
        val,
        *,
        num_classes: int,
        transform: Transform,
        num_workers: int,
        prefetch: int,
    ):
        self.name = name
        self.num_classes = num_classes
        self.image_shape = (transform.image_size, transform.image_size, 3)
        self.num_train = len(train)
        self.num_val = len(val)
        self._train, self._val = train, val
        self._transform = transform
        self._num_workers = num_workers
        self._prefetch = prefetch
        self._failures = {"train": _FailureLog(train.describe), "val": _FailureLog(val.describe)}
        self._streams = _Streams()

    def stats(self) -> dict[str, float]:
        return {"decode_failures": sum(f.count for f in self._failures.values())}

    def close(self) -> None:
        self._streams.close()


# --------------------------------------------------------------------------------------------
# Random-access sources on grain: the folder and tfds array_record files.


def _grain_train_step(step: int, *, records, batch_size, seed, rows, transform):
    indices = epoch_indices(len(records), step, batch_size, seed)
    return train_rows(indices, records.read, step=step, seed=seed, rows=rows, transform=transform)


def _grain_eval_batch(batch: int, *, records, batch_size, rows, transform):
    first = batch * batch_size
    return eval_rows(
        records.read, first=first, num_records=len(records), rows=rows, transform=transform
    )


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18 reads an absl flag when its workers start and fails if the program did not
    parse flags (a script or test without ``absl.app``; google/grain#1355): mark them parsed,
    which keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class RandomAccessSource(FileSource):
    """A :class:`~oscqat_jax.training.data.base.Source` over records with random access
    (``len``, ``read(index)``, ``describe(index)``), decoded by grain in ``num_workers``
    processes, ``prefetch`` batches ahead each (0 workers: in this process, when the batch is
    asked for)."""

    def _run(self, dataset, split: str, keys: tuple[str, ...]) -> Iterator[tuple[np.ndarray, ...]]:
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self._num_workers:
            _allow_unparsed_absl_flags()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._num_workers, per_worker_buffer_size=self._prefetch
                )
            )
        iterator = iter(dataset)
        try:
            for batch in iterator:
                self._failures[split].add(batch["failed"])
                # Plain arrays (views that keep grain's shared memory alive).
                yield tuple(np.asarray(batch[k]) for k in keys)
        finally:
            iterator.close()

    def train_batches(self, start_step, *, batch_size, seed, process_index=0, process_count=1):
        steps_per_epoch(self, batch_size)
        load = functools.partial(
            _grain_train_step,
            records=self._train,
            batch_size=batch_size,
            seed=seed,
            rows=local_rows(batch_size, process_index, process_count),
            transform=self._transform,
        )
        # Steps without end: the range only has to outlast any run.
        steps = grain.MapDataset.range(start_step, start_step + 2**62).map(load)
        return self._streams.track(self._run(steps, "train", ("images", "labels")))

    def eval_batches(self, *, batch_size, process_index=0, process_count=1):
        load = functools.partial(
            _grain_eval_batch,
            records=self._val,
            batch_size=batch_size,
            rows=local_rows(batch_size, process_index, process_count),
            transform=self._transform,
        )
        batches = grain.MapDataset.range(math.ceil(self.num_val / batch_size)).map(load)
        return self._streams.track(self._run(batches, "val", ("images", "labels", "mask")))
