"""Quantization rules: validation, matching, and the paper's setups written as rules.

The setups test walks every quantization site of the package's MobileNetV2 (``quant_plan``:
path, role and the ``LayerQuant`` that ``QuantSetup.layer_quant`` gives it) and asks the rules
of ``paper_rules`` for the same site, so the two tables cannot drift apart. A site of the
package is a conv/dense layer (kernel and input from the layer's rule) plus, in the output
setups, the activation after its BN and ReLU6: in a plain model that is an ``ActQuant`` hook,
named here ``<layer path>_act``; residual adds and pooling are hooks at the site's own path.
"""

from __future__ import annotations

import dataclasses

import pytest

from oscqat_jax.models.common import quant_plan
from oscqat_jax.models.mobilenet_v2 import MobileNetV2
from oscqat_jax.nn.config import FLOAT, LayerQuant, QuantizerSpec
from oscqat_jax.nn.rules import (
    QuantRule,
    check_rules,
    find_rule,
    hook_site_quant,
    layer_site_quant,
    paper_rules,
)
from oscqat_jax.nn.setups import SETUPS, WEIGHT_ROLES, QuantSetup

# Two stages are enough for every role (the second stage's repeat has a residual add); the
# head conv is then features_4.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2))
HEAD = "features_4"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(module_path="conv("), "not a valid regular expression"),
        (dict(module_path=3), "module_path must be a regular expression string"),
        (dict(weight_bits=1), "weight_bits must be between 2 and 16"),
        (dict(act_bits=4.0), "act_bits must be a Python int"),
        (dict(output_bits=17), "output_bits must be between 2 and 16"),
        (dict(depthwise="yes"), "depthwise must be True, False or None"),
        (dict(per_channel=1), "per_channel must be True or False"),
        (dict(track=None), "track must be True or False"),
        (dict(weight_range_method="max"), "weight_range_method must be one of mse"),
        (dict(max_bits=-1), "max_bits must be between 0 and 16"),
    ],
)
def test_bad_fields_raise_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantRule(**kwargs)


def test_rules_must_be_a_sequence_of_rules():
    with pytest.raises(ValueError, match="wrap it in a list"):
        check_rules(QuantRule())
    with pytest.raises(ValueError, match=r"rules\[1\] must be a QuantRule, got dict"):
        check_rules([QuantRule(), {"module_path": ".*"}])


def test_matching_is_a_full_match_and_the_first_rule_wins():
    dense, conv = QuantRule("head", weight_bits=8), QuantRule("block_.*/conv", weight_bits=3)
    rules = (dense, conv, QuantRule(".*", weight_bits=4))
    assert find_rule(rules, "head") is dense
    assert find_rule(rules, "head/inner").weight_bits == 4  # not a prefix match
    assert find_rule(rules, "block_2/conv") is conv
    assert find_rule(rules, "my_block_2/conv").weight_bits == 4  # not a search
    assert find_rule(rules[:2], "stem") is None
    assert layer_site_quant(rules[:2], "stem", depthwise=False) == LayerQuant()


def test_depthwise_filter():
    only_dw = QuantRule(".*", weight_bits=8, depthwise=True)
    not_dw = QuantRule(".*", weight_bits=2, depthwise=False)
    assert find_rule((only_dw, not_dw), "b/dw", depthwise=True) is only_dw
    assert find_rule((only_dw, not_dw), "b/pw", depthwise=False) is not_dw
    assert find_rule((only_dw,), "b/pw") is None
    assert find_rule((not_dw,), "b/dw", depthwise=True) is None
    # Hooks are never depth-wise convs.
    assert hook_site_quant((QuantRule(output_bits=4, depthwise=True),), "act") == FLOAT


