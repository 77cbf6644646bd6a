"""The package's BatchNorm (NHWC or (N, C) inputs): PyTorch's running statistics in a Flax layer.

Variables have the names of ``flax.linen.BatchNorm``: ``params/{scale, bias}`` and
``batch_stats/{mean, var}``, all float32 of shape ``(C,)``, and the running statistics
follow Flax's momentum convention (``momentum=0.9`` is PyTorch's ``momentum=0.1``).
One deliberate difference: the running variance is updated with the *unbiased* batch
variance, as PyTorch and the reference do (Flax uses the biased one); normalisation uses
the biased batch variance in both.

Two ways to say which statistics it normalises with:

- as ``flax.linen.BatchNorm``, in a plain model: ``use_running_average`` (attribute or call
  argument; ``bn(x, use_running_average=not train)``). Batch statistics update the running
  ones when ``batch_stats`` is mutable (not while initialising).
- with a :class:`~oscqat_jax.nn.config.QuantContext` ``ctx`` (the package's ctx-driven
  layers): batch statistics in ``train``/``float_train`` (running statistics updated when
  ``batch_stats`` is mutable) and ``bn_stats``; running statistics otherwise. In ``bn_stats``
  the batch's mean and unbiased variance are sown into the ``bn_batch_stats`` collection
  (``mean``, ``var``) and ``batch_stats`` is left alone (docs/method.md §8); see
  ``collect.reestimated_batch_stats``.

BatchNorm re-estimation (:func:`oscqat_jax.nn.bn.reestimate_bn`) switches either to batch
statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.nn.config import QuantContext

BN_BATCH_STATS = "bn_batch_stats"
"""Collection the ``bn_stats`` mode sows per-batch means and unbiased variances into."""


class BNStatistics(NamedTuple):
    """The per-channel quantities one BatchNorm call normalises with, each float32 ``(C,)``."""

    mean: jax.Array  # batch or running mean
    var: jax.Array  # biased batch variance or running variance
    scale: jax.Array  # gamma
    bias: jax.Array  # beta


def fold_multiplier(scale: jax.Array, var: jax.Array, epsilon: float) -> jax.Array:
    """``mul = gamma / sqrt(var + epsilon)``, the per-channel factor BN multiplies by."""
    return scale * jax.lax.rsqrt(var + epsilon)


def fold(stats: BNStatistics, epsilon: float, conv_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BN of ``y + conv_bias`` as ``y * mul + offset``: ``(mul, offset)``, each float32 ``(C,)``,
    with ``offset = beta + (conv_bias - mean) * mul`` (BN folded into the preceding conv)."""
    mul = fold_multiplier(stats.scale, stats.var, epsilon)
    return mul, stats.bias + (conv_bias - stats.mean) * mul


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """Per-channel mean and biased variance over every axis but the last, in float32, and the
    number of values per channel."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var, int(np.prod([x.shape[a] for a in axes]))


def _uses_batch_statistics(module, ctx: QuantContext | None, use_running_average) -> bool:
    if ctx is not None:
        return ctx.bn_batch_stats
    return not nn.merge_param(
        "use_running_average", module.use_running_average, use_running_average
    )


class BatchNorm(nn.Module):
    """Batch normalisation over the last axis (see the module docstring for the statistics).

    Attributes:
      momentum: weight of the old running statistics in their update (Flax convention).
      epsilon: added to the variance before the square root.
      dtype: output dtype (None: float32, or the input's if wider); statistics are float32.
      use_running_average: as ``flax.linen.BatchNorm``'s (attribute or call argument, one of
        the two); ignored when a call passes ``ctx``.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    use_running_average: bool | None = None

    def __call__(
        self,
        x: jax.Array,
        ctx: QuantContext | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> jax.Array:
        """Normalises ``x`` of shape ``(..., C)``; returns the same shape in ``dtype``."""
        stats = self.statistics(x, ctx, use_running_average=use_running_average)
        dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        mul = fold_multiplier(stats.scale, stats.var, self.epsilon)
        y = (x.astype(jnp.float32) - stats.mean) * mul + stats.bias
        return y.astype(dtype)

    @nn.compact
    def statistics(
        self,
        x: jax.Array,
        ctx: QuantContext | None = None,
        *,
        use_running_average: bool | None = None,
    ) -> BNStatistics:
        """The statistics and affine parameters for ``x`` in this mode, with the mode's side
        effects (running-statistics update or sowing). Also used to fold BN into a conv."""
        if x.ndim < 2:
            raise ValueError(f"BatchNorm needs an input of shape (..., C), got {x.shape}.")
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if not _uses_batch_statistics(self, ctx, use_running_average):
            return BNStatistics(ra_mean.value, ra_var.value, scale, bias)
        mean, var, count = batch_moments(x)
        unbiased = var * (count / max(count - 1, 1))
        if not self.is_initializing():
            if ctx is not None and ctx.mode == "bn_stats":
                self.sow(BN_BATCH_STATS, "mean", jax.lax.stop_gradient(mean))
                self.sow(BN_BATCH_STATS, "var", jax.lax.stop_gradient(unbiased))
            elif self.is_mutable_collection("batch_stats"):
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(unbiased)
        return BNStatistics(mean, var, scale, bias)
