"""Tests of the file-based sources (files.py, folder.py, tfds.py, tfrecord.py) on tiny image
folders and tfds datasets.

One set of images (JPEG and PNG, RGB, grey and RGBA, of several shapes, one corrupt file per
split) is written as an ImageNet-style folder and as a tfds dataset in both file formats, in
the folder's order, so the three sources must give identical evaluation batches.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from testkit import ROOT

from oscqat_jax.training import config as config_lib
from oscqat_jax.training.data import base, files, tfrecord, transforms
from oscqat_jax.training.data import folder as folder_lib
from oscqat_jax.training.data import tfds as tfds_lib

IMAGE_SIZE = 8
CLASSES = ("cat", "dog", "fox")
BATCH = 4
SEED = 3
TFDS_NAME = "oscqat_test_images"


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _images() -> dict[str, list[tuple[str, str, bytes]]]:
    """``split -> [(class, file name, encoded bytes)]`` in the folder's (sorted) order."""
    rng = np.random.default_rng(0)
    shapes = ((23, 31, 3), (30, 12), (17, 17, 4), (12, 40, 3))
    splits = {"train": [], "val": []}
    for split, per_class in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                shape = shapes[(c + i) % len(shapes)]
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                jpeg = i % 2 == 0 and shape[-1] != 4  # JPEG has no alpha channel
                fmt, ext = ("JPEG", "jpg") if jpeg else ("PNG", "png")
                file = f"{split}{i}{'_é' if (c, i) == (0, 1) else ''}.{ext}"  # one non-ASCII
                splits[split].append((name, file, _encode(pixels, fmt)))
    splits["train"].insert(4, ("dog", "train0_broken.jpg", b"\xff\xd8 not a jpeg"))
    splits["val"].append(("fox", "val9_broken.png", b"\x89PNG truncated"))
    for split in splits.values():
        split.sort(key=lambda item: (item[0], item[1]))
    return splits


IMAGES = _images()
NUM_TRAIN, NUM_VAL = len(IMAGES["train"]), len(IMAGES["val"])  # 10 and 7, one corrupt each
BROKEN_TRAIN = [i for i, (_, f, _) in enumerate(IMAGES["train"]) if "broken" in f]


def data_config(**fields):
    c = config_lib.base_config().data
    c.image_size = IMAGE_SIZE
    c.num_workers = 0
    c.prefetch = 2
    for key, value in fields.items():
        c[key] = value
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split, items in IMAGES.items():
        for name, file, encoded in items:
            os.makedirs(root / split / name, exist_ok=True)
            (root / split / name / file).write_bytes(encoded)
    return str(root)


def _prepare_tfds(data_dir: str, file_format: str) -> None:
    import tensorflow_datasets as tfds

    class OscqatTestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            )
            # Keeps the generation order, which is the folder's.
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples("train"),
                "val": self._generate_examples("val"),
            }

        def _generate_examples(self, split):
            for key, (name, _, encoded) in enumerate(IMAGES[split]):
                yield key, {"image": encoded, "label": CLASSES.index(name)}

    tfds.disable_progress_bar()
    # Several shards, so the tfrecord reader's blocks of shards are exercised.
    download_config = tfds.download.DownloadConfig(num_shards=3)
    OscqatTestImages(data_dir=data_dir).download_and_prepare(
        file_format=file_format, download_config=download_config
    )


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    dirs = {}
    for file_format in ("array_record", "tfrecord"):
        dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
        _prepare_tfds(dirs[file_format], file_format)
    return dirs


def tfds_config(tfds_dirs, file_format, **fields):
    tfds_fields = dict(
        name="tfds",
        tfds_name=TFDS_NAME,
        tfds_data_dir=tfds_dirs[file_format],
        tfds_format=file_format,
        val_split="val",
    )
    return data_config(**{**tfds_fields, **fields})


def _source(kind, folder, tfds_dirs, **fields):
    if kind == "folder":
        return folder_lib.imagenet_folder(data_config(name="imagenet_folder", dir=folder, **fields))
    # One shard per block, so a tfrecord epoch has several blocks.
    return tfds_lib.tfds_source(tfds_config(tfds_dirs, kind, tfrecord_shards_per_block=1, **fields))


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------------------------
# Sources.


def test_folder_source_reads_the_layout_with_normalised_float_batches(folder):
    source = _source("folder", folder, None)
    assert (source.num_train, source.num_val, source.num_classes) == (NUM_TRAIN, NUM_VAL, 3)
    assert source.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    images, labels = take(source.train_batches(0, batch_size=BATCH, seed=SEED), 1)[0]
    assert images.shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels) <= {0, 1, 2}
    # Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std].
    assert images.min() >= -2.2 and images.max() <= 2.7


