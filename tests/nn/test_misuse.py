"""Mistakes a user of the rules makes are told in one sentence at the first call where they
matter, on Linen (``quantize_model``) and NNX (``quantize_nnx``): rules that match nothing, a
pattern meant for one layer that matches several, quantizers used before calibration,
tracking state that is not carried from one train step to the next, a scale that went
non-positive, and a model's own ``*_scale`` parameter taken for a quantizer's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from oscqat_jax.nn import nnx_quant, param_labels
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import QuantRule, paper_rules

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
W4A4 = (QuantRule(".*", weight_bits=4, act_bits=4),)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv2")(x))
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


class NNXNet(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv1 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(nnx.relu(self.stem(x))))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def init(rules):
    qm = quantize_model(Net(), rules)
    return qm, qm.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            (QuantRule("fc"), QuantRule("cnv.*")),
            r"rules\[1\] \(module_path 'cnv\.\*'\) matches no site.*conv1 \(layer\)",
        ),
        (
            paper_rules(first_conv="Stem", classifier="fc"),
            r"module_path 'Stem'\) matches no site.*stem \(layer\)",
        ),
        (
            paper_rules(first_conv="stem|conv.", classifier="fc"),
            "meant for one layer but matches 3: stem, conv1, conv2",
        ),
        ((QuantRule(".*", weight_bits=None, act_bits=None),), "No rule quantizes any site"),
    ],
    ids=["typo", "paper_first_conv_typo", "paper_first_conv_too_wide", "nothing_quantized"],
)
def test_linen_rules_that_do_not_fit_the_model_are_refused_at_init(rules, message):
    qm = quantize_model(Net(), rules)
    with pytest.raises(ValueError, match=message):
        qm.init(jax.random.key(0), X)
    # plan() shows what the rules do without refusing, to debug them.
    assert isinstance(qm.plan(X), dict)


def test_nnx_rules_that_do_not_fit_the_model_are_refused_and_nothing_is_replaced():
    model = NNXNet()
    with pytest.raises(ValueError, match="module_path 'Stem'\\) matches no site"):
        nnx_quant.quantize_nnx(model, paper_rules(first_conv="Stem", classifier="fc"))
    assert not nnx_quant.quantized_modules(model)
    with pytest.raises(ValueError, match="meant for one layer but matches 2: conv1, stem"):
        nnx_quant.quantize_nnx(model, paper_rules(first_conv="stem|conv1", classifier="fc"))
    # A rule allowed to match nothing does not stop the others.
    nnx_quant.quantize_nnx(model, (QuantRule("head", sites="any"), *W4A4))
    assert set(nnx_quant.quantized_modules(model)) == {"stem", "conv1", "fc"}


def test_paper_rules_fit_the_model_they_are_written_for():
    qm, variables = init(paper_rules(first_conv="stem", classifier="fc"))
    assert set(variables["oscillation"]) == {"conv1", "conv2"}  # 8-bit stem and head untracked
    plan = qm.plan(X)
    assert plan["stem"].rule.module_path == "stem" and plan["stem"].weight.n_bits == 8
    assert plan["conv1"].rule.module_path == ".*" and not plan["conv1"].depthwise


def test_uncalibrated_quantizers_are_refused_in_train_and_eval():
    qm, variables = init(W4A4)
    for mode in ("eval", "train"):
        with pytest.raises(
            ValueError, match="input quantizer of layer stem has not been calibrated"
        ):
            qm.apply(variables, X, mode=mode)
    # float mode needs no calibration, and calibrating lifts the refusal.
    qm.apply(variables, X, mode="float")
    qm.apply(qm.calibrate(variables, [X]), X, mode="eval")

    model = nnx_quant.quantize_nnx(NNXNet(), W4A4)
    with pytest.raises(ValueError, match="Layer stem was quantized but not calibrated"):
        model(X)
    with pytest.raises(ValueError, match=r"quantizer of layer \w+ has not been calibrated"):
        nnx_quant.set_mode(model, "train")
    nnx_quant.set_mode(model, "float")
    model(X)
    nnx_quant.calibrate_nnx(model, [X])
    nnx_quant.set_mode(model, "train")
    model(X)


def test_tracking_state_that_is_not_carried_forward_is_told():
    qm, variables = init(W4A4)
    variables = qm.calibrate(variables, [X])
    _, aux = qm.apply(variables, X, mode="train")
    with pytest.raises(ValueError, match="did not advance between the steps; merge"):
        qm.apply(variables, X, mode="train")  # aux.updates dropped
    variables = {**variables, **aux.updates}
    _, aux = qm.apply(variables, X, mode="train")  # merged: fine
    qm.apply({**variables, **aux.updates}, X, mode="train")


def test_a_non_positive_scale_is_told_before_it_quantizes():
    qm, variables = init(W4A4)
    variables = qm.calibrate(variables, [X])
    params = jax.tree.map(lambda a: a, variables["params"])
    params["conv1"]["weight_scale"] = -params["conv1"]["weight_scale"]
    with pytest.raises(ValueError, match="Quantizer scale conv1/weight_scale is -"):
        qm.apply({**variables, "params": params}, X, mode="eval")

    model = nnx_quant.calibrate_nnx(nnx_quant.quantize_nnx(NNXNet(), W4A4), [X])
    model.conv1.weight_scale[...] = jnp.zeros(())
    with pytest.raises(ValueError, match="Quantizer scale conv1/weight_scale is 0"):
        nnx_quant.set_mode(model, "train")


class Clip(nn.Module):
    """A model with its own ``*_scale`` parameters that are nobody's quantizer's."""

    @nn.compact
    def __call__(self, x):
        logit_scale = self.param("logit_scale", nn.initializers.ones, ())
        input_scale = self.param("temperature_scale", nn.initializers.ones, ())
        return nn.Dense(3, name="fc")(x) * logit_scale * input_scale


def test_parameters_are_labelled_quantizers_only_when_a_quantizer_made_them():
    x = jnp.ones((2, 4))
    qm = quantize_model(Clip(), W4A4)
    params = qm.init(jax.random.key(0), x)["params"]
    labels = param_labels(params)
    assert labels["logit_scale"] == "weights" and labels["temperature_scale"] == "weights"
    assert labels["fc"] == {
        "kernel": "weights",
        "bias": "weights",
        "weight_scale": "quantizer",
        "input_scale": "quantizer",
    }
    # A model's own weight_scale beside no kernel is the model's.
    assert param_labels({"norm": {"weight_scale": 1.0}})["norm"]["weight_scale"] == "weights"
    # The labels drive the optimizer: a large weight step leaves the quantizer's scales alone.
    tx = optax.multi_transform(
        {"weights": optax.sgd(1.0), "quantizer": optax.set_to_zero()}, labels
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["logit_scale"]) == -1.0 and float(updates["fc"]["input_scale"]) == 0.0
    # NNX state: the same labels.
    model = nnx_quant.quantize_nnx(NNXNet(), W4A4)
    nnx_labels = param_labels(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert (
        nnx_labels["stem"]["weight_scale"] == "quantizer"
        and nnx_labels["stem"]["kernel"] == "weights"
    )


def test_calibrating_a_linen_model_that_was_never_quantized_is_refused_in_one_sentence():
    from oscqat_jax.nn import calibrate

    variables = Net().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"^calibrate got the Linen model Net, which has no ") as e:
        calibrate(Net(), variables, [X])
    assert "quantize_model(model, rules)" in str(e.value) and "\n" not in str(e.value)
    # Control: the same model quantized calibrates.
    qm = quantize_model(Net(), W4A4)
    assert "quant_stats" in calibrate(qm, qm.init(jax.random.key(0), X), [X])
