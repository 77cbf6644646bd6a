"""Tests of oscqat_jax.nn.layers: the variables a layer creates, its float modes against plain
Flax, its quantized forward against the core's fake-quant composition, bfloat16 compute, folded
against unfolded BatchNorm, and the errors of bad configurations."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from nn_helpers import (
    TRACKED,
    W4_PC,
    QConv,
    QConvBN,
    QDense,
    apply,
    ctx,
    init,
    randn,
    replace,
    shapes_and_dtypes,
    tracked_conv,
)

from oscqat_jax import oscillation, quant, ranges
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import LayerQuant, QuantizerSpec

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, strides=(1, 1), groups=1):
    return lax.conv_general_dilated(
        x, w, strides, "SAME", dimension_numbers=DN, feature_group_count=groups
    )


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
        plain = ctx(mode, dampen=False, track_oscillations=False)
        np.testing.assert_allclose(apply(layer, variables, x, plain), y, rtol=1e-6, atol=1e-6)

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
    plain_train = ctx("train", dampen=False, track_oscillations=False)
    np.testing.assert_allclose(apply(dense, dense_vars, flat, plain_train), want, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_grid():
    x = randn(0, (2, 5, 5, 3))
    layer = QConv(4, 3, quant=TRACKED, dtype=jnp.bfloat16)
    variables = init(layer, x, ctx("eval"))
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(variables["params"])} == {"float32"}
    plain_train = ctx("train", dampen=False, track_oscillations=False)
    y = apply(layer, variables, x, plain_train)
    assert y.dtype == jnp.bfloat16
    y32 = apply(layer.clone(dtype=None), variables, x, plain_train)
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------- folded BatchNorm


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
