"""tfds datasets stored as tfrecord files, read with ``tf.data`` (built by :func:`.tfds.tfds_source`).

tfrecord files have no random access. The epoch order is built from the split's files (its
file instructions, one per shard): epoch ``e`` permutes the shards with ``(seed, e)``, groups
consecutive shards into blocks of ``shards_per_block``, and permutes the records of block ``b``
with ``(seed, e, b)``; the epoch reads the blocks one after the other. Step ``k`` reads
positions ``[i * B, (i + 1) * B)`` of epoch ``k // steps_per_epoch``
(``i = k % steps_per_epoch``), so a resumed run re-reads at most the part of one block before
its first position, and memory holds at most two blocks (tfds already spreads the examples
over the shards by a hash of their keys, so a block is a random sample of the split). A
background thread reads the shards; decoding runs in ``max(1, data.num_workers)`` threads
(Pillow releases the GIL while decoding and resizing).

Every process reads the whole split, but decodes only its own rows of each global batch. Rows
are decoded, augmented and skipped on failure as on the other file sources (:mod:`.files`).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import numpy as np

from oscqat_jax.training.data.base import local_rows, steps_per_epoch
from oscqat_jax.training.data.files import FileSource, eval_rows, train_rows
from oscqat_jax.training.data.transforms import Transform


class TFRecordSplit:
    """A tfds split stored as tfrecord files, read shard by shard (one file instruction each)
    with ``tf.data``; record ``r`` is the ``r``-th of the split in file order."""

    def __init__(self, builder, split: str, *, cache_shards: int):
        info = builder.info.splits[split]
        self.description = f"{builder.name}/{split}"
        self.instructions = list(info.file_instructions)
        lengths = [instruction.take for instruction in self.instructions]
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._features = builder.info.features
        self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._cache_shards = cache_shards
        # Training and BN re-estimation streams of one run may read at the same time.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.instructions)

    def shard_of(self, record: int) -> int:
        return int(np.searchsorted(self.starts, record, side="right")) - 1

    def describe(self, record: int) -> str:
        shard = self.shard_of(record)
        offset = record - self.starts[shard] + self.instructions[shard].skip
        return f"{self.description} record {record} ({self.instructions[shard].filename} #{offset})"

    def _read_shard(self, shard: int) -> list[tuple[bytes, int]]:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        instruction = self.instructions[shard]
        serialized = (
            tf.data.TFRecordDataset(instruction.filename)
            .skip(instruction.skip)
            .take(instruction.take)
        )
        # Parsed in NumPy: a tf.data map would be traced again for every shard.
        skip = {"image": tfds.decode.SkipDecoding()}
        parse = functools.partial(self._features.deserialize_example_np, decoders=skip)
        examples = map(parse, serialized.as_numpy_iterator())
        return [(ex["image"], int(ex["label"])) for ex in examples]

    def read_many(self, records: Sequence[int]) -> dict[int, tuple[bytes, int]]:
        """Records by index: each shard they need is read once (or found among the last
        ``cache_shards`` read)."""
        shard_of = {int(r): self.shard_of(r) for r in records}
        shards = {}
        with self._lock:
            for shard in sorted(set(shard_of.values())):
                if shard not in self._cache:
                    self._cache[shard] = self._read_shard(shard)
                self._cache.move_to_end(shard)
                shards[shard] = self._cache[shard]
            while len(self._cache) > self._cache_shards:
                self._cache.popitem(last=False)
        return {r: shards[s][r - self.starts[s]] for r, s in shard_of.items()}

    def epoch_order(self, seed: int, epoch: int, shards_per_block: int) -> np.ndarray:
        """The records of epoch ``epoch`` in reading order (see the module docstring)."""
        shards = np.random.default_rng([seed, epoch]).permutation(self.num_shards)
        blocks = []
        for b, first in enumerate(range(0, self.num_shards, shards_per_block)):
            block = np.concatenate(
                [
                    np.arange(self.starts[s], self.starts[s + 1])
                    for s in shards[first : first + shards_per_block]
                ]
            )
            blocks.append(block[np.random.default_rng([seed, epoch, b]).permutation(len(block))])
        return np.concatenate(blocks)


class TFRecordSource(FileSource):
    """A :class:`~oscqat_jax.training.data.base.Source` over tfds tfrecord files: read in blocks
    of shards in a background thread, decoded by ``num_workers`` threads (at least one),
    ``prefetch`` batches ahead (at least one)."""

    def __init__(
        self,
        name: str,
        train: TFRecordSplit,
        val: TFRecordSplit,
        *,
        num_classes: int,
        transform: Transform,
        num_workers: int,
        prefetch: int,
        shards_per_block: int,
    ):
        super().__init__(
            name,
            train,
            val,
            num_classes=num_classes,
            transform=transform,
            num_workers=max(1, num_workers),
            prefetch=max(1, prefetch),
        )
        self._shards_per_block = shards_per_block

    def _run(self, jobs: Iterator[Callable[[], list]], split: str, keys: tuple[str, ...]):
        """Runs ``jobs`` (each: read the records of one batch, return its row decoders) in a
        background thread and the row decoders on a thread pool; yields batches in order."""
        pool = futures.ThreadPoolExecutor(self._num_workers, thread_name_prefix="decode")
        pending: queue.Queue = queue.Queue(self._prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    pending.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for job in jobs:
                    if not put([pool.submit(row) for row in job()]):
                        return
                put(None)
            except Exception as error:  # handed to the consumer, which raises it
                put(error)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            while (rows := pending.get()) is not None:
                if isinstance(rows, Exception):
                    raise rows
                batch = [row.result() for row in rows]
                self._failures[split].add(np.concatenate([b["failed"] for b in batch]))
                yield tuple(np.concatenate([b[k] for b in batch]) for k in keys)
        finally:
            stop.set()
            producer.join()
            pool.shutdown(cancel_futures=True)

    def train_batches(self, start_step, *, batch_size, seed, process_index=0, process_count=1):
        per_epoch = steps_per_epoch(self, batch_size)
        rows = local_rows(batch_size, process_index, process_count)

        def jobs():
            order, order_epoch = None, None
            step = start_step
            while True:
                epoch, index = divmod(step, per_epoch)
                if epoch != order_epoch:
                    order = self._train.epoch_order(seed, epoch, self._shards_per_block)
                    order_epoch = epoch
                records = order[index * batch_size : (index + 1) * batch_size]
                yield functools.partial(self._train_decoders, records, step, seed, rows)
                step += 1

        return self._streams.track(self._run(jobs(), "train", ("images", "labels")))

    def _train_decoders(self, records, step, seed, rows):
        raw = self._train.read_many(records)
        return [
            functools.partial(
                train_rows,
                records,
                raw.__getitem__,
                step=step,
                seed=seed,
                rows=range(j, j + 1),
                transform=self._transform,
            )
            for j in rows
        ]

    def eval_batches(self, *, batch_size, process_index=0, process_count=1):
        rows = local_rows(batch_size, process_index, process_count)

        def jobs():
            for first in range(0, self.num_val, batch_size):
                yield functools.partial(self._eval_decoders, first, batch_size, rows)

        return self._streams.track(self._run(jobs(), "val", ("images", "labels", "mask")))

    def _eval_decoders(self, first, batch_size, rows):
        needed = [first + j for j in rows if first + j < self.num_val]
        raw = self._val.read_many(needed)
        return [
            functools.partial(
                eval_rows,
                raw.__getitem__,
                first=first,
                num_records=self.num_val,
                rows=range(j, j + 1),
                transform=self._transform,
            )
            for j in rows
        ]
