"""The ImageNet-style folder: ``data.dir/{train,val}/<class>/*`` image files, read with random
access on grain (see :mod:`.files`) and decoded by :mod:`.transforms`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from oscqat_jax.training.data.files import RandomAccessSource
from oscqat_jax.training.data.transforms import Transform


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
