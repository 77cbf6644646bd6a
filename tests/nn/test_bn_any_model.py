"""Tests of oscqat_jax.nn.bn: BatchNorm re-estimation (docs/method.md §8) of models written
outside the package, quantized by rules (Linen: ``flax.linen.BatchNorm`` and the package's
``BatchNorm``; NNX: ``nnx.BatchNorm`` inside an ``nnx.List``).

The expected statistics are worked out here, from each BatchNorm's input in a forward with
eval quantization and BatchNorm on batch statistics (the convs' outputs, read back with
Flax's ``capture_intermediates``, or in NNX by calling the layers one by one): the plain
average over batches of the per-batch means and of the per-batch unbiased variances.
Negative controls: the biased variance and a momentum average are far from that answer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from user_models import PackageBNNet, images, linen_quantized, nnx_quantized

from oscqat_jax.nn import nnx_quant
from oscqat_jax.nn.bn import reestimate_bn, reestimate_bn_nnx

BATCHES = [images(4, seed=10 + i) for i in range(3)]
PAIRS = {"stem_bn": "stem", "mixer_bn": "mixer", "expand_bn": "expand"}  # BN -> its input conv
RTOL, ATOL = 2e-5, 1e-6


@pytest.fixture(scope="module")
def linen():
    return linen_quantized()


def _by_hand(inputs_per_batch: list[dict[str, np.ndarray]]) -> dict[str, tuple]:
    """``{bn: (mean, var)}``: averages of the per-batch means and unbiased variances."""
    out = {}
    for bn in inputs_per_batch[0]:
        per_batch = [
            np.asarray(b[bn], np.float64).reshape(-1, b[bn].shape[-1]) for b in inputs_per_batch
        ]
        out[bn] = (
            np.mean([h.mean(axis=0) for h in per_batch], axis=0),
            np.mean([h.var(axis=0, ddof=1) for h in per_batch], axis=0),
        )
    return out


def _biased(inputs_per_batch) -> dict[str, np.ndarray]:
    return {
        bn: np.mean(
            [
                np.asarray(b[bn], np.float64).reshape(-1, b[bn].shape[-1]).var(axis=0)
                for b in inputs_per_batch
            ],
            axis=0,
        )
        for bn in inputs_per_batch[0]
    }


def _linen_bn_inputs(qmodel, variables, pairs) -> list[dict[str, np.ndarray]]:
    """Each BN's input per batch: its conv's output in an eval-quantized forward whose
    BatchNorms use batch statistics (``train=True``, the update thrown away)."""

    @jax.jit
    def conv_outputs(variables, x):
        _, state = qmodel.apply(
            variables,
            x,
            mode="eval",
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, name: isinstance(module, nn.Conv),
        )
        return {bn: state["intermediates"][conv]["__call__"][0] for bn, conv in pairs.items()}

    return [jax.device_get(conv_outputs(variables, x)) for x in BATCHES]


def _check(got_mean, got_var, want, biased):
    mean, var = want
    np.testing.assert_allclose(got_mean, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_var, var, rtol=RTOL, atol=ATOL)
    # Negative control: the biased variance differs by more than the tolerance.
    assert not np.allclose(biased, var, rtol=RTOL * 10, atol=ATOL)


def test_linen_rules_model_with_flax_batchnorm_by_hand(linen):
    qmodel, variables = linen
    got = reestimate_bn(qmodel, variables, iter(BATCHES), train=False)
    inputs = _linen_bn_inputs(qmodel, variables, PAIRS)
    want, biased = _by_hand(inputs), _biased(inputs)
    for bn in PAIRS:
        stats = got["batch_stats"][bn]
        _check(stats["mean"], stats["var"], want[bn], biased[bn])
        # Negative control: Flax's own momentum average from the old statistics is far off.
        ema_mean = np.asarray(variables["batch_stats"][bn]["mean"], np.float64)
        for h in inputs:
            ema_mean = 0.99 * ema_mean + 0.01 * h[bn].reshape(-1, h[bn].shape[-1]).mean(axis=0)
        assert not np.allclose(ema_mean, want[bn][0], rtol=RTOL * 10, atol=1e-4)
    # Nothing but batch_stats changes: the tracking state and the quantizers stay.
    for name in variables:
        if name != "batch_stats":
            jax.tree_util.tree_map(np.testing.assert_array_equal, got[name], variables[name])


def test_linen_max_batches_takes_the_first_ones(linen):
    qmodel, variables = linen
    got = reestimate_bn(qmodel, variables, BATCHES + [images(4, seed=99)], max_batches=3)
    want = reestimate_bn(qmodel, variables, BATCHES)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["batch_stats"], want["batch_stats"])


def test_package_batchnorm_in_a_user_model_by_hand():
    qmodel, variables = linen_quantized(PackageBNNet())
    got = reestimate_bn(qmodel, variables, BATCHES, train=False)
    pairs = {"stem_bn": "stem", "mixer_bn": "mixer"}
    inputs = _linen_bn_inputs(qmodel, variables, pairs)
    want, biased = _by_hand(inputs), _biased(inputs)
    for bn in pairs:
        stats = got["batch_stats"][bn]
        _check(stats["mean"], stats["var"], want[bn], biased[bn])


def test_nnx_model_by_hand_and_tracking_unchanged():
    model = nnx_quantized()
    before = nnx.state(model, nnx_quant.Oscillation).to_pure_dict()
    params_before = nnx.state(model, nnx.Param).to_pure_dict()
    # The expected inputs, from a copy run layer by layer with batch statistics.
    ref = nnx.clone(model)
    ref.eval()
    inputs = []
    for x in BATCHES:
        h = ref.stem(x)
        record = {"stem_bn": h}
        h = nnx.relu(ref.stem_bn(h, use_running_average=False))
        h = ref.blocks[0](h)
        record["blocks/1"] = h
        h = nnx.relu(ref.blocks[1](h, use_running_average=False))
        h = ref.blocks[2](h)
        record["blocks/3"] = h
        inputs.append(record)
    want, biased = _by_hand(inputs), _biased(inputs)

    assert reestimate_bn_nnx(model, BATCHES) is model
    layers = {"stem_bn": model.stem_bn, "blocks/1": model.blocks[1], "blocks/3": model.blocks[3]}
    for path, bn in layers.items():
        _check(bn.mean[...], bn.var[...], want[path], biased[path])
    after = nnx.state(model, nnx_quant.Oscillation).to_pure_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
    params_after = nnx.state(model, nnx.Param).to_pure_dict()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_after, params_before)


class _NoBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_bad_input_is_told_in_one_sentence(linen):
    qmodel, variables = linen
    with pytest.raises(ValueError, match="at least one batch; batches was empty"):
        reestimate_bn(qmodel, variables, [])
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        reestimate_bn(qmodel, variables, BATCHES, max_batches=0)
    plain = _NoBN()
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        reestimate_bn(plain, plain.init(jax.random.key(0), BATCHES[0]), BATCHES[:1])
    with pytest.raises(ValueError, match="for a flax.nnx model use reestimate_bn_nnx"):
        reestimate_bn(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {}, BATCHES)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        reestimate_bn_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), BATCHES)
    with pytest.raises(ValueError, match="needs a flax.nnx Module"):
        reestimate_bn_nnx(qmodel, BATCHES)
