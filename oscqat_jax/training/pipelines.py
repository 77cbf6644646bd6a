"""File-based input pipelines: an ImageNet-style folder and datasets prepared by tensorflow-datasets.

Both implement :class:`oscqat_jax.training.data.Source` and decode every image with the same
Pillow code and the paper's augmentation (SPEC §9): training images get torchvision's
``RandomResizedCrop(image_size, scale=(min_crop_area, 1), ratio=(3/4, 4/3))`` (with its
fallback to a centre crop after ten rejected draws) and a horizontal flip; evaluation images
are resized (shorter side to ``round(image_size * eval_resize_ratio)``) and centre-cropped.
Resizing is bilinear; the output is RGB, normalised with the ImageNet mean and standard
deviation, float32 NHWC.

Determinism and resumption. The global batch of training step ``k`` is a pure function of
``(seed, k)`` and the data, and so is its augmentation: row ``j`` of the global batch draws its
crop and flip from ``numpy.random.default_rng([seed, k, j])``. A run that starts at step ``k``
therefore reads what an uninterrupted run reads at step ``k``, without touching earlier
steps, and the batches do not depend on the number of decoding workers or of processes.

- Random-access sources (the folder, and tfds datasets stored as array_record files) read the
  records ``data.epoch_indices(num_train, k, batch_size, seed)``: epoch ``e`` is the
  permutation drawn from ``(seed, e)``. They run on grain: one element per step, decoded by
  ``data.num_workers`` worker processes (0: in the main process); grain hands the elements
  back in step order whatever the number of workers. Workers are spawned (each imports this
  package, a second or two) by every ``train_batches`` / ``eval_batches`` call, so a stream
  is meant to be opened once per phase or evaluation and iterated.
- tfds datasets stored as tfrecord files are read with ``tf.data``, which has no random access.
  Their epoch order is built from the split's files (its file instructions, one per shard):
  epoch ``e`` permutes the shards with ``(seed, e)``, groups consecutive shards into blocks of
  ``shards_per_block``, and permutes the records of block ``b`` with ``(seed, e, b)``; the epoch
  reads the blocks one after the other. Step ``k`` reads positions ``[i * B, (i + 1) * B)`` of
  epoch ``k // steps_per_epoch`` (``i = k % steps_per_epoch``), so a resumed run re-reads at
  most the part of one block before its first position, and memory holds at most two blocks
  (tfds already spreads the examples over the shards by a hash of their keys, so a block is a
  random sample of the split). A background thread reads the shards; decoding runs in
  ``max(1, data.num_workers)`` threads (Pillow releases the GIL while decoding and resizing).

Sharding over processes. Process ``p`` of ``P`` decodes only rows ``[p * n, (p + 1) * n)``,
``n = batch_size // P``, of each global batch (evaluation included); a tfrecord split is read
in full by every process, but only its own rows are decoded.

Images that fail to decode (or to be read) are skipped: in training, the row takes the next
record of the same global batch (cyclically) that decodes, with its own label and the row's
augmentation; in evaluation, the row is masked out. Each failure is counted in
``stats()["decode_failures"]`` (a failure met twice counts twice) and the first few are logged
with their file or record. Workers return the failed record indices with each batch, so the
counts are exact whatever process decoded them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grain
import numpy as np
from PIL import Image

from oscqat_jax.training import data

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_PIXEL_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_PIXEL_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crop: range of aspect ratios (width / height)
TFRECORD_SHARDS_PER_BLOCK = 4  # tfrecord order: shards shuffled together (memory: one block)
_LOGGED_FAILURES = 5  # failures logged by name; the rest are only counted
# What Pillow raises for a file it cannot read or decode (truncated, corrupt, not an image).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

log = logging.getLogger(__name__)

# A record: its encoded image and its label. ``read(index)`` returns the record ``index``.
Read = Callable[[int], tuple[bytes, int]]


# --------------------------------------------------------------------------------------------
# Decoding and augmentation: pure functions of the encoded bytes (and a random generator).


@dataclasses.dataclass(frozen=True)
class Transform:
    """Output size ``image_size`` (pixels); training crops keep at least ``min_crop_area`` of the
    image's area; evaluation resizes the shorter side to ``eval_resize`` pixels first."""

    image_size: int
    min_crop_area: float
    eval_resize: int

    @classmethod
    def from_config(cls, data_config) -> Transform:
        size = int(data_config.image_size)
        eval_resize = round(size * data_config.eval_resize_ratio)
        if not 0.0 < data_config.min_crop_area <= 1.0:
            raise ValueError(
                f"data.min_crop_area must be in (0, 1], got {data_config.min_crop_area}."
            )
        if eval_resize < size:
            raise ValueError(
                f"data.eval_resize_ratio must be at least 1, got {data_config.eval_resize_ratio}."
            )
        return cls(size, float(data_config.min_crop_area), eval_resize)


