"""Tests of oscqat_jax.nn.collect's group statistics: layer groups, oscillating, frozen and
still-active fractions, and the mismatch of running and re-estimated BN statistics; then
the dampening loss a model sows and the quantized weights it exports."""

import jax.numpy as jnp
import numpy as np
import pytest
from nn_helpers import apply, quantized_net, randn, replace, tracked_conv

from oscqat_jax import dampening, oscillation, quant
from oscqat_jax.nn import collect


def _state(ema_osc, frozen):
    ema_osc = np.asarray(ema_osc, np.float32)
    zeros = np.zeros_like(ema_osc)
    return oscillation.OscillationState(
        prev_int=zeros,
        prev_dir=zeros.astype(np.int8),
        ema_osc=ema_osc,
        ema_int=zeros,
        frozen=np.asarray(frozen, bool),
        frozen_int=zeros,
        freezing_started=np.asarray(True),
    )


DW = {"block/depthwise"}  # the depth-wise layer of _collection (its states are not kernels)


def _collection():
    # Four depth-wise weights, six others over two layers; level 0.1.
    dw = _state([0.5, 0.2, 0.05, 0.1], [True, False, False, False])
    pw_a = _state([0.3, 0.0, 0.11], [False, True, True])
    pw_b = _state([0.0, 0.0, 0.9], [False, False, False])
    return {
        "block": {"depthwise": dw._asdict(), "project": pw_a._asdict()},
        "head": pw_b._asdict(),
    }


def test_layer_groups_follow_the_depthwise_name():
    assert collect.layer_group("features_2/depthwise") == "depthwise"
    assert collect.layer_group("features_2/depthwise/bn") == "depthwise"
    assert collect.layer_group("features_2/project") == "pointwise"
    assert collect.layer_group("stem") == "pointwise"


def test_layer_groups_follow_the_given_depthwise_layers():
    given = {"blocks/0", "mixer"}
    assert collect.layer_group("blocks/0", given) == "depthwise"
    assert collect.layer_group("mixer/bn", given) == "depthwise"
    assert collect.layer_group("mixer_bn", given) == "pointwise"  # a sibling, not inside
    assert collect.layer_group("blocks/01", given) == "pointwise"
    assert collect.layer_group("features_2/depthwise", set()) == "pointwise"  # no name rule


def test_oscillating_and_frozen_fractions_per_group():
    groups = collect.oscillation_groups(_collection(), level=0.1, depthwise=DW)
    # ema_osc > level strictly: 0.1 itself does not count.
    assert groups["oscillating/depthwise"] == pytest.approx(2 / 4)
    assert groups["frozen/depthwise"] == pytest.approx(1 / 4)
    assert groups["oscillating/pointwise"] == pytest.approx(3 / 6)
    assert groups["frozen/pointwise"] == pytest.approx(2 / 6)


def test_active_oscillations_leave_frozen_weights_out():
    active = collect.active_oscillations(_collection(), level=0.1, depthwise=DW)
    assert active["active/depthwise"] == pytest.approx(1 / 4)  # 0.2 only; 0.5 is frozen
    assert active["active/pointwise"] == pytest.approx(2 / 6)  # 0.3 and 0.9; 0.11 is frozen
    assert active["active/all"] == pytest.approx(3 / 10)  # over elements, not layer means


def test_a_group_without_layers_is_absent():
    only_pw = {"head": _state([0.3], [False])._asdict()}
    assert set(collect.oscillation_groups(only_pw, 0.1)) == {
        "oscillating/pointwise",
        "frozen/pointwise",
    }
    assert collect.active_oscillations(only_pw, 0.1) == {"active/pointwise": 1.0, "active/all": 1.0}


