"""Image-classification datasets prepared by tensorflow-datasets (features ``image`` and
``label``), and the one probe of the file format a tfds dataset is prepared in.

array_record files are read with random access on grain (:mod:`.files`) without TensorFlow;
tfrecord files are read with ``tf.data`` in blocks of shards (:mod:`.tfrecord`). Images are
left encoded by tfds and decoded by :mod:`.transforms`, as the folder's are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from oscqat_jax.training.data.files import RandomAccessSource
from oscqat_jax.training.data.tfrecord import TFRecordSource, TFRecordSplit
from oscqat_jax.training.data.transforms import Transform

FORMATS = ("auto", "array_record", "tfrecord")
TFRECORD_SHARDS_PER_BLOCK = 4  # tfrecord order: shards shuffled together (memory: one block)


def prepared_format(builder) -> str:
    """The file format ``builder``'s dataset is prepared in (e.g. ``array_record``)."""
    # Datasets prepared before tfds recorded a file format are tfrecord files.
    return builder.info.file_format.value if builder.info.file_format else "tfrecord"


def require_tensorflow(message: str) -> None:
    """Raises ``ImportError(message)`` unless TensorFlow (which reads tfrecord files) imports."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ImportError(message) from None


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
    prepared = prepared_format(builder)
    available = sorted({prepared} | {f.value for f in builder.info.available_file_formats()})
    if requested == "auto":
        return prepared
    if requested not in available:
        raise ValueError(
            f"data.tfds_format = {requested!r}, but {builder.name} in {builder.data_dir} is "
            f"prepared as {', '.join(available)} files: use 'auto' or one of those."
        )
    return requested


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
    require_tensorflow(
        f"{builder.name} in {builder.data_dir} is stored as tfrecord files, which are read "
        "with TensorFlow: install tensorflow-cpu, or prepare the dataset as array_record."
    )
    # A training batch can straddle two blocks; evaluation reads the files in order.
    return TFRecordSource(
        name,
        TFRecordSplit(builder, data_config.train_split, cache_shards=2 * shards_per_block),
        TFRecordSplit(builder, data_config.val_split, cache_shards=1),
        shards_per_block=shards_per_block,
        prefetch=int(data_config.prefetch),
        **common,
    )
