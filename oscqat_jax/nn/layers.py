"""Quantized conv and dense layers, and a conv followed by BatchNorm (optionally folded).

Every layer takes ``(x, ctx)`` with a :class:`~oscqat_jax.nn.config.QuantContext`; the
context's mode decides what the quantizers do (see ``config.MODES``), so one model serves
float training, calibration, QAT, evaluation and BN re-estimation without being rebuilt.

Variables of a layer (those of a quantizer only when its ``QuantizerSpec`` is enabled):

- ``params``: ``kernel`` (HWIO ``(kh, kw, in // groups, features)`` or ``(in, out)``),
  ``bias`` (``use_bias``), ``weight_scale`` (``()`` or ``(1, 1, 1, C_out)`` / ``(1, C_out)``
  per channel), ``weight_zero_point`` (asymmetric), ``input_scale``, ``input_zero_point``,
  ``output_scale``, ``output_zero_point``; all float32.
- ``quant_stats``: ``input_signed``/``output_signed`` (bool) and, after calibration, the
  range estimators' accumulators ``<q>_range``.
- ``oscillation``: the weight's tracking/freezing state when ``quant.track_oscillations``.
- :class:`QuantConvBN` adds a :class:`~oscqat_jax.nn.batchnorm.BatchNorm` child named ``bn``.

Quantizer arithmetic and parameters are float32 so the integer grid is exact; with a
``dtype`` (e.g. bfloat16) the fake-quantized input and kernel are cast to it just before the
convolution or matmul.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from oscqat_jax.nn import batchnorm, depthwise
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import FLOAT_LAYER, LayerQuant, QuantContext
from oscqat_jax.nn.linen_store import quantize_activation, quantize_weight

Initializer = Any


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or two positive ints, got {value!r}.")
    return int(pair[0]), int(pair[1])


def _check_layer_quant(quant: LayerQuant, path: str) -> None:
    if quant.track_oscillations and not quant.weight.enabled:
        raise ValueError(
            f"Layer {path} has track_oscillations=True but its weight is not quantized; "
            "set weight.n_bits or turn tracking off."
        )


def _compute_dtype(dtype: Any, x: jax.Array) -> Any:
    """The dtype the conv/matmul runs in: ``dtype``, or float32 (the input's if wider)."""
    return dtype or jnp.promote_types(x.dtype, jnp.float32)


def _quantized_kernel(layer: nn.Module, kernel: jax.Array, ctx: QuantContext) -> jax.Array:
    """``kernel`` through the weight quantizer of ``layer`` (a layer with a ``quant`` field),
    tracked and dampened as its ``LayerQuant`` says."""
    return quantize_weight(
        layer,
        kernel,
        layer.quant.weight,
        ctx,
        track=layer.quant.track_oscillations,
        dampen=layer.quant.dampen,
    )


class QuantConv(nn.Module):
    """2-D convolution (NHWC input, HWIO kernel) with quantized input, weight and output.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)`` or an int.
      strides: ``(sh, sw)`` or an int.
      padding: ``"SAME"``, ``"VALID"``, an int or per-axis ``(low, high)`` pairs.
      feature_group_count: 1 (regular), the input channel count (depth-wise) or a divisor of
        both channel counts (grouped).
      use_bias: add a float bias (not quantized, as the reference).
      quant: which tensors are quantized and how.
      kernel_init: initializer of the float32 kernel.
      dtype: compute dtype of the convolution (None: float32).
      depthwise_impl: ``auto``, ``shifted`` or ``lax`` (see :mod:`oscqat_jax.nn.depthwise`).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = (1, 1)
    padding: depthwise.Padding = "SAME"
    feature_group_count: int = 1
    use_bias: bool = False
    quant: LayerQuant = FLOAT_LAYER
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = None
    depthwise_impl: str = "auto"

    def _conv_params(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Checks ``x`` and declares ``kernel`` (and ``bias``)."""
        path = "/".join(self.scope.path)
        if x.ndim != 4:
            raise ValueError(f"Layer {path} needs an NHWC input, got shape {x.shape}.")
        in_features, groups = x.shape[-1], self.feature_group_count
        if groups < 1 or in_features % groups or self.features % groups:
            raise ValueError(
                f"Layer {path}: feature_group_count {groups} must divide both the input "
                f"channels ({in_features}) and features ({self.features})."
            )
        depthwise.resolve_impl(self.depthwise_impl)
        _check_layer_quant(self.quant, path)
        shape = (*_pair(self.kernel_size, "kernel_size"), in_features // groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel, bias

    def _conv(self, x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
        """Convolves in ``dtype``; depth-wise convs use the configured implementation."""
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        strides = _pair(self.strides, "strides")
        in_features = x.shape[-1]
        if self.feature_group_count == in_features > 1:
            return depthwise.depthwise_conv(
                x, kernel, strides=strides, padding=self.padding, impl=self.depthwise_impl
            )
        pads = depthwise.explicit_padding(self.padding, x.shape[1:3], kernel.shape[:2], strides)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=pads,
            dimension_numbers=depthwise.DIMENSION_NUMBERS,
            feature_group_count=self.feature_group_count,
        )

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        """``(N, H, W, C_in) -> (N, Ho, Wo, features)`` in the compute dtype."""
        kernel, bias = self._conv_params(x)
        dtype = _compute_dtype(self.dtype, x)
        x = quantize_activation(self, "input", x, self.quant.input, ctx)
        y = self._conv(x, _quantized_kernel(self, kernel, ctx), dtype)
        if bias is not None:
            y = y + bias.astype(dtype)
        return quantize_activation(self, "output", y, self.quant.output, ctx).astype(dtype)


class QuantConvBN(QuantConv):
    """:class:`QuantConv` followed by :class:`BatchNorm` (child ``bn``); output quantized after BN.

    ``fold_bn=False`` (default, the reference): quantize the raw kernel, convolve, float BN.

    ``fold_bn=True``: BN folded into the quantized weight, as deployed on integer hardware.
    With per-channel ``mul = gamma / sqrt(var + eps)`` the layer computes
    ``conv(x, q(kernel * mul)) + beta + (bias - mean) * mul``, where ``mean``/``var`` are the
    statistics of ``conv(x, kernel) + bias`` for this batch in batch-statistics modes (an extra
    float convolution per training step; gradients flow through the statistics as in BN, and
    the running statistics are updated from them) and the running statistics otherwise. The
    weight quantizer, its calibration, tracking and dampening therefore see the folded kernel.
    Both settings have the same variables, so checkpoints move between them.

    Attributes (besides :class:`QuantConv`'s):
      bn_momentum: BatchNorm running-statistics momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon.
      fold_bn: fold BN into the quantized kernel.
    """

    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        """``(N, H, W, C_in) -> (N, Ho, Wo, features)`` in the compute dtype."""
        kernel, bias = self._conv_params(x)
        dtype = _compute_dtype(self.dtype, x)
        bn = BatchNorm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="bn")
        x = quantize_activation(self, "input", x, self.quant.input, ctx)
        if self.fold_bn:
            y = self._folded_conv(x, kernel, bias, bn, ctx, dtype)
        else:
            y = self._conv(x, _quantized_kernel(self, kernel, ctx), dtype)
            if bias is not None:
                y = y + bias.astype(dtype)
            y = bn(y, ctx)
        return quantize_activation(self, "output", y, self.quant.output, ctx).astype(dtype)

    def _folded_conv(
        self,
        x: jax.Array,
        kernel: jax.Array,
        bias: jax.Array | None,
        bn: BatchNorm,
        ctx: QuantContext,
        dtype: Any,
    ) -> jax.Array:
        """``conv(x, q(kernel * mul)) + beta + (bias - mean) * mul`` (see the class docstring)."""
        bias = jnp.zeros((self.features,), jnp.float32) if bias is None else bias
        # In running-statistics modes only the shape of this conv is used (jit drops it).
        stats = bn.statistics(self._conv(x, kernel, dtype).astype(jnp.float32) + bias, ctx)
        mul, offset = batchnorm.fold(stats, self.bn_epsilon, bias)
        y = self._conv(x, _quantized_kernel(self, kernel * mul, ctx), dtype)
        return y + offset.astype(dtype)


class QuantDense(nn.Module):
    """Dense layer ``(..., in) -> (..., features)`` with quantized input, weight and output.

    Attributes:
      features: output features.
      use_bias: add a float bias (not quantized).
      quant: which tensors are quantized and how.
      kernel_init: initializer of the float32 ``(in, features)`` kernel.
      dtype: compute dtype of the matmul (None: float32).
    """

    features: int
    use_bias: bool = True
    quant: LayerQuant = FLOAT_LAYER
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        """``(..., in) -> (..., features)`` in the compute dtype."""
        _check_layer_quant(self.quant, "/".join(self.scope.path))
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = _compute_dtype(self.dtype, x)
        x = quantize_activation(self, "input", x, self.quant.input, ctx)
        kernel = _quantized_kernel(self, kernel, ctx)
        y = lax.dot_general(
            x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ()))
        )
        if bias is not None:
            y = y + bias.astype(dtype)
        return quantize_activation(self, "output", y, self.quant.output, ctx).astype(dtype)
