"""A convolution followed by the package's BatchNorm: one quantization site, BN foldable.

:class:`ConvBN` is a plain Flax module (an ``nn.Conv`` named ``conv`` and a
:class:`~oscqat_jax.nn.batchnorm.BatchNorm` named ``bn``, a ``train`` flag); run without rules
it is conv then BN. Under :func:`~oscqat_jax.nn.intercept.quantize_model` it is the third
kind of site (besides layers and :class:`~oscqat_jax.nn.intercept.ActQuant` hooks): the first
rule matching its path quantizes its input and its conv's kernel, with the quantizers'
variables in the ConvBN's scope (``params/<site>/{weight_scale, input_scale}``,
``oscillation/<site>/...``) and the kernel at ``params/<site>/conv/kernel``. Its inner conv
is not a site of its own.

BN folding (a rule with ``fold_bn=True``; docs/method.md §4, off by default as in the
reference): with per-channel ``mul = gamma / sqrt(var + eps)`` the site computes
``conv(x_q, q(kernel * mul)) + beta - mean * mul``, where ``mean``/``var`` are the statistics
of the float ``conv(x_q, kernel)`` for this batch when ``train=True`` (an extra float
convolution; gradients flow through the statistics as in BN, and the running statistics are
updated from them) and the running statistics otherwise. The weight quantizer, its
calibration, tracking and dampening therefore see the folded kernel. Folded and unfolded sites
have the same variables, so checkpoints move between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax.nn import batchnorm, depthwise
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.kernel_hooks import depthwise_fast_path, quantized_kernel
from oscqat_jax.nn.linen_store import quantize_activation
from oscqat_jax.nn.rules import SitePlan

Initializer = Any


class ConvBN(nn.Module):
    """``BatchNorm(Conv(x))``: a bias-free 2-D conv (NHWC, HWIO kernel) and the package's BN.

    ``(N, H, W, C_in) -> (N, Ho, Wo, features)``. Depth-wise convs (``feature_group_count`` >
    1) convolve with ``depthwise_impl`` (:mod:`oscqat_jax.nn.depthwise`) in every mode, float
    included, so the float phase takes the CPU fast path too.

    Attributes:
      features, kernel_size, strides, padding, feature_group_count, kernel_init, dtype: as
        ``nn.Conv``'s (``dtype``: compute dtype, None = float32).
      bn_momentum: running-statistics momentum, Flax convention (PyTorch's 0.1 is 0.9).
      bn_epsilon: BatchNorm epsilon.
      depthwise_impl: ``auto``, ``shifted`` or ``lax``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    feature_group_count: int = 1
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    depthwise_impl: str = "auto"

    def setup(self):
        conv_fn: Callable = jax.lax.conv_general_dilated
        if self.feature_group_count > 1 and depthwise.resolve_impl(self.depthwise_impl) != "lax":
            conv_fn = _depthwise_conv_fn(self.depthwise_impl)
        strides = self.strides
        self.conv = nn.Conv(
            self.features,
            tuple(self.kernel_size),
            strides=(strides, strides) if isinstance(strides, int) else tuple(strides),
            padding=self.padding,
            feature_group_count=self.feature_group_count,
            use_bias=False,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            conv_general_dilated=conv_fn,
        )
        self.bn = BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype)

    @nn.compact  # (the children are setup's) so that a site's quantizers can be declared here
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Conv then BN (batch statistics when ``train``, updating the running ones when
        ``batch_stats`` is mutable)."""
        return self.bn(self.conv(x), use_running_average=not train)


_DEPTHWISE_FNS: dict[str, Callable] = {}


def _depthwise_conv_fn(impl: str) -> Callable:
    """One conv function per implementation, so equal ConvBN modules stay equal."""
    if impl not in _DEPTHWISE_FNS:
        _DEPTHWISE_FNS[impl] = depthwise.conv_general_dilated_with(impl)
    return _DEPTHWISE_FNS[impl]


def is_depthwise(module: ConvBN, x: jax.Array) -> bool:
    """Whether ``module`` is a depth-wise conv for the input ``x`` (one group per channel)."""
    return module.feature_group_count == x.shape[-1] > 1


def _train_flag(args: Sequence, kwargs: dict) -> bool:
    return bool(args[1] if len(args) > 1 else kwargs.get("train", False))


def quantized_call(
    module: ConvBN,
    next_fun: Callable,
    args: Sequence,
    kwargs: dict,
    plan: SitePlan,
    ctx: QuantContext,
    *,
    seen: dict,
    depthwise_impl: str,
) -> jax.Array:
    """The ConvBN site's call under its rule's ``plan`` (see the module docstring):
    ``(N, H, W, C_in) -> (N, Ho, Wo, features)``."""
    path = "/".join(module.scope.path)
    args, kwargs = list(args), dict(kwargs)
    x = args[0] if args else kwargs.pop("x")
    x = quantize_activation(module, "input", x, plan.input, ctx, require_calibration=True)
    conv = module.conv

    def fast():
        if ctx.quantize and is_depthwise(module, x):
            return depthwise_fast_path(conv, depthwise_impl)
        return contextlib.nullcontext()

    if plan.rule is None or not plan.rule.fold_bn:
        args = [x, *args[1:]]
        with quantized_kernel(conv, plan, ctx, path, seen=seen, store=module), fast():
            return next_fun(*args, **kwargs)
    use_running_average = not _train_flag(args, kwargs)
    with fast():
        y_float = conv(x)  # in running-statistics calls only its shape is used (jit drops it)
    stats = module.bn.statistics(
        y_float.astype(jnp.float32), use_running_average=use_running_average
    )
    mul, offset = batchnorm.fold(stats, module.bn_epsilon, jnp.zeros_like(stats.mean))
    with (
        quantized_kernel(
            conv, plan, ctx, path, seen=seen, store=module, transform=lambda k: k * mul
        ),
        fast(),
    ):
        y = conv(x)
    return y + offset.astype(y.dtype)


__all__ = ["ConvBN", "is_depthwise", "quantized_call"]
