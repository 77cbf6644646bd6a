"""The optimizer of the training program against hand-written NumPy updates (docs/method.md §9).

Model parameters: SGD with momentum and PyTorch's coupled weight decay (``g + wd * w`` enters
the momentum buffer), the rate applied to the final update; quantizer parameters
(``*_scale``, ``*_zero_point``): Adam with ``quant_lr`` and no weight decay, or frozen.
Each closed form is also checked to differ from a plausible wrong one, so the test can fail.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from oscqat_jax.training import optim

LR, LR_FINAL, QUANT_LR, WD, MOMENTUM = 0.1, 0.02, 0.01, 0.1, 0.9
STEPS = 5
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # PyTorch's and optax's Adam defaults

# A conv with its weight quantizer, BatchNorm (whose `scale` is a model parameter) and an
# asymmetric activation quantizer.
PARAMS = {
    "conv": {
        "kernel": np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]),
        "bias": np.array([0.1, -0.2, 0.3]),
        "weight_scale": np.array([0.05, 0.1, 0.2]),
    },
    "bn": {"scale": np.array([1.0, 0.9, 1.1]), "bias": np.array([0.0, 0.05, -0.05])},
    "act": {"input_scale": np.array(0.3), "input_zero_point": np.array(2.0)},
}
QUANT_LEAVES = {("conv", "weight_scale"), ("act", "input_scale"), ("act", "input_zero_point")}


def opt_config(**overrides) -> types.SimpleNamespace:
    """The fields ``create_optimizer`` reads (``config.optimizer``)."""
    fields = dict(
        lr=LR,
        lr_final=LR_FINAL,
        warmup_steps=0,
        lr_per_epoch=False,
        momentum=MOMENTUM,
        nesterov=False,
        weight_decay=WD,
        quant_lr=QUANT_LR,
        quant_weight_decay=0.0,
    )
    return types.SimpleNamespace(**(fields | overrides))


def gradients(steps: int = STEPS) -> list[dict]:
    """Fixed random gradients, one tree per step (independent of the parameters)."""
    rng = np.random.default_rng(0)
    return [
        jax.tree_util.tree_map(lambda p: rng.normal(size=np.shape(p)), PARAMS) for _ in range(steps)
    ]


def as_f32(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def run_optimizer(config, *, train_quantizers: bool = True, total_steps: int = STEPS):
    """Parameters after ``create_optimizer`` + ``apply_learning_rates`` over ``gradients()``,
    with the rates of step ``t`` taken from the optimizer's schedules."""
    opt = optim.create_optimizer(
        config, total_steps=total_steps, steps_per_epoch=1, train_quantizers=train_quantizers
    )
    params = as_f32(PARAMS)
    state = opt.tx.init(params)
    for t, grads in enumerate(gradients()):
        directions, state = opt.tx.update(as_f32(grads), state, params)
        updates = optim.apply_learning_rates(directions, params, opt.model_lr(t), opt.quant_lr(t))
        params = optax.apply_updates(params, updates)
    return params


def cosine(t: int, total: int = STEPS) -> float:
    return LR_FINAL + 0.5 * (LR - LR_FINAL) * (1 + math.cos(math.pi * t / total))


def sgd_reference(w, grads, *, nesterov=False, wd=WD, decoupled=False, lr_in_buffer=False):
    """PyTorch's ``torch.optim.SGD`` on one leaf (float64), with the cosine rate of each step.

    ``decoupled`` (AdamW-style ``w -= lr * wd * w``) and ``lr_in_buffer`` (Keras-style
    velocity ``m * v + lr * g``) are the wrong variants the negative controls use.
    """
    w, buf = np.asarray(w, np.float64), 0.0
    for t, g in enumerate(grads):
        lr = cosine(t)
        g = g if decoupled else g + wd * w
        buf = MOMENTUM * buf + (lr * g if lr_in_buffer else g)
        direction = g + MOMENTUM * buf if nesterov else buf
        w = w - (direction if lr_in_buffer else lr * direction)
        if decoupled:
            w = w - lr * wd * w
    return w


