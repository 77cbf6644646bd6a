"""Tests of oscqat_jax.nn.batchnorm's bn_stats mode: the batch's own statistics normalise the
batch, the running statistics stay, and their re-estimation equals numpy's mean and unbiased
variance."""

import jax
import numpy as np
from nn_helpers import Net, apply, ctx, init, randn, shapes_and_dtypes

from oscqat_jax.nn import collect
from oscqat_jax.nn.batchnorm import BatchNorm


def test_bn_stats_mode_and_reestimation_match_numpy():
    bn = BatchNorm()
    batches = [1.0 + randn(20 + i, (3, 4, 4, 5)) * (i + 1) for i in range(2)]
    variables = init(bn, batches[0], ctx("eval"))
    sown = []
    for xb in batches:
        y, mutated = apply(
            bn, variables, xb, ctx("bn_stats"), mutable=["bn_batch_stats", "batch_stats"]
        )
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

    model, x = Net(), randn(0, (2, 5, 5, 3))
    net_vars = init(model, x, ctx("eval"))
    _, mutated = apply(model, net_vars, x, ctx("bn_stats"), mutable=["bn_batch_stats"])
    reestimated = collect.reestimated_batch_stats([mutated["bn_batch_stats"]])
    assert shapes_and_dtypes(reestimated) == shapes_and_dtypes(net_vars["batch_stats"])
