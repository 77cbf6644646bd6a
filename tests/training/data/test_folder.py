"""Tests of the ImageNet-style folder's layout checks (its batches: test_files.py)."""

import pytest

from oscqat_jax.training import config as config_lib
from oscqat_jax.training.data import folder


def test_folder_layout_errors_name_the_problem(tmp_path):
    def check(root, error, match):
        c = config_lib.base_config().data
        c.name, c.dir = "imagenet_folder", str(root)
        with pytest.raises(error, match=match):
            folder.imagenet_folder(c)

    check(tmp_path / "nowhere", FileNotFoundError, "is not a directory")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    check(tmp_path, FileNotFoundError, "no val/ folder")
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "val" / "cat" / "a.png").write_bytes(b"")
    check(tmp_path, ValueError, r"not in train \['dog'\]")
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"")
    check(tmp_path, ValueError, r"train/dog holds no image files")