def decode_rgb(encoded: bytes) -> Image.Image:
    """Decodes any image Pillow reads and converts it to RGB (as torchvision's loader does)."""
    with Image.open(io.BytesIO(encoded)) as image:
        return image.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, min_area: float
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(left, top, crop_width, crop_height)``.

    Ten draws of an area fraction in ``[min_area, 1]`` and a log-uniform aspect ratio in
    ``CROP_RATIO``; the first that fits is placed uniformly. If none fits, a centre crop of the
    whole image, clipped to the ratio range.
    """
    area = width * height
    log_ratio = np.log(CROP_RATIO)
    for _ in range(10):
        target_area = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` to float32 ``(pixels / 255 - mean) / std`` (ImageNet's)."""
    out = pixels.astype(np.float32)
    out *= _PIXEL_SCALE  # in place: half the time of the formula's temporaries
    out -= _PIXEL_OFFSET
    return out


def train_image(encoded: bytes, rng: np.random.Generator, transform: Transform) -> np.ndarray:
    """Random-resized crop, bilinear resize to ``image_size`` and a random horizontal flip:
    float32 ``(image_size, image_size, 3)``, normalised."""
    image = decode_rgb(encoded)
    left, top, w, h = random_resized_crop_box(*image.size, rng, transform.min_crop_area)
    size = (transform.image_size, transform.image_size)
    crop = image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(crop)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return normalise(pixels)


