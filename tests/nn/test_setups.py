"""Tests of oscqat_jax.nn.setups: what each quant setup quantizes, overrides and bad input.
The roles are those of the plain MobileNetV2's sites (``nn_helpers.paper_roles``); how its
rules carry them out is test_setup_rules.py's."""

import re

import jax
import pytest
from nn_helpers import paper_roles

from oscqat_jax import models as families
from oscqat_jax.nn.setups import ROLES, SETUPS, QuantSetup

N_BITS, N_BITS_ACT = 3, 5  # distinct, so a weight/activation mix-up shows
SITES = {
    "first_conv": "features_0",
    "depthwise": "features_2/depthwise",
    "residual": "features_3/residual",
    "head": "features_18",
    "pool": "pool",
    "classifier": "classifier",
}

# (weight, input, output) bits of each site per setup; None = float. From docs/method.md §4 and the
# reference's setups (output quantizers everywhere except LSQ_paper, which quantizes inputs).
EXPECTED = {
    "LSQ_paper": {
        "first_conv": (8, None, None),
        "depthwise": (3, 5, None),
        "residual": (None, None, None),
        "head": (3, 5, None),
        "pool": (None, None, None),
        "classifier": (8, 8, None),
    },
    "all": {
        "first_conv": (3, None, 5),
        "depthwise": (3, None, 5),
        "residual": (None, None, 5),
        "head": (3, None, 5),
        "pool": (None, None, 5),
        "classifier": (3, None, 5),
    },
    "FP_logits": {
        "first_conv": (3, None, 5),
        "depthwise": (3, None, 5),
        "residual": (None, None, 5),
        "head": (3, None, 5),
        "pool": (None, None, 5),
        "classifier": (3, None, None),
    },
    "LSQ": {
        "first_conv": (8, None, 5),
        "depthwise": (3, None, 5),
        "residual": (None, None, 5),
        "head": (3, None, 8),
        "pool": (None, None, 8),
        "classifier": (8, None, None),
    },
    "fc4": {
        "first_conv": (8, None, 5),
        "depthwise": (3, None, 5),
        "residual": (None, None, 5),
        "head": (3, None, 5),
        "pool": (None, None, 5),
        "classifier": (4, None, 5),
    },
    "fc4_dw8": {
        "first_conv": (8, None, 5),
        "depthwise": (8, None, 5),
        "residual": (None, None, 5),
        "head": (3, None, 5),
        "pool": (None, None, 5),
        "classifier": (4, None, 5),
    },
    "float": {site: (None, None, None) for site in SITES},
}


def bits(layer_quant):
    return (layer_quant.weight.n_bits, layer_quant.input.n_bits, layer_quant.output.n_bits)


@pytest.fixture(scope="module")
def roles() -> dict[str, str]:
    """MobileNetV2's ``{site path: role}``; the model's sites and roles do not depend on the setup."""
    model = families.MobileNetV2(num_classes=10, width_multiplier=1.0)
    return paper_roles(model, jax.ShapeDtypeStruct((1, 32, 32, 3), "float32"))


def test_expected_covers_every_setup():
    assert set(EXPECTED) == set(SETUPS)


@pytest.mark.parametrize("name", SETUPS)
def test_setup_on_mobilenet_v2(name, roles):
    setup = QuantSetup(name=name, n_bits=N_BITS, n_bits_act=N_BITS_ACT)
    for role, path in SITES.items():
        # The pooled features are no site of the model (the head's hook re-quantizes them).
        assert roles.get(path, "pool") == role, path
        layer_quant = setup.layer_quant(path, role)
        assert bits(layer_quant) == EXPECTED[name][role], (name, path)
        weight_bits = EXPECTED[name][role][0]
        assert layer_quant.quantized == any(b is not None for b in EXPECTED[name][role])
        # Only weights at <= 4 bits (max_bits) are tracked: never the 8-bit ones.
        assert layer_quant.track_oscillations == (weight_bits is not None and weight_bits <= 4)


def test_mobilenet_v2_roles(roles):
    assert [p for p, r in roles.items() if r == "first_conv"] == ["features_0"]
    assert [p for p, r in roles.items() if r == "head"] == ["features_18"]
    assert [p for p, r in roles.items() if r == "classifier"] == ["classifier"]
    assert sorted(p for p, r in roles.items() if r == "depthwise") == sorted(
        f"features_{i}/depthwise" for i in range(1, 18)
    )
    # Residual connections where stride is 1 and channels match (torchvision's rule).
    residual_blocks = {
        int(p.split("/")[0].split("_")[1]) for p, r in roles.items() if r == "residual"
    }
    assert residual_blocks == {3, 5, 6, 8, 9, 10, 12, 13, 15, 16}
    assert roles["features_1/project"] == roles["features_2/expand"] == "conv"
    assert len(roles) == 52 + 1 + 10  # convs, classifier, residual adds


