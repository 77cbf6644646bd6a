"""Tests of the sources' shared base: epoch order, in-memory batches, the rows of a process."""

import numpy as np
import pytest

from oscqat_jax.training.data import arrays, base


@pytest.fixture(scope="module")
def digits():
    return arrays.load_digits(image_size=16, val_fraction=0.2, split_seed=0)


def test_train_batches_are_a_pure_function_of_seed_and_step(digits):
    a = base.train_batch(digits, 57, batch_size=32, seed=3, max_shift=2, flip=True)
    b = base.train_batch(digits, 57, batch_size=32, seed=3, max_shift=2, flip=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = base.train_batch(digits, 58, batch_size=32, seed=3, max_shift=2, flip=True)
    assert not np.array_equal(a[1], c[1])
    # One epoch visits every training image at most once.
    per_epoch = base.steps_per_epoch(digits, 32)
    seen = np.concatenate(
        [base.train_batch(digits, s, batch_size=32, seed=3)[1] for s in range(per_epoch)]
    )
    assert len(seen) == per_epoch * 32
    np.testing.assert_array_equal(
        np.bincount(seen, minlength=10) <= np.bincount(digits.train_labels, minlength=10), True
    )


def test_shift_augmentation_is_a_translation_by_at_most_max_shift(digits):
    plain, _ = base.train_batch(digits, 0, batch_size=8, seed=0)
    shifted, _ = base.train_batch(digits, 0, batch_size=8, seed=0, max_shift=2)
    assert not np.array_equal(plain, shifted)
    padded = np.pad(plain, ((0, 0), (2, 2), (2, 2), (0, 0)))
    h, w = plain.shape[1:3]
    for i in range(len(plain)):
        candidates = [padded[i, dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(shifted[i], c) for c in candidates)


def test_eval_batches_pad_with_a_mask():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    labels = np.arange(10, dtype=np.int32)
    batches = list(base.eval_batches(images, labels, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(batches[-1][2], [1, 1, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:10], labels)


def test_epoch_indices_read_the_permutation_of_seed_and_epoch_in_slices():
    epoch0 = np.concatenate([base.epoch_indices(10, step, 3, seed=1) for step in range(3)])
    np.testing.assert_array_equal(epoch0, np.random.default_rng([1, 0]).permutation(10)[:9])
    # Step 4 is the second batch of epoch 1 (three full batches per epoch; one record dropped).
    epoch1 = np.random.default_rng([1, 1]).permutation(10)
    np.testing.assert_array_equal(base.epoch_indices(10, 4, 3, seed=1), epoch1[3:6])
    with pytest.raises(ValueError, match="batch_size 11 is larger than the 10 training images"):
        base.epoch_indices(10, 0, 11, seed=1)


def test_local_rows_split_every_global_batch_between_processes():
    assert [base.local_rows(8, p, 2) for p in range(2)] == [range(0, 4), range(4, 8)]
    with pytest.raises(ValueError, match="batch size 6 does not divide over 4 processes"):
        base.local_rows(6, 0, 4)
    dataset = arrays.synthetic(image_size=4, num_classes=3, num_train=16, num_val=5)
    full = next(dataset.train_batches(2, batch_size=8, seed=1))
    full_eval = list(dataset.eval_batches(batch_size=4))
    for p in range(2):
        part = next(
            dataset.train_batches(2, batch_size=8, seed=1, process_index=p, process_count=2)
        )
        for got, whole in zip(part, full, strict=True):
            np.testing.assert_array_equal(got, whole[4 * p : 4 * p + 4])
        part_eval = list(dataset.eval_batches(batch_size=4, process_index=p, process_count=2))
        for got, whole in zip(part_eval, full_eval, strict=True):
            for x, y in zip(got, whole, strict=True):
                np.testing.assert_array_equal(x, y[2 * p : 2 * p + 2])