def eval_image(encoded: bytes, transform: Transform) -> np.ndarray:
    """Bilinear resize of the shorter side to ``eval_resize`` (torchvision's ``Resize(int)``),
    then a centre crop of ``image_size``: float32 ``(image_size, image_size, 3)``, normalised."""
    image = decode_rgb(encoded)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = transform.eval_resize, int(transform.eval_resize * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    pixels = np.asarray(image.resize(new_size, Image.Resampling.BILINEAR))
    size = transform.image_size
    top = int(round((new_size[1] - size) / 2.0))
    left = int(round((new_size[0] - size) / 2.0))
    return normalise(pixels[top : top + size, left : left + size])


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
        except _DECODE_ERRORS:
            failed.append(record)
    raise ValueError(
        f"None of the {len(records)} images of a training batch decodes (records {failed})."
    )


def _train_batch(
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


def _eval_batch(
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
        except _DECODE_ERRORS:
            failed.append(record)
            continue
        labels[i], mask[i] = label, 1.0
    return {"images": images, "labels": labels, "mask": mask, "failed": np.array(failed, np.int64)}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> range:
    if batch_size % process_count:
        raise ValueError(
            f"The batch size {batch_size} does not divide over {process_count} processes."
        )
    n = batch_size // process_count
    return range(process_index * n, (process_index + 1) * n)


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


# --------------------------------------------------------------------------------------------
# Random-access sources on grain: the folder and tfds array_record files.


@dataclasses.dataclass(frozen=True)
class _FileRecords:
    """Image files under ``root`` (``paths`` relative, ``os.fsencode`` d) and their labels."""

    root: str
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> tuple[bytes, int]:
        with open(self.describe(index), "rb") as f:
            return f.read(), int(self.labels[index])

    def describe(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[index]))


@dataclasses.dataclass(frozen=True)
class _TfdsRecords:
    """A tfds random-access data source whose ``image`` feature is left encoded."""

    source: Sequence[dict]
    description: str

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> tuple[bytes, int]:
        example = self.source[index]
        return example["image"], int(example["label"])

    def describe(self, index: int) -> str:
        return f"{self.description} record {index}"


def _grain_train_step(step: int, *, records, batch_size, seed, rows, transform):
    indices = data.epoch_indices(len(records), step, batch_size, seed)
    return _train_batch(indices, records.read, step=step, seed=seed, rows=rows, transform=transform)


def _grain_eval_batch(batch: int, *, records, batch_size, rows, transform):
    first = batch * batch_size
    return _eval_batch(
        records.read, first=first, num_records=len(records), rows=rows, transform=transform
    )


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18 reads an absl flag when its workers start and fails if the program did not
    parse flags (a script or test without ``absl.app``; google/grain#1355): mark them parsed,
    which keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _FileSource:
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


class RandomAccessSource(_FileSource):
    """A :class:`~oscqat_jax.training.data.Source` over records with random access, decoded by
    grain in ``num_workers`` processes, ``prefetch`` batches ahead each (0 workers: in this
    process, when the batch is asked for)."""

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
        data.steps_per_epoch(self, batch_size)
        load = functools.partial(
            _grain_train_step,
            records=self._train,
            batch_size=batch_size,
            seed=seed,
            rows=_local_rows(batch_size, process_index, process_count),
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
            rows=_local_rows(batch_size, process_index, process_count),
            transform=self._transform,
        )
        batches = grain.MapDataset.range(math.ceil(self.num_val / batch_size)).map(load)
        return self._streams.track(self._run(batches, "val", ("images", "labels", "mask")))


# --------------------------------------------------------------------------------------------
# The ImageNet folder.


def _image_files(folder: str, extensions: frozenset[str]) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions
    )


def _scan_split(root: str, split: str, classes: Sequence[str]) -> _FileRecords:
    Image.init()
    extensions = frozenset(Image.registered_extensions())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(os.path.join(root, split, name), extensions)
        if not files:
            raise ValueError(
                f"The class folder {os.path.join(root, split, name)} holds no image files."
            )
        paths += [f"{name}/{file}" for file in files]
        labels += [label] * len(files)
    encoded = np.array([os.fsencode(path) for path in paths])  # compact to send to workers
    return _FileRecords(os.path.join(root, split), encoded, np.array(labels, np.int32))


def _class_folders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def imagenet_folder(data_config) -> RandomAccessSource:
    """``data.dir/train/<class>/*`` and ``data.dir/val/<class>/*`` (any image Pillow reads, by
    extension); the classes are the sorted training folder names. Checks the layout first."""
    root = os.path.expanduser(data_config.dir)
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(
            f"data.dir {data_config.dir!r} is not a directory: give the root holding "
            "train/<class>/* and val/<class>/*."
        )
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(
                f"data.dir {root} has no {split}/ folder: expected {split}/<class>/* images."
            )
    classes = _class_folders(os.path.join(root, "train"))
    if not classes:
        raise ValueError(f"{os.path.join(root, 'train')} holds no class folders.")
    val_classes = _class_folders(os.path.join(root, "val"))
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        raise ValueError(
            f"The class folders of {os.path.join(root, 'val')} differ from train/: "
            f"missing {missing[:5]}, not in train {extra[:5]}."
        )
    return RandomAccessSource(
        "imagenet_folder",
        _scan_split(root, "train", classes),
        _scan_split(root, "val", classes),
        num_classes=len(classes),
        transform=Transform.from_config(data_config),
        num_workers=int(data_config.num_workers),
        prefetch=int(data_config.prefetch),
    )


# --------------------------------------------------------------------------------------------
# tensorflow-datasets: array_record files (grain) or tfrecord files (tf.data).

FORMATS = ("auto", "array_record", "tfrecord")


def _tfds_builder(data_config):
    import tensorflow_datasets as tfds

    name, data_dir = data_config.tfds_name, data_config.tfds_data_dir or None
    where = data_dir or "the tfds default data_dir"
    expected = f"{name}/<version>/dataset_info.json and its record files"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"The tfds dataset {name!r} is not prepared in {where}: expected {expected}."
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"The tfds dataset {name!r} is not prepared in {where}: expected {expected} "
            f"(e.g. `tfds build {name} --data_dir=...`)."
        )
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"The tfds dataset {name!r} has features {sorted(features)}: an image "
            "classification dataset needs 'image' and 'label'."
        )
    return builder


def _tfds_format(builder, requested: str) -> str:
    if requested not in FORMATS:
        raise ValueError(f"data.tfds_format = {requested!r} is not valid: use one of {FORMATS}.")
    # Datasets prepared before tfds recorded a file format are tfrecord files.
    prepared = builder.info.file_format.value if builder.info.file_format else "tfrecord"
    available = sorted({prepared} | {f.value for f in builder.info.available_file_formats()})
    if requested == "auto":
        return prepared
    if requested not in available:
        raise ValueError(
            f"data.tfds_format = {requested!r}, but {builder.name} in {builder.data_dir} is "
            f"prepared as {', '.join(available)} files: use 'auto' or one of those."
        )
    return requested


