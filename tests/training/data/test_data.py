"""Tests of the data package's face: ``load_dataset`` picks a source by name."""

import subprocess
import sys

import ml_collections
import pytest
from testkit import ROOT

from oscqat_jax.training import data


def test_bad_data_settings_are_named():
    cfg = ml_collections.ConfigDict({"name": "imagenet2012"})
    with pytest.raises(ValueError, match="data.name = .imagenet2012. is not valid"):
        data.load_dataset(cfg)
    tiny = data.synthetic(image_size=8, num_classes=3, num_train=10)
    with pytest.raises(ValueError, match="batch_size 16 is larger"):
        data.steps_per_epoch(tiny, 16)


def test_in_memory_sources_get_the_augmentation_of_the_config():
    cfg = ml_collections.ConfigDict(
        dict(name="synthetic", image_size=4, num_classes=3, split_seed=2, max_shift=1, flip=1)
    )
    dataset = data.load_dataset(cfg)
    assert isinstance(dataset, data.ArrayDataset)
    assert (dataset.max_shift, dataset.flip) == (1, True)
    assert (dataset.num_train, dataset.num_val, dataset.image_shape) == (64, 32, (4, 4, 3))


def test_importing_the_package_imports_no_file_pipeline():
    script = (
        "import sys\n"
        "import oscqat_jax.training.data\n"
        "loaded = [m for m in ('grain', 'PIL', 'tensorflow_datasets') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