def test_layer_quant_specs_tracking_and_dampening():
    rule = QuantRule(
        weight_bits=3,
        act_bits=6,
        output_bits=5,
        per_channel=True,
        act_symmetric=False,
        weight_range_method="current_minmax",
        grad_scale=True,
    )
    quant = rule.layer_quant()
    assert quant.weight == QuantizerSpec(
        3, per_channel=True, range_method="current_minmax", grad_scale=True
    )
    assert quant.input == QuantizerSpec(6, symmetric=False, grad_scale=True)
    assert quant.output == QuantizerSpec(5, symmetric=False, grad_scale=True)
    assert quant.track_oscillations and quant.dampen
    assert not QuantRule(weight_bits=5).layer_quant().track_oscillations  # above max_bits
    assert QuantRule(weight_bits=5, max_bits=8).layer_quant().track_oscillations
    assert not QuantRule(weight_bits=None).layer_quant().track_oscillations
    assert not QuantRule(track=False).layer_quant().track_oscillations
    assert not QuantRule(dampen=False).layer_quant().dampen
    # A layer ignores output_bits (its output goes through BN/activation first).
    assert layer_site_quant((rule,), "x", depthwise=False).output == FLOAT
    assert hook_site_quant((rule,), "x") == quant.output


def package_sites(setup: QuantSetup) -> dict[str, tuple[str, LayerQuant]]:
    model = MobileNetV2(
        num_classes=10, width_multiplier=0.25, quant_setup=setup, block_setting=BLOCKS
    )
    return quant_plan(model, (1, 32, 32, 3))


def rules_site(rules, path: str, role: str) -> LayerQuant:
    """The LayerQuant the rules give the package's site ``path`` (see the module docstring)."""
    if role in WEIGHT_ROLES:
        layer = layer_site_quant(rules, path, depthwise=role == "depthwise")
        return dataclasses.replace(layer, output=hook_site_quant(rules, f"{path}_act"))
    return LayerQuant(output=hook_site_quant(rules, path))


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize(
    "options",
    [
        dict(n_bits=4),
        dict(n_bits=3, n_bits_act=6, per_channel=True, act_symmetric=False, max_bits=3),
    ],
)
def test_paper_rules_reproduce_every_site_of_the_setup(setup, options):
    quant_setup = QuantSetup(setup, **options)
    rules = paper_rules(
        setup,
        **options,
        first_conv="features_0",
        classifier="classifier",
        head_output=f"{HEAD}_act|pool",
        logits="classifier_act",
    )
    sites = package_sites(quant_setup)
    roles = {role for role, _ in sites.values()}
    assert {"first_conv", "conv", "depthwise", "head", "classifier", "residual", "pool"} <= roles
    assert sites[HEAD][0] == "head"
    for path, (role, want) in sites.items():
        assert rules_site(rules, path, role) == want, f"{setup}: site {path} ({role})"


def test_negative_control_a_rule_list_without_the_depthwise_rule_drifts():
    rules = paper_rules("fc4_dw8", first_conv="features_0", classifier="classifier")
    no_dw = tuple(r for r in rules if r.depthwise is not True)
    sites = package_sites(QuantSetup("fc4_dw8"))
    wrong = [p for p, (role, want) in sites.items() if rules_site(no_dw, p, role) != want]
    assert wrong and all(sites[p][0] == "depthwise" for p in wrong)


def test_conv_and_residual_outputs_share_bits_in_every_setup():
    # paper_rules lets one generic rule serve conv-output and residual hooks.
    for name in SETUPS:
        for n, a in ((4, None), (3, 5)):
            setup = QuantSetup(name, n, a)
            conv, residual = setup.layer_quant("", "conv"), setup.layer_quant("", "residual")
            assert conv.output == residual.output


def test_lsq_needs_the_head_hooks_and_float_has_no_rules():
    with pytest.raises(ValueError, match="pass head_output="):
        paper_rules("LSQ", first_conv="stem", classifier="fc")
    assert paper_rules("float", first_conv="stem", classifier="fc") == ()
    with pytest.raises(ValueError, match="^setup must be one of"):  # the argument's own name
        paper_rules("W4A4", first_conv="stem", classifier="fc")


def test_lsq_paper_rules_at_a_glance():
    rules = paper_rules("LSQ_paper", 4, first_conv="stem", classifier="fc")
    stem = layer_site_quant(rules, "stem", depthwise=False)
    assert (stem.weight.n_bits, stem.input.n_bits, stem.track_oscillations) == (8, None, False)
    fc = layer_site_quant(rules, "fc", depthwise=False)
    assert (fc.weight.n_bits, fc.input.n_bits) == (8, 8)
    inner = layer_site_quant(rules, "block/conv", depthwise=True)
    assert (inner.weight.n_bits, inner.input.n_bits, inner.track_oscillations) == (4, 4, True)
    assert hook_site_quant(rules, "block/act") == FLOAT
