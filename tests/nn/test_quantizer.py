"""Tests of oscqat_jax.nn.quantizer in a model quantized by rules: oscillation tracking only in
train mode, freezing (no kernel gradient to frozen weights, the scale's kept), and range
calibration against oscqat_jax.ranges. (A changing freezing threshold without recompiling is
test_intercept.py's.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import apply, init, kernel_init, randn, replace, tracked_conv

from oscqat_jax import oscillation, quant, ranges
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import QuantRule


def osc_state(variables):
    return oscillation.OscillationState(**variables["oscillation"])


# ----------------------------------------------------------------------------- tracking


def test_tracking_advances_only_in_train_mode():
    model, x, variables = tracked_conv()
    p = variables["params"]
    w_int = quant.to_int(p["kernel"], p["weight_scale"], n_bits=4, signed=True)
    # A state whose previous integers differ from the current ones, so an update shows.
    variables = replace(
        variables, "oscillation", prev_int=w_int + 1, prev_dir=-jnp.ones_like(w_int, jnp.int8)
    )
    before = osc_state(variables)
    for mode in ("eval", "float"):
        _, mutated = apply(model, variables, x, mode=mode, mutable=["oscillation"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, osc_state(mutated), before)

    _, aux = apply(model, variables, x, mode="train", osc_momentum=0.1)
    _, want = oscillation.update(before, w_int, momentum=0.1, freeze_threshold=0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, osc_state(aux.updates), want)
    assert float(jnp.sum(osc_state(aux.updates).ema_osc)) > 0

    # Calibration restarts the state from the new integer weights.
    recalibrated = model.calibrate(variables, [2 * x])
    new_scale = recalibrated["params"]["weight_scale"]
    new_int = quant.to_int(p["kernel"], new_scale, n_bits=4, signed=True)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, osc_state(recalibrated), oscillation.init(new_int)
    )


def test_freezing_stops_kernel_gradient_but_not_scale_gradient():
    model, x, variables = tracked_conv()
    ema_osc = jnp.where(randn(5, (3, 3, 3, 4)) > 0.5, 0.3, 0.0)
    variables = replace(variables, "oscillation", ema_osc=ema_osc)
    hparams = {"freeze_threshold": jnp.float32(0.2), "osc_momentum": jnp.float32(0.01)}
    _, aux = apply(model, variables, x, mode="train", **hparams)
    frozen = np.asarray(aux.updates["oscillation"]["frozen"])
    np.testing.assert_array_equal(frozen, ema_osc * 0.99 > 0.2)
    assert 0 < frozen.sum() < frozen.size
    variables = {**variables, **aux.updates}

    def loss(params):
        y, _ = apply(model, {**variables, "params": params}, x, mode="train", **hparams)
        return jnp.sum(y * randn(6, y.shape))

    grads = jax.grad(loss)(variables["params"])
    kernel_grad = np.asarray(grads["kernel"])
    assert np.all(kernel_grad[frozen] == 0)
    assert np.count_nonzero(kernel_grad[~frozen]) > 0.5 * (~frozen).sum()
    assert np.all(np.asarray(grads["weight_scale"]) != 0)


# ----------------------------------------------------------------------------- calibration


def _core_range(method, batches, *, channel_axis=None, signed=None, symmetric=True):
    if method == "current_minmax":
        return ranges.current_minmax(batches[-1], channel_axis=channel_axis)
    if method == "running_minmax":
        prev = None
        for xb in batches:
            prev = ranges.running_minmax(xb, prev, channel_axis=channel_axis)
        return prev
    state = ranges.mse_range_init(
        batches[0], n_bits=4, symmetric=symmetric, signed=signed, channel_axis=channel_axis
    )
    for xb in batches:
        state = ranges.mse_range_accumulate(state, xb)
    return ranges.mse_range_result(state)


@pytest.mark.parametrize("method", ["mse", "running_minmax", "current_minmax"])
@pytest.mark.parametrize("relu", [True, False])
def test_calibration_sets_the_core_scales(method, relu):
    batches = [randn(10 + i, (8, 6)) for i in range(2)]
    if relu:
        batches = [jax.nn.relu(xb) for xb in batches]
    rule = QuantRule(
        ".*", per_channel=True, weight_range_method=method, act_range_method=method, track=False
    )
    model = quantize_model(nn.Dense(3, kernel_init=kernel_init), (rule,))
    variables = model.calibrate(init(model, batches[0]), batches)

    x_min, x_max = _core_range(method, batches)
    signed = bool(x_min < 0)
    assert bool(variables["quant_stats"]["input_signed"]) == signed == (not relu)
    in_scale = quant.symmetric_scale(x_min, x_max, n_bits=4, signed=signed)
    np.testing.assert_allclose(variables["params"]["input_scale"], in_scale, rtol=1e-6)

    kernel = variables["params"]["kernel"]
    w_min, w_max = _core_range(method, [kernel] * 2, channel_axis=-1, signed=True)
    w_scale = quant.symmetric_scale(w_min, w_max, n_bits=4, signed=True)
    assert variables["params"]["weight_scale"].shape == (1, 3)
    np.testing.assert_allclose(variables["params"]["weight_scale"], w_scale, rtol=1e-6)


def test_asymmetric_calibration_and_downstream_layers_see_quantized_inputs():
    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, kernel_init=kernel_init, name="first")(x)
            return nn.Dense(2, kernel_init=kernel_init, name="second")(x)

    rules = (
        QuantRule("first", weight_bits=None, act_symmetric=False),
        QuantRule("second", weight_bits=None, act_range_method="current_minmax"),
    )
    model = quantize_model(TwoLayers(), rules)
    x = randn(0, (8, 6))
    variables = model.calibrate(init(model, x), [x])
    first = variables["params"]["first"]
    x_min, x_max = _core_range("mse", [x], symmetric=False)
    scale, zero_point = quant.asymmetric_scale(x_min, x_max, n_bits=4)
    np.testing.assert_allclose(first["input_scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(first["input_zero_point"], zero_point, rtol=1e-6)
    hidden = quant.fake_quant(x, scale, zero_point, n_bits=4, signed=False) @ first["kernel"]
    hidden = hidden + first["bias"]
    h_min, h_max = ranges.current_minmax(hidden)
    np.testing.assert_allclose(
        variables["params"]["second"]["input_scale"],
        quant.symmetric_scale(h_min, h_max, n_bits=4, signed=True),
        rtol=1e-5,
    )
