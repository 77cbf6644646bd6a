"""Tests of oscqat_jax.nn.collect's oscillation summaries on models written outside the
package: a Linen model quantized by rules and an NNX model (layers inside an ``nnx.List``),
whose depth-wise conv is called ``mixer`` / ``blocks/0``, never ``depthwise``: the groups come
from the layers' structure. Fractions are checked against states set by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from user_models import images, linen_quantized, nnx_quantized

from oscqat_jax.nn import collect, nnx_quant


@pytest.fixture(scope="module")
def linen():
    return linen_quantized()


def _set_by_hand(collection: dict, layer: str, ema_osc: float, frozen_every: int) -> dict:
    """``collection`` with ``layer``'s ``ema_osc`` all ``ema_osc`` and every
    ``frozen_every``-th weight (C order) frozen."""
    state = dict(collection[layer])
    shape = np.shape(state["ema_osc"])
    state["ema_osc"] = jnp.full(shape, ema_osc, jnp.float32)
    state["frozen"] = jnp.asarray((np.arange(np.prod(shape)) % frozen_every == 0).reshape(shape))
    return {**collection, layer: state}


def test_depthwise_layers_of_a_rules_model_by_structure(linen):
    qmodel, _ = linen
    found = collect.depthwise_layers(qmodel, images(1), train=False)
    # The conv and the BatchNorm applied to its output; the same for the float model.
    assert found == {"mixer", "mixer_bn"}
    assert collect.depthwise_layers(qmodel.model, images(1), train=False) == found


class _Gray(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="stem")(x)  # one input channel: kernel (3, 3, 1, 4)
        return nn.Conv(4, (3, 3), feature_group_count=4, name="spatial")(x)


def test_a_one_channel_stem_is_not_depthwise():
    gray = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    assert collect.depthwise_layers(_Gray(), gray) == {"spatial"}
    assert collect.is_depthwise_kernel((3, 3, 1, 4))  # the kernel shape alone cannot tell


def test_linen_rules_model_groups_by_hand(linen):
    qmodel, variables = linen
    osc = variables["oscillation"]
    assert set(osc) == {"mixer", "expand"}  # tracked: W4 layers; the 8-bit stem/head are not
    osc = _set_by_hand(osc, "mixer", 0.5, frozen_every=4)
    osc = _set_by_hand(osc, "expand", 0.0, frozen_every=2)
    depthwise = collect.depthwise_layers(qmodel, images(1), train=False)
    groups = collect.oscillation_groups(osc, level=0.1, depthwise=depthwise)
    dw_size, pw_size = 3 * 3 * 1 * 8, 1 * 1 * 8 * 16
    assert groups == {
        "oscillating/depthwise": 1.0,
        "frozen/depthwise": pytest.approx(np.ceil(dw_size / 4) / dw_size),
        "oscillating/pointwise": 0.0,
        "frozen/pointwise": 0.5,
    }
    # Without the paths, the kernels' shapes give the same groups.
    assert collect.oscillation_groups(osc, level=0.1) == groups
    active = collect.active_oscillations(osc, level=0.1, depthwise=depthwise)
    assert active["active/depthwise"] == pytest.approx(1 - np.ceil(dw_size / 4) / dw_size)
    assert active["active/all"] == pytest.approx(
        (dw_size - np.ceil(dw_size / 4)) / (dw_size + pw_size)
    )
    summary = collect.oscillation_summary(osc, level=0.1)
    assert set(summary["per_layer"]) == {"mixer", "expand"}
    assert float(summary["per_layer"]["expand"]["frozen"]) == 0.5


def test_nnx_state_with_list_layers(linen):
    model = nnx_quantized()
    state = nnx.state(model, nnx_quant.Oscillation)
    summary = collect.oscillation_summary(state)
    assert set(summary["per_layer"]) == {"blocks/0", "blocks/2"}
    depthwise = collect.depthwise_layers(model)
    assert depthwise == {"blocks/0"}
    plain = state.to_pure_dict()
    plain["blocks"] = _set_by_hand({str(k): v for k, v in plain["blocks"].items()}, "0", 0.5, 4)
    groups = collect.oscillation_groups(plain, level=0.1, depthwise=depthwise)
    assert groups["oscillating/depthwise"] == 1.0
    assert groups["frozen/depthwise"] == pytest.approx(np.ceil(72 / 4) / 72)
    assert collect.oscillation_groups(plain, level=0.1) == groups
    # The NNX and the Linen model hold the same layers: the same group sizes.
    _, variables = linen
    linen_summary = collect.oscillation_summary(variables["oscillation"])
    assert int(summary["overall"]["num_weights"]) == int(linen_summary["overall"]["num_weights"])


def test_bn_mismatch_groups_the_bn_after_a_depthwise_conv(linen):
    qmodel, variables = linen
    running = variables["batch_stats"]
    shifted = {
        **running,
        "mixer_bn": {**running["mixer_bn"], "mean": running["mixer_bn"]["mean"] + 1.0},
    }
    depthwise = collect.depthwise_layers(qmodel, images(1), train=False)
    out = collect.bn_mismatch(shifted, running, epsilon=0.0, depthwise=depthwise)
    # Running var 1 at init: a shift of 1 is one standard deviation, on mixer_bn only.
    assert out["bn_mean_shift/depthwise"] == pytest.approx(1.0)
    assert out["bn_mean_shift/pointwise"] == 0.0


def test_depthwise_layers_refuses_other_objects():
    with pytest.raises(ValueError, match="needs a Linen model"):
        collect.depthwise_layers(object())
