"""Tests of the training program's data and optimizer pieces (no model compilation)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from oscqat_jax.training import data, optim


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(image_size=16, val_fraction=0.2, split_seed=0)


def test_digits_are_real_stratified_and_normalised(digits):
    assert digits.train_images.shape == (1437, 16, 16, 1) and digits.val_images.shape[0] == 360
    assert digits.train_images.dtype == np.float32 and digits.train_labels.dtype == np.int32
    np.testing.assert_allclose(digits.train_images.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(digits.train_images.std(), 1.0, atol=1e-3)
    # Stratified: every class holds 20 % of its images in validation (within rounding).
    counts = np.bincount(digits.val_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = data.load_digits(image_size=16, val_fraction=0.2, split_seed=0)
    np.testing.assert_array_equal(again.val_labels, digits.val_labels)


def test_train_batches_are_a_pure_function_of_seed_and_step(digits):
    a = data.train_batch(digits, 57, batch_size=32, seed=3, max_shift=2, flip=True)
    b = data.train_batch(digits, 57, batch_size=32, seed=3, max_shift=2, flip=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = data.train_batch(digits, 58, batch_size=32, seed=3, max_shift=2, flip=True)
    assert not np.array_equal(a[1], c[1])
    # One epoch visits every training image at most once.
    per_epoch = data.steps_per_epoch(digits, 32)
    seen = np.concatenate(
        [data.train_batch(digits, s, batch_size=32, seed=3)[1] for s in range(per_epoch)]
    )
    assert len(seen) == per_epoch * 32
    np.testing.assert_array_equal(
        np.bincount(seen, minlength=10) <= np.bincount(digits.train_labels, minlength=10), True
    )


def test_shift_augmentation_is_a_translation_by_at_most_max_shift(digits):
    plain, _ = data.train_batch(digits, 0, batch_size=8, seed=0)
    shifted, _ = data.train_batch(digits, 0, batch_size=8, seed=0, max_shift=2)
    assert not np.array_equal(plain, shifted)
    padded = np.pad(plain, ((0, 0), (2, 2), (2, 2), (0, 0)))
    h, w = plain.shape[1:3]
    for i in range(len(plain)):
        candidates = [padded[i, dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(shifted[i], c) for c in candidates)


def test_eval_batches_pad_with_a_mask():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    labels = np.arange(10, dtype=np.int32)
    batches = list(data.eval_batches(images, labels, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(batches[-1][2], [1, 1, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[:10], labels)


def test_bad_data_settings_are_named():
    cfg = ml_collections.ConfigDict({"name": "imagenet2012"})
    with pytest.raises(ValueError, match="data.name = .imagenet2012. is not valid"):
        data.load_dataset(cfg)
    tiny = data.synthetic(image_size=8, num_classes=3, num_train=10)
    with pytest.raises(ValueError, match="batch_size 16 is larger"):
        data.steps_per_epoch(tiny, 16)


def _opt_config(**overrides):
    c = ml_collections.ConfigDict(
        dict(
            lr=0.1,
            lr_final=0.0,
            warmup_steps=0,
            lr_per_epoch=False,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.01,
            quant_lr=1e-3,
            quant_weight_decay=0.0,
        )
    )
    c.update(overrides)
    return c


def test_quantizer_parameters_get_adam_and_the_rest_sgd_with_coupled_decay():
    params = {
        "conv": {
            "kernel": jnp.ones((2,)),
            "weight_scale": jnp.ones(()),
            "input_scale": jnp.ones(()),
        },
        "bn": {"scale": jnp.ones((2,)), "bias": jnp.zeros((2,))},
    }
    labels = optim.param_labels(params)
    assert labels["conv"]["weight_scale"] == "quant" and labels["conv"]["input_scale"] == "quant"
    assert labels["bn"]["scale"] == "model" and labels["conv"]["kernel"] == "model"
    opt = optim.create_optimizer(
        _opt_config(), total_steps=10, steps_per_epoch=5, train_quantizers=True
    )
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    state = opt.tx.init(params)
    lrs = (opt.model_lr(0), opt.quant_lr(0))
    for step in range(2):
        directions, state = opt.tx.update(grads, state, params)
        updates = optim.apply_learning_rates(directions, params, *lrs)
        if step == 0:
            # SGD with PyTorch's coupled decay: -lr * (g + wd * w) on the first step.
            np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.51, rtol=1e-6)
            np.testing.assert_allclose(updates["bn"]["scale"], -0.1 * 0.51, rtol=1e-6)
            # Adam's first step is -lr * sign(g), no decay.
            np.testing.assert_allclose(updates["conv"]["weight_scale"], -1e-3, rtol=1e-4)
    # Second step: the momentum buffer holds 0.9 * 0.51 + 0.51, as torch.optim.SGD's does,
    # and the result equals optax.sgd with the same rate.
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.51 * 1.9, rtol=1e-6)
    sgd = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9))
    kernel = params["conv"]["kernel"]
    sgd_state = sgd.init(kernel)
    for _ in range(2):
        reference, sgd_state = sgd.update(grads["conv"]["kernel"], sgd_state, kernel)
    np.testing.assert_allclose(updates["conv"]["kernel"], reference, rtol=1e-6)


def test_float_training_leaves_quantizer_parameters_alone():
    params = {"kernel": jnp.ones((2,)), "weight_scale": jnp.ones(())}
    opt = optim.create_optimizer(
        _opt_config(), total_steps=10, steps_per_epoch=5, train_quantizers=False
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    directions, _ = opt.tx.update(grads, opt.tx.init(params), params)
    updates = optim.apply_learning_rates(directions, params, opt.model_lr(0), opt.quant_lr(0))
    assert float(updates["weight_scale"]) == 0.0 and float(updates["kernel"][0]) != 0.0
    np.testing.assert_allclose(opt.model_lr(10), 0.0, atol=1e-9)
    assert isinstance(opt.tx, optax.GradientTransformation)