def test_per_channel_and_range_methods_reach_the_specs():
    setup = QuantSetup(
        per_channel=True,
        weight_range_method="current_minmax",
        act_range_method="running_minmax",
        grad_scale=True,
    )
    layer_quant = setup.layer_quant("features_2/depthwise", "depthwise")
    assert layer_quant.weight.per_channel and not layer_quant.input.per_channel
    assert layer_quant.weight.range_method == "current_minmax"
    assert layer_quant.input.range_method == "running_minmax"
    assert layer_quant.weight.grad_scale and layer_quant.input.grad_scale


def test_n_bits_act_defaults_to_n_bits_and_max_bits_controls_tracking():
    layer_quant = QuantSetup(n_bits=3).layer_quant("features_2/expand", "conv")
    assert bits(layer_quant) == (3, 3, None) and layer_quant.track_oscillations
    assert not QuantSetup(n_bits=3, max_bits=2).layer_quant("x", "conv").track_oscillations
    assert QuantSetup(max_bits=8).layer_quant("features_0", "first_conv").track_oscillations


def test_overrides_by_path_pattern():
    setup = QuantSetup(
        n_bits=4,
        overrides=(
            ("features_*", 6, None),
            ("features_2/*", 5, None),  # later entries win
            ("features_1/*", None, 8),
            ("features_0", "float", None),
            ("features_3/residual", 2, 7),  # weight bits ignored: the add has no weight
            ("classifier", None, "float"),
        ),
    )
    assert bits(setup.layer_quant("features_4/expand", "conv")) == (6, 4, None)
    assert bits(setup.layer_quant("features_2/depthwise", "depthwise")) == (5, 4, None)
    assert bits(setup.layer_quant("features_1/depthwise", "depthwise")) == (6, 8, None)
    assert bits(setup.layer_quant("features_0", "first_conv")) == (None, None, None)
    assert bits(setup.layer_quant("features_3/residual", "residual")) == (None, None, 7)
    assert bits(setup.layer_quant("classifier", "classifier")) == (8, None, None)
    assert not setup.layer_quant("features_4/expand", "conv").track_oscillations  # 6 > 4
    # In output-quantizing setups act_bits moves the output quantizer.
    out = QuantSetup(name="all", overrides=(("features_5/*", None, 8),))
    assert bits(out.layer_quant("features_5/expand", "conv")) == (4, None, 8)


def one_sentence(message: str) -> bool:
    return (
        message.endswith(".") and "\n" not in message and len(re.findall(r"\. [A-Z]", message)) == 0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="LSQ-paper"), "quant_setup must be one of LSQ_paper, all"),
        (dict(n_bits=1), "n_bits must be between 2 and 16"),
        (dict(n_bits=17), "n_bits must be between 2 and 16"),
        (dict(n_bits_act=32), "n_bits_act must be between 2 and 16"),
        (dict(n_bits=4.0), "n_bits must be a Python int"),
        (dict(weight_range_method="minmax"), "weight_range_method must be one of mse"),
        (dict(max_bits=-1), "max_bits must be between 0 and 16"),
        (
            dict(overrides=(("features_*", 1, None),)),
            "weight_bits of override 'features_\\*' must be between 2 and 16",
        ),
        (
            dict(overrides=(("features_*", None, "fp32"),)),
            "act_bits of override 'features_\\*' must be an int",
        ),
        (dict(overrides=(("features_*", 4),)), "each override must be a"),
    ],
)
def test_bad_setups_give_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        QuantSetup(**kwargs)
    assert one_sentence(str(info.value)), str(info.value)


def test_bad_role_gives_one_sentence():
    with pytest.raises(ValueError, match="role must be one of first_conv") as info:
        QuantSetup().layer_quant("features_0", "stem")
    assert one_sentence(str(info.value))
    assert "stem" not in ROLES


def test_setups_are_hashable_values():
    # Flax module attributes: equal setups must compare and hash equal.
    a = QuantSetup(overrides=[("a*", 4, None)])
    b = QuantSetup(overrides=(("a*", 4, None),))
    assert a == b and hash(a) == hash(b)
