"""Image-classification data for the training program: the sources, picked by name.

Every source implements :class:`~oscqat_jax.training.data.base.Source` (see :mod:`.base`):
training batches are a pure function of ``(seed, step)``, read as the rows this process
feeds, from any start step; evaluation batches have a fixed size and a mask.

Sources (``config.data.name``):

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (see :mod:`.arrays`).
- ``synthetic``: random images and labels of any size, for tests and benchmarks.
- ``fashion_mnist``: the 70,000 Fashion-MNIST images (see :mod:`.fashion_mnist`).
- ``imagenet_folder``: an ImageNet-style folder of image files (see :mod:`.folder`).
- ``tfds``: a dataset prepared by tensorflow-datasets (see :mod:`.tfds`).

The file-based sources decode with :mod:`.transforms` on the machinery of :mod:`.files`.
:func:`load_dataset` imports a source's module only when that source is asked for, so this
package can be imported without grain, Pillow or tensorflow-datasets.
"""

from __future__ import annotations

import dataclasses

from oscqat_jax.training.data import arrays
from oscqat_jax.training.data.arrays import load_digits, synthetic
from oscqat_jax.training.data.base import (
    ArrayDataset,
    Source,
    epoch_indices,
    eval_batches,
    local_rows,
    steps_per_epoch,
    train_batch,
)

__all__ = [
    "SOURCES",
    "ArrayDataset",
    "Source",
    "epoch_indices",
    "eval_batches",
    "load_dataset",
    "load_digits",
    "local_rows",
    "steps_per_epoch",
    "synthetic",
    "train_batch",
]

SOURCES = ("digits", "synthetic", "fashion_mnist", "imagenet_folder", "tfds")


def load_dataset(data_config) -> Source:
    """The source named by ``config.data.name`` (see ``SOURCES``)."""
    name = data_config.name
    if name in ("digits", "synthetic"):
        dataset = arrays.load(data_config)
    elif name == "fashion_mnist":
        from oscqat_jax.training.data import fashion_mnist

        dataset = fashion_mnist.load(data_config)
    elif name == "imagenet_folder":
        from oscqat_jax.training.data import folder

        return folder.imagenet_folder(data_config)
    elif name == "tfds":
        from oscqat_jax.training.data import tfds

        return tfds.tfds_source(data_config)
    else:
        raise ValueError(
            f"config.data.name = {name!r} is not valid: use one of {', '.join(SOURCES)}."
        )
    return dataclasses.replace(
        dataset, max_shift=data_config.max_shift, flip=bool(data_config.flip)
    )
