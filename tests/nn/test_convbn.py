"""ConvBN, the conv + BatchNorm site: plain behaviour, the folded site's statistics and
kernel, what the rules see, the depth-wise fast path in float mode; and the tied use of an
ActQuant hook (``update_range=False``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax import quant
from oscqat_jax.nn.bn import reestimate_bn
from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.intercept import ActQuant, quantize_model
from oscqat_jax.nn.rules import QuantRule

EPS = 1e-5
M = 0.9


def randn(seed, shape, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(shift + scale * rng.standard_normal(shape), jnp.float32)


X = randn(0, (4, 6, 6, 3), shift=0.5)


class Net(nn.Module):
    """One ConvBN site (3x3, 3 -> 5 channels, stride 1)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvBN(5, (3, 3), padding=1, name="cb")(x, train)


def variables_with_statistics(model, x=X):
    """``model.init``'s variables (a Module or a QuantizedModel) with non-trivial BN."""
    v = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a, v["params"])
    params["cb"]["bn"] = {"scale": randn(1, (5,), 0.3, 1.0), "bias": randn(2, (5,), 0.1)}
    stats = {"cb": {"bn": {"mean": randn(3, (5,), 0.2), "var": randn(4, (5,), 0.2, 1.5) ** 2}}}
    return {**v, "params": params, "batch_stats": stats}


def conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def normalise(y, mean, var, bn):
    return (y - mean) * bn["scale"] / jnp.sqrt(var + EPS) + bn["bias"]


def test_without_rules_it_is_conv_then_the_package_batchnorm():
    v = variables_with_statistics(Net())
    kernel, bn = v["params"]["cb"]["conv"]["kernel"], v["params"]["cb"]["bn"]
    stats = v["batch_stats"]["cb"]["bn"]
    y = conv(X, kernel)
    eval_out = Net().apply(v, X)
    np.testing.assert_allclose(
        eval_out, normalise(y, stats["mean"], stats["var"], bn), rtol=1e-5, atol=1e-5
    )
    train_out, updated = Net().apply(v, X, train=True, mutable=["batch_stats"])
    mean, biased = y.mean((0, 1, 2)), y.var((0, 1, 2))
    np.testing.assert_allclose(train_out, normalise(y, mean, biased, bn), rtol=1e-5, atol=1e-5)
    n = y.size // 5
    new = updated["batch_stats"]["cb"]["bn"]
    # PyTorch's running variance: the unbiased batch variance (Flax would use the biased one).
    np.testing.assert_allclose(
        new["var"], M * stats["var"] + (1 - M) * biased * n / (n - 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        new["mean"], M * stats["mean"] + (1 - M) * mean, rtol=1e-6, atol=1e-7
    )


def folded_by_hand(v, x, n_bits, *, train):
    """``conv(x, q(kernel * mul)) + beta - mean * mul`` with the statistics of the mode."""
    kernel, bn = v["params"]["cb"]["conv"]["kernel"], v["params"]["cb"]["bn"]
    y = conv(x, kernel)
    if train:
        mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
    else:
        mean, var = v["batch_stats"]["cb"]["bn"]["mean"], v["batch_stats"]["cb"]["bn"]["var"]
    mul = bn["scale"] / jnp.sqrt(var + EPS)
    scale = v["params"]["cb"]["weight_scale"]
    w_q = quant.fake_quant(kernel * mul, scale, n_bits=n_bits, signed=True)
    return conv(x, w_q) + bn["bias"] - mean * mul


@pytest.mark.parametrize("train", [False, True])
def test_a_folding_rule_quantizes_the_kernel_folded_with_the_modes_statistics(train):
    rules = (QuantRule("cb", weight_bits=3, act_bits=None, per_channel=True, fold_bn=True),)
    qm = quantize_model(Net(), rules)
    v = qm.calibrate(variables_with_statistics(qm), [X], train=False)
    assert v["params"]["cb"]["weight_scale"].shape == (1, 1, 1, 5)
    if train:
        out, _ = qm.apply(v, X, train=True, mode="train", mutable=["batch_stats"])
    else:
        out = qm.apply(v, X)
    np.testing.assert_allclose(out, folded_by_hand(v, X, 3, train=train), rtol=1e-5, atol=1e-5)
    # Negative control: the other mode's statistics give another output.
    other = folded_by_hand(v, X, 3, train=not train)
    assert float(jnp.max(jnp.abs(out - other))) > 1e-2


def test_without_folding_the_raw_kernel_is_quantized_and_bn_stays_float():
    qm = quantize_model(Net(), (QuantRule("cb", weight_bits=3, act_bits=None),))
    v = qm.calibrate(variables_with_statistics(qm), [X], train=False)
    kernel, bn = v["params"]["cb"]["conv"]["kernel"], v["params"]["cb"]["bn"]
    w_q = quant.fake_quant(kernel, v["params"]["cb"]["weight_scale"], n_bits=3, signed=True)
    stats = v["batch_stats"]["cb"]["bn"]
    want = normalise(conv(X, w_q), stats["mean"], stats["var"], bn)
    np.testing.assert_allclose(qm.apply(v, X), want, rtol=1e-5, atol=1e-5)


def test_the_site_is_the_convbn_and_its_inner_conv_is_none():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return ConvBN(3, (3, 3), feature_group_count=3, name="dw")(x, train)

    plan = quantize_model(Depthwise(), (QuantRule(".*", weight_bits=4),)).plan(X)
    assert list(plan) == ["dw"]
    assert plan["dw"].kind == "conv_bn" and plan["dw"].depthwise


@pytest.mark.parametrize(("impl", "grouped_conv"), [("shifted", False), ("lax", True)])
def test_float_depthwise_convs_take_the_models_implementation(impl, grouped_conv):
    model = ConvBN(3, (3, 3), padding=1, feature_group_count=3, depthwise_impl=impl)
    v = model.init(jax.random.key(0), X)
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(v, X))
    assert ("conv_general_dilated" in jaxpr) == grouped_conv


