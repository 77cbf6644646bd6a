"""Small in-memory sources: :class:`~oscqat_jax.training.data.base.ArrayDataset` s built here.

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (they ship inside the wheel),
  bilinearly upsampled, with a fixed stratified train/validation split.
- ``synthetic``: random images and labels of any size, for tests and benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.training.data.base import ArrayDataset


def load(data_config) -> ArrayDataset:
    """The ``digits`` or ``synthetic`` dataset of ``data_config`` (without augmentation)."""
    if data_config.name == "digits":
        return load_digits(
            image_size=data_config.image_size,
            val_fraction=data_config.val_fraction,
            split_seed=data_config.split_seed,
        )
    return synthetic(
        image_size=data_config.image_size,
        num_classes=data_config.num_classes,
        num_train=data_config.get("num_train", 64),
        num_val=data_config.get("num_val", 32),
        channels=data_config.get("channels", 3),
        seed=data_config.split_seed,
    )


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, h, w)`` images to ``(N, size, size)``."""
    out = jax.image.resize(
        jnp.asarray(images, jnp.float32), (len(images), size, size), method="bilinear"
    )
    return np.asarray(out)


def load_digits(*, image_size: int = 32, val_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's digits, upsampled to ``image_size`` and split by class (stratified).

    Pixel values 0..16 are scaled to [0, 1], then normalised with the training split's mean
    and standard deviation. One channel.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8:
        raise ValueError(f"data.image_size must be at least 8 for digits, got {image_size}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    digits = sklearn_digits()
    images = _upsample(digits.images / 16.0, image_size)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=split_seed
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).astype(np.float32)
    return ArrayDataset(
        name="digits",
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        val_images=images[val_idx],
        val_labels=labels[val_idx],
        num_classes=10,
    )


def synthetic(
    *,
    image_size: int,
    num_classes: int,
    num_train: int = 64,
    num_val: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ArrayDataset:
    """Random normal images and uniform labels: a stand-in with the shapes of real data."""
    rng = np.random.default_rng(seed)

    def split(n):
        images = rng.normal(size=(n, image_size, image_size, channels)).astype(np.float32)
        return images, rng.integers(0, num_classes, size=n).astype(np.int32)

    train_images, train_labels = split(num_train)
    val_images, val_labels = split(num_val)
    return ArrayDataset(
        "synthetic", train_images, train_labels, val_images, val_labels, num_classes
    )
