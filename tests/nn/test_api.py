"""Tests of the safe training API (oscqat_jax.nn.api) and of the traps it closes, one test per
trap, each with the correct usage as its negative control:

- one SGD with momentum over all parameters drives a step size negative (reproduced here);
  the labelled optimizer keeps it positive and ``check_scales`` names the bad layer;
- the trainer's step traces under every oscillation setting;
- calibration passes the model's keyword arguments and sets the range estimators' scales;
- a traced static argument of the core names ``static_argnames``;
- one default EMA momentum everywhere.

(The dampening term that cannot be fed back and the tracking state that must be merged are
test_intercept.py's and test_misuse.py's.)
"""

from __future__ import annotations

import functools
import inspect
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from nn_helpers import init, kernel_init, randn

import oscqat_jax.nn as qnn
from oscqat_jax import oscillation, quant, ranges
from oscqat_jax.nn import api
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import QuantRule
from oscqat_jax.nn.verbs import calibrate
from oscqat_jax.training import build, optim
from oscqat_jax.training import config as config_lib
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.forward import RulesForward


class MLP(nn.Module):
    """Two dense layers with the package's BatchNorm between."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16, kernel_init=kernel_init, name="hidden")(x)
        x = nn.relu(qnn.BatchNorm(name="bn")(x, use_running_average=not train))
        return nn.Dense(10, kernel_init=kernel_init, name="out")(x)


RULES = (QuantRule("hidden"), QuantRule("out", track=False))
"""W4A4 for both layers, both dampened; the first is tracked."""
MODEL = quantize_model(MLP(), RULES)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((128, 32)), jnp.float32)
Y = jnp.asarray(np.argmax(np.asarray(X) @ RNG.standard_normal((32, 10)), -1))


@functools.cache
def float_variables() -> dict:
    return jax.jit(MLP().init)(jax.random.key(1), X)


@functools.cache
def initial_variables() -> dict:
    """``MODEL.init``'s variables: the float ones and the quantizers' uncalibrated ones."""
    return init(MODEL, X)


@functools.cache
def calibrated_variables() -> dict:
    return calibrate(MODEL, initial_variables(), [X[:64], X[64:]])


@jax.jit
def loss_and_grads(params, variables):
    def loss(p):
        logits, _ = MODEL.apply(
            {**variables, "params": p}, X, mode="train", train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

    return jax.value_and_grad(loss)(params)


def train(tx: optax.GradientTransformation, steps: int) -> tuple[dict, list[float]]:
    """``steps`` full-batch steps of ``tx`` from the calibrated variables (one compile)."""
    variables = calibrated_variables()
    params, losses = variables["params"], []
    state = tx.init(params)
    for _ in range(steps):
        loss, grads = loss_and_grads(params, variables)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return params, losses


# ----------------------------------------------------------------------------- optimizer


def test_param_labels_separate_quantizer_parameters():
    params = {
        "conv": {"kernel": 1.0, "bias": 2.0, "weight_scale": 3.0, "weight_zero_point": 4.0},
        "bn": {"scale": 5.0, "bias": 6.0},  # BatchNorm's gamma is a weight, not a step size
        "act": {"input_scale": 7.0, "output_zero_point": 8.0},
    }
    assert api.param_labels(params) == {
        "conv": {
            "kernel": "weights",
            "bias": "weights",
            "weight_scale": "quantizer",
            "weight_zero_point": "quantizer",
        },
        "bn": {"scale": "weights", "bias": "weights"},
        "act": {"input_scale": "quantizer", "output_zero_point": "quantizer"},
    }
    # The trainer follows the same rule under its checkpointed label names.
    trainer = optim.param_labels(params)
    assert trainer["conv"]["weight_zero_point"] == "quant" and trainer["bn"]["scale"] == "model"


def test_one_sgd_over_all_params_drives_a_scale_negative_and_check_scales_names_it():
    start = calibrated_variables()["params"]
    assert float(api.min_scale(start)) > 0
    api.check_scales(start)  # negative control: calibrated scales pass

    # The trap: a scale's gradient sums over every weight it quantizes, so SGD at the
    # weights' rate pushes a step size of about 0.1 through zero within a few steps.
    params, losses = train(optax.sgd(0.02, momentum=0.9), steps=4)
    assert float(api.min_scale(params)) < 0
    # check_scales names the first non-positive scale in tree order (sorted keys).
    first_bad = next(
        f"{layer}/{name}"
        for layer, leaves in sorted(params.items())
        for name, value in sorted(leaves.items())
        if name.endswith("_scale") and float(jnp.min(value)) <= 0
    )
    with pytest.raises(ValueError, match=rf"^Quantizer scale {first_bad} is -[0-9.e-]+ \("):
        api.check_scales(params)

    # The same SGD for the weights, Adam with a small rate for the quantizers.
    tx = api.quant_optimizer(optax.sgd(0.02, momentum=0.9), optax.adam(1e-3))
    labelled, labelled_losses = train(tx, steps=4)
    api.check_scales(labelled)
    assert float(api.min_scale(labelled)) > 0
    assert labelled_losses[-1] < labelled_losses[0] - 0.01  # and it trains
    moved = labelled["hidden"]["kernel"] - start["hidden"]["kernel"]
    assert float(jnp.max(jnp.abs(moved))) > 1e-3  # the weights took their SGD steps
    # With its scale clamped to 1e-8 that layer quantizes every weight to about 0: the
    # network's output no longer depends on its input, and the loss sits at log(10).
    assert float(logits_spread(params)) < 1e-5 < 1e-2 < float(logits_spread(labelled))
    assert losses[-1] == pytest.approx(np.log(10), abs=0.01)


def logits_spread(params) -> jax.Array:
    """Largest standard deviation over the batch of any logit (eval mode)."""
    logits = jax.jit(MODEL.apply)({**calibrated_variables(), "params": params}, X)
    return jnp.max(jnp.std(logits, axis=0))


def test_check_scales_and_min_scale_on_bad_values():
    good = {"a": {"kernel": -jnp.ones(3), "weight_scale": jnp.full((1, 3), 0.5)}}
    api.check_scales(good)  # a negative kernel is fine; only scales are checked
    assert float(api.min_scale(good)) == 0.5
    assert float(api.min_scale({"kernel": jnp.ones(2)})) == np.inf

    per_channel = {"a": {"weight_scale": jnp.asarray([[0.5, 0.0, 0.2]])}}
    with pytest.raises(ValueError, match=r"^Quantizer scale a/weight_scale is 0.0 "):
        api.check_scales(per_channel)
    nan = {"b": {"input_scale": jnp.asarray(jnp.nan)}, "a": good["a"]}
    with pytest.raises(ValueError, match=r"b/input_scale is nan"):
        api.check_scales(nan)
    assert np.isnan(float(jax.jit(api.min_scale)(nan)))
    assert float(jax.jit(api.min_scale)(per_channel)) == 0.0
    with pytest.raises(ValueError, match="cannot run inside jit"):
        jax.jit(api.check_scales)(good)


# ----------------------------------------------------------------------------- trainer


def test_trainer_steps_trace_under_every_oscillation_setting():
    # The default run tracks without dampening.
    assert build.oscillation_settings(config_lib.base_config()).dampen is False
    variables = calibrated_variables()
    opt_fields = types.SimpleNamespace(
        lr=0.1,
        lr_final=0.0,
        warmup_steps=0,
        lr_per_epoch=False,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        quant_lr=1e-3,
        quant_weight_decay=0.0,
    )
    tx = optim.create_optimizer(
        opt_fields, total_steps=1, steps_per_epoch=1, train_quantizers=True
    ).tx
    state = step_lib.create_state(variables, tx, jax.random.PRNGKey(0))
    hparams = {
        k: jnp.float32(0.01)
        for k in ("model_lr", "quant_lr", "freeze_threshold", "dampening_weight")
    }
    for settings in (
        step_lib.OscillationSettings(),
        step_lib.OscillationSettings(track=False, dampen=False),
        step_lib.OscillationSettings(track=False, dampen=True),
        step_lib.OscillationSettings(track=True, dampen=True),
    ):
        config = step_lib.StepConfig(oscillations=settings)
        step = step_lib.make_train_step(RulesForward(MODEL), tx, config)
        new_state, _ = jax.eval_shape(step, state, (X, Y), hparams)  # raises if misconfigured
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


# ----------------------------------------------------------------------------- calibration


def test_calibrate_passes_keyword_arguments_to_the_model():
    # The model's keywords (train=) and apply's own (method=) reach the model.
    start = initial_variables()
    plain = calibrate(MODEL, start, [X[:64]])
    keyed = calibrate(MODEL, start, [X[:64]], train=False, method=MLP.__call__)
    jax.tree.map(np.testing.assert_array_equal, keyed, plain)
    # Negative control: batch statistics in BN change what the second layer's input sees.
    batch_bn = calibrate(MODEL, start, [X[:64]], train=True)
    assert float(batch_bn["params"]["out"]["input_scale"]) != float(
        plain["params"]["out"]["input_scale"]
    )
    with pytest.raises(ValueError, match=r"^batch 0 .* unexpected keyword argument 'no_such_arg"):
        calibrate(MODEL, start, [X[:64]], no_such_argument=1)


def test_calibrate_sets_the_estimators_scales_and_leaves_the_weights():
    floats = float_variables()
    assert sorted(floats) == ["batch_stats", "params"]
    assert sorted(floats["params"]["hidden"]) == ["bias", "kernel"]
    calibrated = calibrated_variables()
    assert sorted(calibrated) == ["batch_stats", "oscillation", "params", "quant_stats"]
    assert sorted(calibrated["params"]["hidden"]) == [
        "bias",
        "input_scale",
        "kernel",
        "weight_scale",
    ]
    assert sorted(calibrated["oscillation"]) == ["hidden"]
    # Calibration leaves the weights and BatchNorm alone.
    for collection in ("batch_stats", "params"):
        kept = floats[collection]
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            kept,
            {k: {n: calibrated[collection][k][n] for n in v} for k, v in kept.items()},
        )
    # The scales are those of the range estimators over both batches: the input scale of
    # the first layer is the MSE search over X[:64] and X[64:] (per tensor, signed data).
    state = ranges.mse_range_init(X[:64], n_bits=4, symmetric=True, signed=None)
    for xb in (X[:64], X[64:]):
        state = ranges.mse_range_accumulate(state, xb)
    x_min, x_max = ranges.mse_range_result(state)
    want = quant.symmetric_scale(x_min, x_max, n_bits=4, signed=True)
    np.testing.assert_allclose(calibrated["params"]["hidden"]["input_scale"], want, rtol=1e-6)
    # One batch gives a different scale (the test can tell the batches apart).
    one = calibrate(MODEL, initial_variables(), [X[:64]])
    hidden_scale = calibrated["params"]["hidden"]["input_scale"]
    assert float(one["params"]["hidden"]["input_scale"]) != float(hidden_scale)
    # The trainer's calibration, from the float variables, is this one.
    trainer = RulesForward(MODEL).calibrate(floats, [X[:64]], jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, trainer, one)
    # Tuple batches are positional inputs; no batches gets one sentence.
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, calibrate(MODEL, initial_variables(), [(X[:64],)]), one
    )
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(MODEL, initial_variables(), [])


# ----------------------------------------------------------------------------- static args


def test_traced_static_arguments_name_static_argnames():
    w, s = randn(0, (8,)), jnp.float32(0.1)
    with pytest.raises(
        ValueError, match=r'n_bits is a static argument.*static_argnames=\("n_bits", "signed"\)'
    ):
        jax.jit(quant.fake_quant)(w, s, n_bits=3, signed=True)
    with pytest.raises(ValueError, match=r"n_bits is a static argument.*functools.partial"):
        jax.jit(ranges.mse_range_init, static_argnames=("symmetric",))(w, n_bits=4)
    # The fix the message gives works and equals the eager call.
    jitted = jax.jit(quant.fake_quant, static_argnames=("n_bits", "signed"))
    np.testing.assert_array_equal(
        jitted(w, s, n_bits=3, signed=True), quant.fake_quant(w, s, n_bits=3, signed=True)
    )
    # Concrete bad values keep their own message.
    with pytest.raises(ValueError, match="must be between 2 and 16, got 17"):
        quant.fake_quant(w, s, n_bits=17, signed=True)
    from oscqat_jax import _checks

    with pytest.raises(ValueError, match=r"signed is a static argument.*Python bool"):
        jax.jit(lambda v: _checks.check_static_bool(v, "signed"))(True)
    assert _checks.check_static_bool(np.bool_(True), "signed") is True


# ----------------------------------------------------------------------------- defaults


def test_one_default_ema_momentum():
    m = oscillation.EMA_MOMENTUM
    assert m == 0.001  # the paper's value (docs/method.md §5)
    assert float(QuantContext.create().osc_momentum) == np.float32(m)
    create = inspect.signature(QuantContext.create).parameters["osc_momentum"].default
    assert create is m
    assert step_lib.OscillationSettings().momentum is m
    config = config_lib.base_config()
    assert config.osc_freeze.ema_momentum is m
    assert build.oscillation_settings(config).momentum is m
    # The rules path (oscqat_jax.nn.intercept) takes the same default.
    apply = inspect.signature(qnn.QuantizedModel.apply).parameters["osc_momentum"].default
    assert apply is m


def test_nn_reexports_the_public_api():
    for name in qnn.__all__:
        assert getattr(qnn, name) is not None, name
    assert qnn.QuantizedModel.__module__ == "oscqat_jax.nn.intercept"
    assert qnn.quant_optimizer is api.quant_optimizer
    with pytest.raises(AttributeError, match="no attribute 'quantise_model'"):
        qnn.quantise_model  # noqa: B018