def tfds_source(data_config):
    """The image-classification dataset ``data.tfds_name`` prepared in ``data.tfds_data_dir``
    (features ``image`` and ``label``), split ``data.train_split`` / ``data.val_split``;
    tfrecord files are ordered in blocks of ``data.tfrecord_shards_per_block`` shards."""
    import tensorflow_datasets as tfds

    shards_per_block = data_config.get("tfrecord_shards_per_block", TFRECORD_SHARDS_PER_BLOCK)
    if not isinstance(shards_per_block, int) or shards_per_block < 1:
        raise ValueError(
            f"config.data.tfrecord_shards_per_block = {shards_per_block!r} is not valid: "
            "use a positive number of shards."
        )

    builder = _tfds_builder(data_config)
    file_format = _tfds_format(builder, data_config.tfds_format)
    for field in ("train_split", "val_split"):
        try:
            builder.info.splits[data_config[field]]
        except (KeyError, ValueError):
            raise ValueError(
                f"data.{field} = {data_config[field]!r} is not a split of {builder.name}: "
                f"use one of {', '.join(builder.info.splits)} (or a slice such as 'train[:90%]')."
            ) from None
    common = dict(
        num_classes=builder.info.features["label"].num_classes,
        transform=Transform.from_config(data_config),
        num_workers=int(data_config.num_workers),
    )
    name = f"tfds:{builder.name}"
    if file_format == "array_record":
        skip = {"image": tfds.decode.SkipDecoding()}

        def records(split):
            source = builder.as_data_source(split, decoders=skip, file_format=file_format)
            return _TfdsRecords(source, f"{builder.name}/{split}")

        return RandomAccessSource(
            name,
            records(data_config.train_split),
            records(data_config.val_split),
            prefetch=int(data_config.prefetch),
            **common,
        )
    if file_format != "tfrecord":
        raise ValueError(
            f"{builder.name} in {builder.data_dir} is stored as {file_format} files: "
            "this pipeline reads array_record and tfrecord."
        )
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{builder.name} in {builder.data_dir} is stored as tfrecord files, which are read "
            "with TensorFlow: install tensorflow-cpu, or prepare the dataset as array_record."
        ) from None
    # A training batch can straddle two blocks; evaluation reads the files in order.
    return TFRecordSource(
        name,
        _TFRecordSplit(builder, data_config.train_split, cache_shards=2 * shards_per_block),
        _TFRecordSplit(builder, data_config.val_split, cache_shards=1),
        shards_per_block=shards_per_block,
        prefetch=int(data_config.prefetch),
        **common,
    )


class _TFRecordSplit:
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


class TFRecordSource(_FileSource):
    """A :class:`~oscqat_jax.training.data.Source` over tfds tfrecord files: read in blocks of
    shards in a background thread, decoded by ``num_workers`` threads (at least one),
    ``prefetch`` batches ahead (at least one)."""

    def __init__(
        self,
        name: str,
        train: _TFRecordSplit,
        val: _TFRecordSplit,
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
        per_epoch = data.steps_per_epoch(self, batch_size)
        rows = _local_rows(batch_size, process_index, process_count)

        def jobs():
            order, order_epoch = None, None
            step = start_step
            while True:
                epoch, index = divmod(step, per_epoch)
                if epoch != order_epoch:
                    order = self._train.epoch_order(seed, epoch, self._shards_per_block)
                    order_epoch = epoch
                records = order[index * batch_size : (index + 1) * batch_size]
                yield functools.partial(self._train_rows, records, step, seed, rows)
                step += 1

        return self._streams.track(self._run(jobs(), "train", ("images", "labels")))

    def _train_rows(self, records, step, seed, rows):
        raw = self._train.read_many(records)
        return [
            functools.partial(
                _train_batch,
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
        rows = _local_rows(batch_size, process_index, process_count)

        def jobs():
            for first in range(0, self.num_val, batch_size):
                yield functools.partial(self._eval_rows, first, batch_size, rows)

        return self._streams.track(self._run(jobs(), "val", ("images", "labels", "mask")))

    def _eval_rows(self, first, batch_size, rows):
        needed = [first + j for j in rows if first + j < self.num_val]
        raw = self._val.read_many(needed)
        return [
            functools.partial(
                _eval_batch,
                raw.__getitem__,
                first=first,
                num_records=self.num_val,
                rows=range(j, j + 1),
                transform=self._transform,
            )
            for j in rows
        ]