def test_bn_mismatch_by_hand():
    eps = 1e-5
    running = {
        "a": {"depthwise": {"bn": {"mean": np.array([1.0, 0.0]), "var": np.array([4.0, 1.0])}}},
        "b": {"bn": {"mean": np.array([0.5]), "var": np.array([1.0])}},
        "c": {"bn": {"mean": np.array([0.0]), "var": np.array([1.0])}},
    }
    reestimated = {
        "a": {"depthwise": {"bn": {"mean": np.array([0.0, 0.0]), "var": np.array([1.0, 1.0])}}},
        "b": {"bn": {"mean": np.array([0.0]), "var": np.array([4.0])}},
        "c": {"bn": {"mean": np.array([0.0]), "var": np.array([1.0])}},
    }
    out = collect.bn_mismatch(running, reestimated, epsilon=eps)
    s1 = np.sqrt(1 + eps)
    s4 = np.sqrt(4 + eps)
    # Depth-wise layer: channel shifts |1-0|/s1 and 0; std errors |s4/s1-1| and 0.
    assert out["bn_mean_shift/depthwise"] == pytest.approx((1 / s1 + 0) / 2)
    assert out["bn_std_error/depthwise"] == pytest.approx((abs(s4 / s1 - 1) + 0) / 2)
    # Other layers: mean over layers of the per-layer means (b, then c with no mismatch).
    assert out["bn_mean_shift/pointwise"] == pytest.approx((0.5 / s4 + 0.0) / 2)
    assert out["bn_std_error/pointwise"] == pytest.approx((abs(s1 / s4 - 1) + 0.0) / 2)


def test_identical_statistics_have_no_mismatch():
    stats = {"x": {"depthwise": {"bn": {"mean": np.arange(3.0), "var": np.ones(3)}}}}
    out = collect.bn_mismatch(stats, stats)
    assert out == {"bn_mean_shift/depthwise": 0.0, "bn_std_error/depthwise": 0.0}


# ----------------------------------------------------------------------------- dampening, export


@pytest.mark.parametrize("aggregation", ["kernel_mean", "sum"])
def test_sown_dampening_equals_core_loss_with_frozen_weights(aggregation):
    model, x, variables = tracked_conv()
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
    static = (("dampening_aggregation", aggregation),)
    _, aux = apply(model, variables, x, mode="train", static=static)
    np.testing.assert_allclose(aux.dampening, want, rtol=1e-6)


def test_quantized_weights_reconstruct_the_forward_weights_and_dampening_sums_layers():
    model, x, variables = quantized_net()
    frozen = randn(3, (3, 3, 3, 4)) > 0.8
    variables["oscillation"] = {
        "conv": {
            **variables["oscillation"]["conv"],
            "frozen": frozen,
            "frozen_int": jnp.full(frozen.shape, -3.0),
        }
    }
    exported = collect.quantized_weights(model, variables, x)
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
        oscillation.apply_frozen(state, quant.to_int_with(params["conv"]["conv"]["kernel"], p)), p
    )
    np.testing.assert_allclose(conv_q.scale * conv_q.int_weight, conv_w, rtol=1e-6)
    head = params["head"]
    head_w = quant.fake_quant(
        head["kernel"], head["weight_scale"], head["weight_zero_point"], n_bits=8, signed=True
    )
    np.testing.assert_allclose(
        head_q.scale * (head_q.int_weight - head_q.zero_point), head_w, rtol=1e-6
    )

    static = (("train", True),)
    _, aux = apply(model, variables, x, mode="train", mutable=["batch_stats"], static=static)
    want = dampening.dampening_loss(
        params["conv"]["conv"]["kernel"],
        params["conv"]["weight_scale"],
        n_bits=4,
        signed=True,
        frozen=frozen,
        frozen_int=state.frozen_int,
    ) + dampening.dampening_loss(
        head["kernel"], head["weight_scale"], head["weight_zero_point"], n_bits=8, signed=True
    )
    np.testing.assert_allclose(aux.dampening, want, rtol=1e-6)

    summary = collect.oscillation_summary(variables["oscillation"])
    assert list(summary["per_layer"]) == ["conv"]
    np.testing.assert_allclose(summary["overall"]["frozen"], frozen.mean(), rtol=1e-6)
