"""``setup_rules``: a QuantSetup (options and overrides) as rules gives every site of a plain
model the quantizers that ``QuantSetup.layer_quant`` gives a site of its role. The plans are
traced abstractly (nothing compiled), on a cut-down MobileNetV2 and ResNet-18.

Every site and its paper role come from ``nn_helpers.paper_roles``; a layer's output is its
hook ``<p>_out``. The pooled features are re-quantized by the hook that fed the
pooling (a tied call), so they are no site of their own.
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from nn_helpers import paper_roles

from oscqat_jax import models as families
from oscqat_jax.nn.config import FLOAT, LayerQuant
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.setup_rules import setup_rules
from oscqat_jax.nn.setups import SETUPS, QuantSetup

SHAPE = jax.ShapeDtypeStruct((1, 32, 32, 3), "float32")
OVERRIDES = {
    "none": (),
    "weight_only": (("*", None, "float"),),
    "depthwise_8": (("*depthwise*", 8, None),),
    "block_2": (("features_2/*", "float", 6),),
    # A later override wins where both match; each changes only its own field.
    "composed": (
        ("features_2/*", 6, None),
        ("*project*", None, 8),
        ("features_2/project", 3, None),
    ),
}
OPTIONS = {
    "3-5 per-channel": dict(n_bits=3, n_bits_act=5, per_channel=True),
    "3-6 asymmetric": dict(n_bits=3, n_bits_act=6, act_symmetric=False, max_bits=3),
}


def model(family: str):
    if family == "mobilenet_v2":
        return families.MobileNetV2(
            num_classes=10,
            width_multiplier=0.25,
            block_setting=families.mobilenet_v2.SMALL_INPUT_SETTING[:2],
        )
    return families.ResNet(
        depth=18, num_classes=10, width_multiplier=0.125, stage_sizes=(1, 1, 1, 2)
    )


def site_quant(got: dict, path: str, role: str) -> LayerQuant:
    """What the rules' plan ``got`` gives the site ``path``: a layer's weight, input and
    tracking with its hook's output, or a hook's output (float where the plan has no entry)."""

    def output(p):
        return got[p].output if p in got else FLOAT

    if role in ("residual", "head_residual"):
        return LayerQuant(output=output(path))
    layer = got.get(path, LayerQuant())
    return LayerQuant(layer.weight, layer.input, output(f"{path}_out"), layer.track_oscillations)


def strip(quant: LayerQuant) -> LayerQuant:
    return LayerQuant(quant.weight, quant.input, quant.output, quant.track_oscillations)


def mismatches(family: str, setup: QuantSetup, rules=None) -> tuple[dict, dict]:
    """``({path: role} of the sites where rules disagree with setup.layer_quant, {path: role}
    of every site})``; ``rules`` default to ``setup_rules``'s."""
    net = model(family)
    rules = setup_rules(setup, net.quant_sites()) if rules is None else rules
    got = quantize_model(net, rules).plan(SHAPE) if rules else {}
    site_roles = paper_roles(net, SHAPE)
    wrong = {
        path: role
        for path, role in site_roles.items()
        if site_quant(got, path, role) != strip(setup.layer_quant(path, role))
    }
    return wrong, site_roles


CASES = [
    *(("mobilenet_v2", o, "3-5 per-channel") for o in OVERRIDES),
    ("mobilenet_v2", "none", "3-6 asymmetric"),
    ("mobilenet_v2", "composed", "3-6 asymmetric"),
    ("resnet18", "none", "3-5 per-channel"),
    ("resnet18", "weight_only", "3-5 per-channel"),
    ("resnet18", "none", "3-6 asymmetric"),
]


@pytest.mark.parametrize(("family", "overrides", "options"), CASES)
@pytest.mark.parametrize("setup", SETUPS)
def test_setup_rules_give_every_site_the_setups_quantizers(family, overrides, options, setup):
    quant_setup = QuantSetup(setup, **OPTIONS[options], overrides=OVERRIDES[overrides])
    wrong, site_roles = mismatches(family, quant_setup)
    if setup == "LSQ_paper" and overrides in ("block_2", "composed"):
        # The documented difference (setup_rules module docstring): residual hooks stay float.
        wrong = {p: r for p, r in wrong.items() if r != "residual"}
    assert not wrong
    want_roles = {"first_conv", "conv", "head", "classifier", "residual"}
    want_roles |= {"depthwise"} if family == "mobilenet_v2" else {"head_residual"}
    assert want_roles <= set(site_roles.values())
    assert len(site_roles) >= 10


def test_negative_controls_a_missing_depthwise_rule_or_an_override_in_the_wrong_field():
    setup = QuantSetup("fc4_dw8", 4)
    rules = setup_rules(setup, model("mobilenet_v2").quant_sites())
    no_dw = tuple(r for r in rules if r.depthwise is not True)
    wrong, _ = mismatches("mobilenet_v2", setup, no_dw)
    assert wrong and set(wrong.values()) == {"depthwise"}

    setup = QuantSetup("all", 4, overrides=(("*project*", None, 8),))
    wrong_field = dataclasses.replace(setup, overrides=(("*project*", 8, None),))
    wrong, _ = mismatches(
        "mobilenet_v2", setup, setup_rules(wrong_field, model("mobilenet_v2").quant_sites())
    )
    assert wrong and all("project" in p for p in wrong)