def _expected_train_batch(step, seed=SEED):
    """The global batch of ``step`` computed from the image bytes, the corrupt file replaced
    by the next record of the batch (cyclically)."""
    transform = transforms.Transform(IMAGE_SIZE, 0.08, 9)
    records = base.epoch_indices(NUM_TRAIN, step, BATCH, seed)
    images, labels, failures = [], [], 0
    for j in range(BATCH):
        record = records[j]
        if record in BROKEN_TRAIN:
            record, failures = records[(j + 1) % BATCH], failures + 1
        name, _, encoded = IMAGES["train"][record]
        rng = np.random.default_rng([seed, step, j])
        images.append(transforms.train_image(encoded, rng, transform))
        labels.append(CLASSES.index(name))
    return np.stack(images), np.array(labels), failures


@pytest.mark.parametrize("kind", ["folder", "array_record"])
def test_random_access_batches_follow_epoch_indices_and_skip_corrupt_images(
    kind, folder, tfds_dirs
):
    source = _source(kind, folder, tfds_dirs)
    batches = take(source.train_batches(0, batch_size=BATCH, seed=SEED), 6)
    expected_failures = 0
    for step, (images, labels) in enumerate(batches):
        expected_images, expected_labels, failures = _expected_train_batch(step)
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
        expected_failures += failures
    assert expected_failures > 0  # the corrupt file was drawn
    assert source.stats() == {"decode_failures": expected_failures}


@pytest.mark.parametrize("kind", ["folder", "array_record", "tfrecord"])
def test_training_resumes_at_any_step_and_shards_rows_over_processes(kind, folder, tfds_dirs):
    source = _source(kind, folder, tfds_dirs)
    full = take(source.train_batches(0, batch_size=BATCH, seed=SEED), 7)
    # Step 5 is in the third epoch (two steps per epoch).
    assert_batches_equal(take(source.train_batches(5, batch_size=BATCH, seed=SEED), 2), full[5:])
    halves = [
        take(
            source.train_batches(3, batch_size=BATCH, seed=SEED, process_index=p, process_count=2),
            2,
        )
        for p in range(2)
    ]
    for step in range(2):
        joined = [np.concatenate([halves[p][step][k] for p in range(2)]) for k in range(2)]
        assert_batches_equal([joined], [full[3 + step]])
    again = take(source.train_batches(0, batch_size=BATCH, seed=SEED), 7)
    assert_batches_equal(again, full)
    other_seed = take(source.train_batches(0, batch_size=BATCH, seed=SEED + 1), 1)
    assert not np.array_equal(other_seed[0][0], full[0][0])


def test_a_resumed_stream_decodes_only_its_own_steps(folder, monkeypatch):
    decoded = []
    decode = transforms.decode_rgb

    def counting_decode(encoded):
        decoded.append(encoded)
        return decode(encoded)

    monkeypatch.setattr(transforms, "decode_rgb", counting_decode)
    source = _source("folder", folder, None)
    take(source.train_batches(5, batch_size=BATCH, seed=SEED), 1)
    assert len(decoded) == BATCH + source.stats()["decode_failures"]


def test_tfrecord_epochs_permute_all_records_in_blocks_of_shards(tfds_dirs):
    source = _source("tfrecord", None, tfds_dirs)
    split = source._train
    assert split.num_shards == 3
    for epoch in range(3):
        order = split.epoch_order(SEED, epoch, shards_per_block=1)
        np.testing.assert_array_equal(np.sort(order), np.arange(NUM_TRAIN))
        # Each block is one whole shard: consecutive records share their shard.
        shards = [split.shard_of(r) for r in order]
        changes = sum(a != b for a, b in zip(shards, shards[1:], strict=False))
        assert changes == 2
    assert not np.array_equal(split.epoch_order(SEED, 0, 1), split.epoch_order(SEED, 1, 1))


@pytest.mark.slow
def test_worker_processes_give_the_batches_of_the_main_process(folder, tfds_dirs):
    for kind, workers in (("folder", 2), ("array_record", 1), ("tfrecord", 3)):
        batches = [
            take(
                _source(kind, folder, tfds_dirs, num_workers=n).train_batches(
                    1, batch_size=BATCH, seed=SEED
                ),
                3,
            )
            for n in (0, workers)
        ]
        assert_batches_equal(*batches)


