"""Tests of the in-memory sources: scikit-learn's digits and synthetic images."""

import numpy as np

from oscqat_jax.training.data import arrays


def test_digits_are_real_stratified_and_normalised():
    digits = arrays.load_digits(image_size=16, val_fraction=0.2, split_seed=0)
    assert digits.train_images.shape == (1437, 16, 16, 1) and digits.val_images.shape[0] == 360
    assert digits.train_images.dtype == np.float32 and digits.train_labels.dtype == np.int32
    np.testing.assert_allclose(digits.train_images.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(digits.train_images.std(), 1.0, atol=1e-3)
    # Stratified: every class holds 20 % of its images in validation (within rounding).
    counts = np.bincount(digits.val_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = arrays.load_digits(image_size=16, val_fraction=0.2, split_seed=0)
    np.testing.assert_array_equal(again.val_labels, digits.val_labels)


def test_synthetic_images_have_the_requested_shapes_and_follow_the_seed():
    a = arrays.synthetic(image_size=5, num_classes=4, num_train=6, num_val=3, channels=2, seed=7)
    assert a.train_images.shape == (6, 5, 5, 2) and a.val_images.shape == (3, 5, 5, 2)
    assert a.train_labels.dtype == np.int32 and set(a.train_labels) <= {0, 1, 2, 3}
    b = arrays.synthetic(image_size=5, num_classes=4, num_train=6, num_val=3, channels=2, seed=7)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    c = arrays.synthetic(image_size=5, num_classes=4, num_train=6, num_val=3, channels=2, seed=8)
    assert not np.array_equal(a.train_images, c.train_images)