class TiedHook(nn.Module):
    """A hook quantizes ``x``, then the mean of ``x`` with the same quantizer (``tied``)."""

    update_twice: bool = False

    @nn.compact
    def __call__(self, x):
        hook = ActQuant(name="hook")
        y = hook(x)
        return y, hook(x.mean(axis=(1, 2)), update_range=self.update_twice)


class OneHook(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ActQuant(name="hook")(x)


RULES = (QuantRule("hook", weight_bits=None, act_bits=None, output_bits=4),)


def test_a_tied_call_uses_the_hooks_scale_without_updating_its_range():
    once = quantize_model(TiedHook(), RULES)
    v = once.calibrate(once.init(jax.random.key(0), X), [X])
    assert int(v["quant_stats"]["hook"]["output_range"]["num_batches"]) == 1
    alone = quantize_model(OneHook(), RULES)
    w = alone.calibrate(alone.init(jax.random.key(0), X), [X])
    assert v["params"]["hook"]["output_scale"] == w["params"]["hook"]["output_scale"]
    _, pooled = once.apply(v, X)
    scale = v["params"]["hook"]["output_scale"]
    signed = v["quant_stats"]["hook"]["output_signed"]
    want = quant.fake_quant(X.mean(axis=(1, 2)), scale, n_bits=4, signed=signed)
    np.testing.assert_array_equal(pooled, want)
    # Negative control: a second call that updates the range counts the batch twice.
    twice = quantize_model(TiedHook(update_twice=True), RULES)
    v2 = twice.calibrate(twice.init(jax.random.key(0), X), [X])
    assert int(v2["quant_stats"]["hook"]["output_range"]["num_batches"]) == 2


@pytest.mark.parametrize("fold_bn", [False, True])
def test_bn_reestimation_switches_a_plain_or_folded_site_to_batch_statistics(fold_bn):
    qm = quantize_model(Net(), (QuantRule("cb", weight_bits=8, act_bits=None, fold_bn=fold_bn),))
    v = qm.calibrate(variables_with_statistics(qm), [X], train=False)
    out = reestimate_bn(qm, v, [X, X + 1.0], train=False)["batch_stats"]["cb"]["bn"]
    # Folded, BN's statistics are those of the float conv; unfolded, of the quantized one.
    kernel = v["params"]["cb"]["conv"]["kernel"]
    if not fold_bn:
        kernel = quant.fake_quant(kernel, v["params"]["cb"]["weight_scale"], n_bits=8, signed=True)
    ys = [conv(x, kernel) for x in (X, X + 1.0)]
    n = ys[0].size // 5
    np.testing.assert_allclose(out["mean"], np.mean([y.mean((0, 1, 2)) for y in ys], 0), rtol=1e-5)
    unbiased = np.mean([y.var((0, 1, 2)) * n / (n - 1) for y in ys], 0)
    np.testing.assert_allclose(out["var"], unbiased, rtol=1e-5)
