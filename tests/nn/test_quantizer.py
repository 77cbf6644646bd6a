"""Tests of oscqat_jax.nn.quantizer inside a layer: oscillation tracking only in train mode,
freezing (no kernel gradient to frozen weights, the scale's kept), a changing freezing
threshold without recompiling, and range calibration against oscqat_jax.ranges."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import QDense, apply, ctx, init, randn, replace, tracked_conv

from oscqat_jax import oscillation, quant, ranges
from oscqat_jax.nn.config import LayerQuant, QuantizerSpec


def osc_state(variables):
    return oscillation.OscillationState(**variables["oscillation"])


# ----------------------------------------------------------------------------- tracking


def test_tracking_advances_only_in_train_mode_with_mutable_oscillation():
    layer, x, variables = tracked_conv()
    p = variables["params"]
    w_int = quant.to_int(p["kernel"], p["weight_scale"], n_bits=4, signed=True)
    # A state whose previous integers differ from the current ones, so an update shows.
    variables = replace(
        variables, "oscillation", prev_int=w_int + 1, prev_dir=-jnp.ones_like(w_int, jnp.int8)
    )
    before = osc_state(variables)
    for mode in ("eval", "bn_stats", "float_train"):
        _, mutated = apply(layer, variables, x, ctx(mode), mutable=["oscillation"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, osc_state(mutated), before)

    _, mutated = apply(
        layer,
        variables,
        x,
        ctx("train", osc_momentum=0.1, dampen=False),
        mutable=["oscillation", "batch_stats"],
    )
    _, want = oscillation.update(before, w_int, momentum=0.1, freeze_threshold=0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, osc_state(mutated), want)
    assert float(jnp.sum(osc_state(mutated).ema_osc)) > 0

    # Calibration restarts the state from the new integer weights.
    _, mutated = apply(
        layer, variables, x, ctx("calibrate"), mutable=["params", "quant_stats", "oscillation"]
    )
    new_int = quant.to_int(p["kernel"], mutated["params"]["weight_scale"], n_bits=4, signed=True)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, osc_state(mutated), oscillation.init(new_int)
    )


def test_freezing_stops_kernel_gradient_but_not_scale_gradient():
    layer, x, variables = tracked_conv()
    ema_osc = jnp.where(randn(5, (3, 3, 3, 4)) > 0.5, 0.3, 0.0)
    variables = replace(variables, "oscillation", ema_osc=ema_osc)
    train = ctx("train", freeze_threshold=0.2, osc_momentum=0.01, dampen=False)
    _, mutated = apply(layer, variables, x, train, mutable=["oscillation"])
    frozen = np.asarray(mutated["oscillation"]["frozen"])
    np.testing.assert_array_equal(frozen, ema_osc * 0.99 > 0.2)
    assert 0 < frozen.sum() < frozen.size
    variables = {**variables, **mutated}

    def loss(params):
        y, _ = apply(layer, {**variables, "params": params}, x, train, mutable=["oscillation"])
        return jnp.sum(y * randn(6, y.shape))

    grads = jax.grad(loss)(variables["params"])
    kernel_grad = np.asarray(grads["kernel"])
    assert np.all(kernel_grad[frozen] == 0)
    assert np.count_nonzero(kernel_grad[~frozen]) > 0.5 * (~frozen).sum()
    assert np.all(np.asarray(grads["weight_scale"]) != 0)


def test_changing_freeze_threshold_does_not_recompile():
    layer, x, variables = tracked_conv()
    traces = []

    @jax.jit
    def step(variables, context):
        traces.append(1)
        return layer.apply(variables, x, context, mutable=["oscillation", "dampening"])

    for f_th, momentum in [(0.0, 0.01), (0.1, 0.01), (0.05, 0.001)]:
        _, mutated = step(variables, ctx("train", freeze_threshold=f_th, osc_momentum=momentum))
        variables = {**variables, "oscillation": mutated["oscillation"]}
    assert len(traces) == 1


# ----------------------------------------------------------------------------- calibration


def _calibrate(layer, variables, batches):
    mutable = ["params", "quant_stats", "oscillation"]
    for xb in batches:
        _, mutated = apply(layer, variables, xb, ctx("calibrate"), mutable=mutable)
        variables = {**variables, **mutated}
    return variables


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
    spec = QuantizerSpec(4, range_method=method)
    layer = QDense(3, quant=LayerQuant(weight=QuantizerSpec(4, True, True, method), input=spec))
    variables = init(layer, batches[0], ctx("eval"))
    variables = _calibrate(layer, variables, batches)

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
        def __call__(self, x, context):
            asym = QuantizerSpec(4, symmetric=False, range_method="mse")
            x = QDense(4, quant=LayerQuant(input=asym), name="first")(x, context)
            spec = QuantizerSpec(4, range_method="current_minmax")
            return QDense(2, quant=LayerQuant(input=spec), name="second")(x, context)

    model = TwoLayers()
    x = randn(0, (8, 6))
    variables = _calibrate(model, init(model, x, ctx("eval")), [x])
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