def adam_reference(w, grads, *, lr=QUANT_LR, wd=0.0):
    """PyTorch's ``torch.optim.Adam`` on one leaf (float64), coupled weight decay ``wd``."""
    w, m, v = np.asarray(w, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g + wd * w
        m = ADAM_B1 * m + (1 - ADAM_B1) * g
        v = ADAM_B2 * v + (1 - ADAM_B2) * g**2
        m_hat, v_hat = m / (1 - ADAM_B1**t), v / (1 - ADAM_B2**t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
    return w


def leaf_grads(module: str, name: str) -> list[np.ndarray]:
    return [g[module][name] for g in gradients()]


MODEL_LEAVES = [
    (module, name)
    for module, leaves in PARAMS.items()
    for name in leaves
    if (module, name) not in QUANT_LEAVES
]


@pytest.mark.parametrize("nesterov", [False, True])
def test_model_params_follow_pytorch_sgd_with_coupled_decay(nesterov):
    params = run_optimizer(opt_config(nesterov=nesterov))
    for module, name in MODEL_LEAVES:
        w0, grads = PARAMS[module][name], leaf_grads(module, name)
        expected = sgd_reference(w0, grads, nesterov=nesterov)
        actual = np.asarray(params[module][name], np.float64)
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6, err_msg=name)
        # Negative controls: each plausible wrong variant lands elsewhere.
        wrong = {
            "decoupled decay": sgd_reference(w0, grads, nesterov=nesterov, decoupled=True),
            "no decay": sgd_reference(w0, grads, nesterov=nesterov, wd=0.0),
            "other nesterov": sgd_reference(w0, grads, nesterov=not nesterov),
            "rate inside the buffer": sgd_reference(
                w0, grads, nesterov=nesterov, lr_in_buffer=True
            ),
        }
        for variant, w in wrong.items():
            assert np.abs(actual - w).max() > 1e-3, f"{module}/{name} matches {variant}"


def test_bn_scale_is_a_model_parameter_not_a_quantizer_scale():
    params = run_optimizer(opt_config())
    grads = leaf_grads("bn", "scale")
    actual = np.asarray(params["bn"]["scale"], np.float64)
    np.testing.assert_allclose(actual, sgd_reference(PARAMS["bn"]["scale"], grads), rtol=2e-5)
    assert np.abs(actual - adam_reference(PARAMS["bn"]["scale"], grads)).max() > 1e-3


def test_quantizer_params_get_adam_with_quant_lr_and_no_weight_decay():
    # A quant_lr far from the model's rates, so a swapped rate cannot pass.
    params = run_optimizer(opt_config())
    for module, name in QUANT_LEAVES:
        w0, grads = PARAMS[module][name], leaf_grads(module, name)
        actual = np.asarray(params[module][name], np.float64)
        np.testing.assert_allclose(actual, adam_reference(w0, grads), rtol=1e-5, err_msg=name)
        # The model's weight decay (0.1) must not reach them; nor the model's SGD or rate.
        assert np.abs(actual - adam_reference(w0, grads, wd=WD)).max() > 1e-4, name
        assert np.abs(actual - adam_reference(w0, grads, lr=LR)).max() > 1e-3, name
        assert np.abs(actual - sgd_reference(w0, grads)).max() > 1e-3, name


def test_quant_weight_decay_is_coupled_into_adam():
    qwd = 5.0  # large, so its effect on Adam's normalised step is visible
    params = run_optimizer(opt_config(quant_weight_decay=qwd))
    w0, grads = PARAMS["act"]["input_zero_point"], leaf_grads("act", "input_zero_point")
    expected = adam_reference(w0, grads, wd=qwd)
    np.testing.assert_allclose(params["act"]["input_zero_point"], expected, rtol=1e-5)
    assert abs(expected - adam_reference(w0, grads)) > 1e-3


def test_without_quantizer_training_quantizer_params_do_not_move():
    params = run_optimizer(opt_config(), train_quantizers=False)
    for module, name in QUANT_LEAVES:
        np.testing.assert_array_equal(params[module][name], np.float32(PARAMS[module][name]))
    # The model parameters still train as before, and the same run with quantizer training
    # moves the quantizer parameters (the check above can fail).
    kernel = np.asarray(params["conv"]["kernel"], np.float64)
    grads = leaf_grads("conv", "kernel")
    np.testing.assert_allclose(kernel, sgd_reference(PARAMS["conv"]["kernel"], grads), rtol=2e-5)
    trained = run_optimizer(opt_config(), train_quantizers=True)
    assert not np.allclose(trained["conv"]["weight_scale"], PARAMS["conv"]["weight_scale"])


def test_param_labels():
    labels = optim.param_labels(PARAMS)
    assert labels == {
        "conv": {"kernel": "model", "bias": "model", "weight_scale": "quant"},
        "bn": {"scale": "model", "bias": "model"},
        "act": {"input_scale": "quant", "input_zero_point": "quant"},
    }
    assert (optim.MODEL, optim.QUANT) == ("model", "quant")


def _lr(config, steps, *, total_steps, steps_per_epoch=1, train_quantizers=True):
    opt = optim.create_optimizer(
        config,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        train_quantizers=train_quantizers,
    )
    return [float(opt.model_lr(t)) for t in steps], [float(opt.quant_lr(t)) for t in steps]


def test_cosine_schedule_with_warmup_and_floor():
    # 10 steps, 2 of linear warmup from 0, then cosine over the remaining 8 to lr_final.
    config = opt_config(lr=0.1, lr_final=0.01, warmup_steps=2)
    model_lr, quant_lr = _lr(config, [0, 1, 2, 4, 6, 10, 12], total_steps=10)
    middle = 0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 2 / 8))
    expected = [0.0, 0.05, 0.1, middle, 0.055, 0.01, 0.01]
    np.testing.assert_allclose(model_lr, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(quant_lr, QUANT_LR, rtol=1e-6)


def test_lr_per_epoch_holds_the_rate_within_each_epoch():
    # 12 steps of 4 per epoch: the rate of step t is the cosine at the epoch's first step.
    config = opt_config(lr=0.1, lr_final=0.0, lr_per_epoch=True)
    model_lr, _ = _lr(config, range(12), total_steps=12, steps_per_epoch=4)
    epoch_rates = [0.1, 0.05 * (1 + math.cos(math.pi / 3)), 0.05 * (1 + math.cos(2 * math.pi / 3))]
    np.testing.assert_allclose(model_lr, np.repeat(epoch_rates, 4), rtol=1e-6)
    # Negative control: per step, the rate changes inside the epoch.
    per_step, _ = _lr(
        opt_config(lr=0.1, lr_final=0.0), range(12), total_steps=12, steps_per_epoch=4
    )
    assert per_step[5] < per_step[4] and per_step[4] == pytest.approx(model_lr[4], rel=1e-6)


def test_quant_lr_is_zero_without_quantizer_training():
    _, quant_lr = _lr(opt_config(), [0, 3], total_steps=STEPS, train_quantizers=False)
    assert quant_lr == [0.0, 0.0]


# The optimizer tests of the former test_training_data.py, unchanged.


def _legacy_opt_config(**overrides):
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
        _legacy_opt_config(), total_steps=10, steps_per_epoch=5, train_quantizers=True
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
        _legacy_opt_config(), total_steps=10, steps_per_epoch=5, train_quantizers=False
    )
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    directions, _ = opt.tx.update(grads, opt.tx.init(params), params)
    updates = optim.apply_learning_rates(directions, params, opt.model_lr(0), opt.quant_lr(0))
    assert float(updates["weight_scale"]) == 0.0 and float(updates["kernel"][0]) != 0.0
    np.testing.assert_allclose(opt.model_lr(10), 0.0, atol=1e-9)
    assert isinstance(opt.tx, optax.GradientTransformation)
