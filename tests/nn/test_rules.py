"""Quantization rules: validation, matching, and the paper's setups written as rules. That the
rules of every setup give each site of the plain families what ``QuantSetup.layer_quant``
gives its role is test_setup_rules.py's."""

from __future__ import annotations

import pytest

from oscqat_jax.nn.config import FLOAT, LayerQuant, QuantizerSpec
from oscqat_jax.nn.rules import (
    QuantRule,
    check_rules,
    find_rule,
    hook_site_quant,
    layer_site_quant,
    paper_rules,
)
from oscqat_jax.nn.setups import SETUPS, QuantSetup


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
