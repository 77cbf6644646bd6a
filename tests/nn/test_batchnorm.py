"""Tests of oscqat_jax.nn.batchnorm's bn_stats mode: the batch's own statistics normalise the
batch, the running statistics stay, and their re-estimation equals numpy's mean and unbiased
variance."""

import jax
import numpy as np
from nn_helpers import randn

from oscqat_jax.nn import collect
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import QuantContext


def test_bn_stats_mode_and_reestimation_match_numpy():
    bn = BatchNorm()
    batches = [1.0 + randn(20 + i, (3, 4, 4, 5)) * (i + 1) for i in range(2)]
    variables = bn.init(jax.random.key(0), batches[0], QuantContext.create("eval"))
    bn_stats = QuantContext.create("bn_stats")
    sown = []
    for xb in batches:
        y, mutated = bn.apply(variables, xb, bn_stats, mutable=["bn_batch_stats", "batch_stats"])
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, mutated["batch_stats"], variables["batch_stats"]
        )
        xn = np.asarray(xb, np.float64)
        want = (xn - xn.mean((0, 1, 2))) / np.sqrt(xn.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
        sown.append(mutated["bn_batch_stats"])
    stats = collect.reestimated_batch_stats(sown)
    arrays = [np.asarray(xb, np.float64) for xb in batches]
    np.testing.assert_allclose(
        stats["mean"], np.mean([a.mean((0, 1, 2)) for a in arrays], 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        stats["var"], np.mean([a.var((0, 1, 2), ddof=1) for a in arrays], 0), rtol=1e-5
    )