def _expected_eval():
    transform = transforms.Transform(IMAGE_SIZE, 0.08, 9)
    images, labels, mask = [], [], []
    for name, file, encoded in IMAGES["val"]:
        valid = "broken" not in file
        zeros = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        images.append(transforms.eval_image(encoded, transform) if valid else zeros)
        labels.append(CLASSES.index(name) if valid else 0)
        mask.append(float(valid))
    return np.stack(images), np.array(labels), np.array(mask)


@pytest.mark.parametrize("kind", ["folder", "array_record", "tfrecord"])
def test_eval_covers_every_image_once_in_file_order_with_a_mask(kind, folder, tfds_dirs):
    source = _source(kind, folder, tfds_dirs)
    batches = list(source.eval_batches(batch_size=BATCH))
    assert len(batches) == 2  # 7 images: 4 + 3 and one padding row
    images, labels, mask = (np.concatenate([b[k] for b in batches]) for k in range(3))
    expected_images, expected_labels, expected_mask = _expected_eval()
    np.testing.assert_array_equal(mask, np.append(expected_mask, 0.0))
    np.testing.assert_array_equal(images[:NUM_VAL], expected_images)
    np.testing.assert_array_equal(labels[:NUM_VAL], expected_labels)
    assert source.stats() == {"decode_failures": 1}
    for p in range(2):
        rows = list(source.eval_batches(batch_size=BATCH, process_index=p, process_count=2))
        for got, full in zip(rows, batches, strict=True):
            assert_batches_equal([got], [tuple(x[2 * p : 2 * p + 2] for x in full)])


# --------------------------------------------------------------------------------------------
# Errors.


def test_tfds_errors_name_the_dataset_and_the_format(tmp_path, tfds_dirs):
    empty = data_config(name="tfds", tfds_name=TFDS_NAME, tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{TFDS_NAME}.*not prepared in {tmp_path}"):
        tfds_lib.tfds_source(empty)
    with pytest.raises(ValueError, match="data.val_split = 'validation' is not a split"):
        tfds_lib.tfds_source(tfds_config(tfds_dirs, "array_record", val_split="validation"))
    with pytest.raises(ValueError, match="prepared as tfrecord"):
        config = tfds_config(tfds_dirs, "tfrecord")
        config.tfds_format = "array_record"
        tfds_lib.tfds_source(config)


def test_tfds_format_auto_follows_the_prepared_files(tfds_dirs, monkeypatch):
    for file_format, kind in (
        ("array_record", files.RandomAccessSource),
        ("tfrecord", tfrecord.TFRecordSource),
    ):
        config = tfds_config(tfds_dirs, file_format, tfds_format="auto")
        assert isinstance(tfds_lib.tfds_source(config), kind)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if TensorFlow were missing
    with pytest.raises(ImportError, match="tfrecord files, which are read with TensorFlow"):
        tfds_lib.tfds_source(tfds_config(tfds_dirs, "tfrecord"))


def test_the_array_record_path_never_imports_tensorflow(tfds_dirs):
    script = f"""
import sys
from oscqat_jax.training import config
from oscqat_jax.training.data import tfds as tfds_lib
c = config.base_config().data
c.update(dict(name="tfds", tfds_name="{TFDS_NAME}", tfds_data_dir="{tfds_dirs["array_record"]}",
              val_split="val", image_size={IMAGE_SIZE}, num_workers=0))
source = tfds_lib.tfds_source(c)
next(source.train_batches(0, batch_size={BATCH}, seed=0))
next(source.eval_batches(batch_size={BATCH}))
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# The training program on each source.


def train_config(**data_fields):
    c = config_lib.base_config()
    c.data = data_config(image_size=16, batch_size=8, eval_batch_size=8, **data_fields)
    c.model.name = "mobilenet_v2"
    c.model.width_multiplier = 0.25
    c.model.block_setting = ((1, 8, 1, 1), (4, 16, 2, 2))
    c.quant.n_bits = 3
    c.train.epochs = 2  # one step each: 10 training images, batches of 8
    c.train.log_every = 1
    c.eval.bn_batches = 2
    c.train.fast_compile = True
    return c


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "array_record", "tfrecord"])
def test_the_trainer_trains_and_evaluates_on_each_source(kind, folder, tfds_dirs, tmp_path):
    from oscqat_jax.training import trainer

    if kind == "folder":
        config = train_config(name="imagenet_folder", dir=folder)
    else:
        config = train_config(
            name="tfds", tfds_name=TFDS_NAME, tfds_data_dir=tfds_dirs[kind], val_split="val"
        )
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["qat_post_bn"])
    # The corrupt validation image is met by every evaluation.
    assert summary["data/decode_failures"] >= 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "qat/loss" in r] == [1, 2]
