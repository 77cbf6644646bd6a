"""Tests for the Flax quantized layers (oscqat_jax.nn.layers, batchnorm, quantizer, collect)."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from oscqat_jax import dampening, oscillation, quant, ranges
from oscqat_jax.nn import collect
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.layers import QuantConv, QuantConvBN, QuantDense

W4_PC = QuantizerSpec(4, per_channel=True)
TRACKED = LayerQuant(weight=W4_PC, input=QuantizerSpec(4), track_oscillations=True)
OSC_FIELDS = oscillation.OscillationState._fields
DN = ("NHWC", "HWIO", "NHWC")


@functools.cache
def _jitted(module, mutable, method):
    def run(variables, *args):
        return module.apply(variables, *args, mutable=list(mutable) or False, method=method)

    return jax.jit(run)


def apply(module, variables, *args, mutable=(), method=None):
    """``module.apply`` compiled once per module, mutable set and method (faster than eager)."""
    return _jitted(module, tuple(mutable), method)(variables, *args)


@functools.cache
def _jitted_init(module):
    return jax.jit(module.init)


def init(module, *args, seed=1):
    """``module.init`` compiled once per module."""
    return _jitted_init(module)(jax.random.key(seed), *args)


def ctx(mode, **kwargs):
    return QuantContext.create(mode, **kwargs)


def randn(seed, shape):
    # NumPy rather than jax.random: compiling threefry for every shape costs seconds on CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def kernel_init(key, shape, dtype=jnp.float32):
    """A fixed pseudo-random kernel (same reason as ``randn``)."""
    del key
    return 0.3 * randn(sum(shape), shape).astype(dtype)


QConv = functools.partial(QuantConv, kernel_init=kernel_init)
QConvBN = functools.partial(QuantConvBN, kernel_init=kernel_init)
QDense = functools.partial(QuantDense, kernel_init=kernel_init)


def replace(variables, collection, **values):
    """A copy of ``variables`` with top-level entries of ``collection`` replaced."""
    out = {k: dict(v) for k, v in variables.items()}
    out[collection].update({k: jnp.asarray(v) for k, v in values.items()})
    return out


def osc_state(variables):
    return oscillation.OscillationState(**variables["oscillation"])


def conv(x, w, strides=(1, 1), groups=1):
    return lax.conv_general_dilated(
        x, w, strides, "SAME", dimension_numbers=DN, feature_group_count=groups
    )


def tracked_conv():
    layer = QConv(4, 3, quant=TRACKED)
    x = randn(0, (2, 5, 5, 3))
    return layer, x, init(layer, x, ctx("eval"))


def shapes_and_dtypes(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree)


# ----------------------------------------------------------------------------- init layout


def test_init_creates_the_documented_variables():
    layer, x, variables = tracked_conv()
    f32 = "float32"
    assert shapes_and_dtypes(variables) == {
        "params": {
            "kernel": ((3, 3, 3, 4), f32),
            "weight_scale": ((1, 1, 1, 4), f32),
            "input_scale": ((), f32),
        },
        "quant_stats": {"input_signed": ((), "bool")},
        "oscillation": shapes_and_dtypes(oscillation.init(jnp.zeros((3, 3, 3, 4))))._asdict(),
    }
    kernel = variables["params"]["kernel"]
    expected_scale = quant.symmetric_scale(
        *ranges.current_minmax(kernel, channel_axis=-1), n_bits=4, signed=True
    )
    np.testing.assert_allclose(variables["params"]["weight_scale"], expected_scale, rtol=1e-6)
    w_int = quant.to_int(kernel, expected_scale, n_bits=4, signed=True)
    np.testing.assert_array_equal(variables["oscillation"]["prev_int"], w_int)
    assert bool(variables["quant_stats"]["input_signed"])

    asym = QuantizerSpec(8, symmetric=False)
    dense = QDense(5, quant=LayerQuant(weight=asym, input=asym, output=QuantizerSpec(8)))
    dense_vars = init(dense, jnp.ones((2, 3)), ctx("float_eval"))
    assert shapes_and_dtypes(dense_vars) == {
        "params": {
            "kernel": ((3, 5), f32),
            "bias": ((5,), f32),
            "weight_scale": ((), f32),
            "weight_zero_point": ((), f32),
            "input_scale": ((), f32),
            "input_zero_point": ((), f32),
            "output_scale": ((), f32),
        },
        "quant_stats": {"input_signed": ((), "bool"), "output_signed": ((), "bool")},
    }
    assert not bool(dense_vars["quant_stats"]["input_signed"])  # asymmetric: unsigned grid

    conv_bn = QConvBN(4, 1, use_bias=True)
    assert shapes_and_dtypes(init(conv_bn, x, ctx("train"))) == {
        "params": {
            "kernel": ((1, 1, 3, 4), f32),
            "bias": ((4,), f32),
            "bn": {"scale": ((4,), f32), "bias": ((4,), f32)},
        },
        "batch_stats": {"bn": {"mean": ((4,), f32), "var": ((4,), f32)}},
    }


# ----------------------------------------------------------------------------- float modes


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_float_modes_equal_plain_flax_conv(groups):
    x = randn(0, (2, 6, 6, 6))
    layer = QConv(6, 3, strides=2, feature_group_count=groups, use_bias=True, quant=TRACKED)
    variables = init(layer, x, ctx("eval"))
    variables = replace(variables, "params", bias=randn(2, (6,)))
    reference = nn.Conv(6, (3, 3), strides=2, feature_group_count=groups, padding="SAME")
    want = apply(reference, {"params": {k: variables["params"][k] for k in ("kernel", "bias")}}, x)
    for mode in ("float_train", "float_eval"):
        np.testing.assert_allclose(
            apply(layer, variables, x, ctx(mode)), want, rtol=1e-5, atol=1e-5
        )


def test_float_modes_equal_plain_flax_dense_and_batchnorm():
    x = randn(0, (4, 3))
    layer = QDense(5, quant=TRACKED)
    variables = init(layer, x, ctx("eval"))
    variables = replace(variables, "params", bias=randn(2, (5,)))
    want = apply(
        nn.Dense(5), {"params": {k: variables["params"][k] for k in ("kernel", "bias")}}, x
    )
    np.testing.assert_array_equal(apply(layer, variables, x, ctx("float_eval")), want)

    y = 3.0 + 2.0 * randn(3, (2, 4, 4, 5))
    bn_vars = {
        "params": {"scale": randn(4, (5,)), "bias": randn(5, (5,))},
        "batch_stats": {"mean": randn(6, (5,)), "var": jnp.exp(randn(7, (5,)))},
    }
    ours, ours_mut = apply(
        BatchNorm(momentum=0.8), bn_vars, y, ctx("float_train"), mutable=["batch_stats"]
    )
    theirs, theirs_mut = apply(
        nn.BatchNorm(False, momentum=0.8), bn_vars, y, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    ours_stats, theirs_stats = ours_mut["batch_stats"], theirs_mut["batch_stats"]
    np.testing.assert_allclose(ours_stats["mean"], theirs_stats["mean"], rtol=1e-6)
    # The running variance takes the unbiased batch variance (PyTorch); Flax's is biased.
    n = 2 * 4 * 4
    biased = (theirs_stats["var"] - 0.8 * bn_vars["batch_stats"]["var"]) / 0.2
    np.testing.assert_allclose(
        ours_stats["var"],
        0.8 * bn_vars["batch_stats"]["var"] + 0.2 * biased * n / (n - 1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        apply(BatchNorm(), bn_vars, y, ctx("float_eval")),
        apply(nn.BatchNorm(True), bn_vars, y),
        rtol=1e-5,
        atol=1e-5,
    )


# ----------------------------------------------------------------------------- train forward


def test_train_output_equals_core_fake_quant_composition():
    x = jax.nn.relu(randn(0, (2, 5, 5, 3)))
    spec = LayerQuant(
        weight=W4_PC, input=QuantizerSpec(4), output=QuantizerSpec(8, symmetric=False)
    )
    layer = QConv(4, 3, use_bias=True, quant=spec)
    variables = init(layer, x, ctx("eval"))
    variables = replace(
        variables,
        "params",
        bias=randn(2, (4,)),
        input_scale=0.21,
        output_scale=0.05,
        output_zero_point=97.3,
    )
    variables = replace(variables, "quant_stats", input_signed=False)
    p = variables["params"]
    x_q = quant.fake_quant(x, p["input_scale"], n_bits=4, signed=False)
    w_q = quant.fake_quant(p["kernel"], p["weight_scale"], n_bits=4, signed=True)
    y = quant.fake_quant(
        conv(x_q, w_q) + p["bias"], 0.05, p["output_zero_point"], n_bits=8, signed=False
    )
    for mode in ("train", "eval"):
        np.testing.assert_allclose(apply(layer, variables, x, ctx(mode)), y, rtol=1e-6, atol=1e-6)

    dense = QDense(3, quant=spec)
    flat = x.reshape(2, -1)
    dense_vars = init(dense, flat, ctx("eval"))
    dp = dense_vars["params"]
    want = (
        quant.fake_quant(flat, 1.0, n_bits=4, signed=True)
        @ quant.fake_quant(dp["kernel"], dp["weight_scale"], n_bits=4, signed=True)
        + dp["bias"]
    )
    want = quant.fake_quant(want, 1.0, 0.0, n_bits=8, signed=False)
    np.testing.assert_allclose(apply(dense, dense_vars, flat, ctx("train")), want, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_grid():
    x = randn(0, (2, 5, 5, 3))
    layer = QConv(4, 3, quant=TRACKED, dtype=jnp.bfloat16)
    variables = init(layer, x, ctx("eval"))
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(variables["params"])} == {"float32"}
    y = apply(layer, variables, x, ctx("train"))
    assert y.dtype == jnp.bfloat16
    y32 = apply(layer.clone(dtype=None), variables, x, ctx("train"))
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=5e-2)


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
        layer, variables, x, ctx("train", osc_momentum=0.1), mutable=["oscillation", "batch_stats"]
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
    train = ctx("train", freeze_threshold=0.2, osc_momentum=0.01)
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


# ----------------------------------------------------------------------------- dampening, export


@pytest.mark.parametrize("aggregation", ["kernel_mean", "sum"])
def test_sown_dampening_equals_core_loss_with_frozen_weights(aggregation):
    layer, x, variables = tracked_conv()
    frozen = randn(3, (3, 3, 3, 4)) > 0.8
    variables = replace(
        variables, "oscillation", frozen=frozen, frozen_int=jnp.full(frozen.shape, 2.0)
    )
    p = variables["params"]
    want = dampening.dampening_loss(
        p["kernel"],
        p["weight_scale"],
        n_bits=4,
        signed=True,
        aggregation=aggregation,
        frozen=frozen,
        frozen_int=variables["oscillation"]["frozen_int"],
    )
    train = ctx("train", dampening_aggregation=aggregation)
    _, mutated = apply(layer, variables, x, train, mutable=["oscillation", "dampening"])
    np.testing.assert_allclose(collect.dampening_total(mutated), want, rtol=1e-6)
    _, mutated = apply(layer, variables, x, ctx("eval"), mutable=["dampening"])
    assert collect.dampening_total(mutated) == 0


class _Net(nn.Module):
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, context):
        x = QConvBN(4, 3, quant=TRACKED, fold_bn=self.fold_bn, name="conv")(x, context)
        asym = LayerQuant(weight=QuantizerSpec(8, symmetric=False), input=QuantizerSpec(8))
        return QDense(2, quant=asym, name="head")(jnp.mean(x, axis=(1, 2)), context)


def test_quantized_weights_reconstruct_the_forward_weights_and_dampening_sums_layers():
    model, x = _Net(), randn(0, (2, 5, 5, 3))
    variables = init(model, x, ctx("eval"))
    frozen = randn(3, (3, 3, 3, 4)) > 0.8
    variables["oscillation"] = {
        "conv": {
            **variables["oscillation"]["conv"],
            "frozen": frozen,
            "frozen_int": jnp.full(frozen.shape, -3.0),
        }
    }
    exported = collect.quantized_weights(model, variables, x, ctx("train"))
    assert sorted(exported) == ["conv", "head"]
    conv_q, head_q = exported["conv"], exported["head"]
    assert conv_q.int_weight.dtype == np.int8 and conv_q.zero_point is None
    assert (conv_q.n_bits, head_q.n_bits, head_q.signed) == (4, 8, True)
    np.testing.assert_array_equal(conv_q.int_weight[frozen], -3)

    params = variables["params"]
    state = oscillation.OscillationState(**variables["oscillation"]["conv"])
    p = quant.quant_params(
        params["conv"]["weight_scale"], x_shape=frozen.shape, n_bits=4, signed=True
    )
    conv_w = quant.dequantize_with(
        oscillation.apply_frozen(state, quant.to_int_with(params["conv"]["kernel"], p)), p
    )
    np.testing.assert_allclose(conv_q.scale * conv_q.int_weight, conv_w, rtol=1e-6)
    head = params["head"]
    head_w = quant.fake_quant(
        head["kernel"], head["weight_scale"], head["weight_zero_point"], n_bits=8, signed=True
    )
    np.testing.assert_allclose(
        head_q.scale * (head_q.int_weight - head_q.zero_point), head_w, rtol=1e-6
    )

    _, mutated = apply(model, variables, x, ctx("train"), mutable=["batch_stats", "dampening"])
    want = dampening.dampening_loss(
        params["conv"]["kernel"],
        params["conv"]["weight_scale"],
        n_bits=4,
        signed=True,
        frozen=frozen,
        frozen_int=state.frozen_int,
    ) + dampening.dampening_loss(
        head["kernel"], head["weight_scale"], head["weight_zero_point"], n_bits=8, signed=True
    )
    np.testing.assert_allclose(collect.dampening_total(mutated), want, rtol=1e-6)

    summary = collect.oscillation_summary(variables["oscillation"])
    assert list(summary["per_layer"]) == ["conv"]
    np.testing.assert_allclose(summary["overall"]["frozen"], frozen.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- BatchNorm


def test_bn_stats_mode_and_reestimation_match_numpy():
    bn = BatchNorm()
    batches = [1.0 + randn(20 + i, (3, 4, 4, 5)) * (i + 1) for i in range(2)]
    variables = init(bn, batches[0], ctx("eval"))
    sown = []
    for xb in batches:
        y, mutated = apply(
            bn, variables, xb, ctx("bn_stats"), mutable=["bn_batch_stats", "batch_stats"]
        )
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, mutated["batch_stats"], variables["batch_stats"]
        )
        xn = np.asarray(xb, np.float64)
        want = (xn - xn.mean((0, 1, 2))) / np.sqrt(xn.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        sown.append(mutated["bn_batch_stats"])
    stats = collect.reestimated_batch_stats(sown)
    arrays = [np.asarray(xb, np.float64) for xb in batches]
    np.testing.assert_allclose(
        stats["mean"], np.mean([a.mean((0, 1, 2)) for a in arrays], 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        stats["var"], np.mean([a.var((0, 1, 2), ddof=1) for a in arrays], 0), rtol=1e-5
    )

    model, x = _Net(), randn(0, (2, 5, 5, 3))
    net_vars = init(model, x, ctx("eval"))
    _, mutated = apply(model, net_vars, x, ctx("bn_stats"), mutable=["bn_batch_stats"])
    reestimated = collect.reestimated_batch_stats([mutated["bn_batch_stats"]])
    assert shapes_and_dtypes(reestimated) == shapes_and_dtypes(net_vars["batch_stats"])


def test_folded_bn_equals_unfolded_with_quantizers_off_and_folds_before_quantizing():
    x = randn(0, (2, 5, 5, 3))
    unfolded = QConvBN(4, 3, use_bias=True, quant=TRACKED)
    folded = unfolded.clone(fold_bn=True)
    variables = init(unfolded, x, ctx("eval"))
    variables["params"] = {
        **variables["params"],
        "bias": randn(2, (4,)),
        "bn": {"scale": randn(3, (4,)), "bias": randn(4, (4,))},
    }
    variables["batch_stats"] = {"bn": {"mean": randn(5, (4,)), "var": jnp.exp(randn(6, (4,)))}}
    np.testing.assert_allclose(
        apply(folded, variables, x, ctx("float_eval")),
        apply(unfolded, variables, x, ctx("float_eval")),
        rtol=1e-5,
        atol=1e-5,
    )
    y_f, mut_f = apply(folded, variables, x, ctx("float_train"), mutable=["batch_stats"])
    y_u, mut_u = apply(unfolded, variables, x, ctx("float_train"), mutable=["batch_stats"])
    np.testing.assert_allclose(y_f, y_u, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), mut_f, mut_u)

    p, stats = variables["params"], variables["batch_stats"]["bn"]
    mul = p["bn"]["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    w_q = quant.fake_quant(p["kernel"] * mul, p["weight_scale"], n_bits=4, signed=True)
    x_q = quant.fake_quant(x, p["input_scale"], n_bits=4, signed=True)
    want = conv(x_q, w_q) + p["bn"]["bias"] + (p["bias"] - stats["mean"]) * mul
    np.testing.assert_allclose(apply(folded, variables, x, ctx("eval")), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_configurations_raise_clear_errors():
    x = randn(0, (1, 4, 4, 6))
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        init(QConv(6, 3, feature_group_count=6, depthwise_impl="fast"), x, ctx("eval"))
    with pytest.raises(ValueError, match="feature_group_count 4 must divide"):
        init(QConv(8, 3, feature_group_count=4), x, ctx("eval"))
    with pytest.raises(ValueError, match="activations are quantized per tensor"):
        init(QConv(4, 3, quant=LayerQuant(input=W4_PC)), x, ctx("eval"))
    with pytest.raises(ValueError, match="its weight is not quantized"):
        init(QDense(2, quant=LayerQuant(track_oscillations=True)), x, ctx("eval"))
    layer, x, variables = tracked_conv()
    with pytest.raises(ValueError, match="calibrate mode needs the collections"):
        apply(layer, variables, x, ctx("calibrate"), mutable=["quant_stats"])
    wrong_kernel = replace(variables, "params", kernel=jnp.zeros((3, 3, 2, 4)))
    with pytest.raises(flax.errors.ScopeParamShapeError, match="kernel"):
        apply(layer, wrong_kernel, x, ctx("eval"))
    without_osc = {k: v for k, v in variables.items() if k != "oscillation"}
    with pytest.raises(ValueError, match="pass the model's 'oscillation' collection"):
        apply(layer, without_osc, x, ctx("eval"))
