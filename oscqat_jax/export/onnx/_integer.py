"""Integer layers of the int8-container ONNX export (see :mod:`.exporter`): a convolution or
matmul whose input is an activation quantizer's integers and whose kernel is a weight
quantizer's integers, lowered to ONNX Runtime's integer kernels.

- :func:`integer_kernel`: the kernel's integers in an 8-bit container with the BN multiplier
  and offset of the layer moved into per-channel scales and an offset (:class:`IntKernel`).
- :func:`emit_qlinear_conv`: ``QLinearConv`` (uint8 input, int8 kernel, int32 bias,
  requantized to the next activation quantizer's grid), for a convolution whose output, after
  BN and ReLU/ReLU6, goes straight into an activation quantizer.
- :func:`emit_matmul_integer`: ``MatMulInteger`` (exact int32 accumulation), then the
  per-channel scale and offset in float32, for a matmul whose output is read as float (the
  logits). A conv whose output is read as float (a residual branch, the head before pooling)
  stays a float Conv of its dequantized input (see ``Lowering._emit_affine_integer``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from oscqat_jax.export.onnx._graph import Graph
from oscqat_jax.export.onnx._values import Affine, QInt

_I16_MAX = 32767
"""x86 AVX2/AVX-512 kernels without VNNI multiply uint8 by int8 pairwise into int16
(``vpmaddubsw``), which saturates when ``2 * x * w`` exceeds this; such layers get uint8
kernels instead (zero point 128), which those kernels widen without saturating."""


@dataclasses.dataclass(frozen=True)
class IntKernel:
    """A layer's kernel in an 8-bit container.

    Attributes:
      ints: the stored integers in ONNX's layout (OIHW for Conv, ``(in, out)`` for MatMul),
        int8 (or uint8 with ``zero_point`` 128): the trained integers, negated in channels
        whose BN multiplier is negative, zero in channels whose multiplier is zero, times a
        whole factor ``f`` per output channel (1 for uint8 kernels).
      zero_point: 0 or 128.
      scale: float32 ``(C,)`` per output channel: weight scale ``* |BN multiplier| / f``.
      add: float64 ``(C,)``: the offset after the layer (folded BN offset and bias).
      out_axis: the output-channel axis of ``ints``.
    """

    ints: np.ndarray
    zero_point: int
    scale: np.ndarray
    add: np.ndarray
    out_axis: int

    @property
    def dtype(self) -> type:
        return np.uint8 if self.zero_point else np.int8


def integer_kernel(a: Affine, x_max: float, x_scale: float) -> IntKernel | None:
    """The kernel of ``a`` as an :class:`IntKernel` for an input whose stored integers lie in
    ``[0, x_max]`` with scale ``x_scale``; None when it does not fit (asymmetric weights, a
    negated 8-bit grid reaching 128).

    Each output channel's integers are multiplied by a whole factor ``f`` (at most what keeps
    them in int8) and its scale divided by ``f``: the same weights on an accumulator grid
    ``f`` times finer. ``f`` is chosen per channel to bring the float offset closest to that
    grid, since ``QLinearConv`` adds the offset as the int32 ``round(offset / (s_x * s_w /
    f))``: the rounding left is a few thousandths of a trained accumulator step on average
    (against a quarter without the factor). A channel whose BN multiplier is zero has zero
    integers and a scale that puts its offset exactly on the grid (2 ** 20 steps).
    """
    wq = a.kernel.weight
    if wq is None or (wq.zero_point is not None and np.any(np.asarray(wq.zero_point) != 0)):
        return None
    out_axis = 0 if a.kind == "conv" else 1
    ints = np.transpose(wq.ints, a.kernel_perm).astype(np.int64)
    channels = ints.shape[out_axis]
    scale = np.asarray(wq.scale, np.float64)
    if scale.size > 1:
        scale = np.transpose(scale, a.kernel_perm).reshape(-1)
    scale = np.broadcast_to(scale.reshape(-1), (channels,))
    mul = np.ones(channels) if a.mul is None else np.asarray(a.mul, np.float64)
    add = np.zeros(channels) if a.add is None else np.asarray(a.add, np.float64)
    shape = [1] * ints.ndim
    shape[out_axis] = channels
    sign = np.where(mul < 0, -1, np.where(mul == 0, 0, 1))
    ints = ints * sign.reshape(shape)
    scale = scale * np.abs(mul)
    if ints.size and (ints.min() < -128 or ints.max() > 127):
        return None
    per_channel = np.moveaxis(ints, out_axis, 0).reshape(channels, -1)
    peak = np.abs(per_channel).max(axis=1, initial=0)
    if 2 * x_max * peak.max(initial=0) > _I16_MAX:
        scale = np.where(mul == 0, 1.0, scale)
        return IntKernel(
            (ints + 128).astype(np.uint8), 128, scale.astype(np.float32), add, out_axis
        )
    # The largest factor per channel: int8 and the pairwise int16 sums of x86 kernels.
    top = np.minimum(
        np.minimum(
            127 // np.maximum(per_channel.max(axis=1, initial=0), 1),
            128 // np.maximum(-per_channel.min(axis=1, initial=0), 1),
        ),
        _I16_MAX // np.maximum(2 * int(x_max) * peak, 1),
    )
    steps = add / (np.float64(x_scale) * np.where(scale > 0, scale, 1.0))
    factor = np.ones(channels, np.int64)
    for c in range(channels):
        f = np.arange(1, int(top[c]) + 1)
        residual = np.abs(steps[c] * f - np.round(steps[c] * f)) / f
        factor[c] = f[np.flatnonzero(residual == residual.min())[-1]]
    scale = scale / factor
    zero = mul == 0
    scale[zero] = np.where(add[zero] != 0, np.abs(add[zero]) / (x_scale * 2.0**20), 1.0)
    stored = (ints * factor.reshape(shape)).astype(np.int8)
    return IntKernel(stored, 0, scale.astype(np.float32), add, out_axis)


def _x_zero_point(g: Graph, qx: QInt) -> str:
    zp = np.asarray(qx.zero_point, np.float64).reshape(()) - qx.offset
    return g.integers(zp, np.uint8, "x_zero_point")


def emit_qlinear_conv(
    g: Graph, a: Affine, k: IntKernel, y_scale: float, y_zero_point: float
) -> str | None:
    """``QLinearConv`` of ``a`` requantized to ``round(y / y_scale) + y_zero_point`` in uint8
    (saturating at 0 and 255); returns its NCHW output, or None when the int32 bias overflows.

    ``y`` is computed as ``(acc + bias) * (x_scale * w_scale / y_scale)`` with ``acc`` the
    exact int32 accumulation and ``bias = round(add / (x_scale * w_scale))``."""
    x_scale = np.float32(np.asarray(a.qx.scale).reshape(()))
    bias = np.round(k.add / (np.float64(x_scale) * k.scale.astype(np.float64)))
    if np.any(np.abs(bias) >= 2**31 - 1):
        return None
    inputs = [
        a.x,
        g.constant(x_scale, "x_scale"),
        _x_zero_point(g, a.qx),
        g.integers(k.ints, k.dtype, "weight_int"),
        g.constant(k.scale, "weight_scale"),
        # One zero point per output channel, as the per-channel scale.
        g.integers(np.full(k.scale.shape, k.zero_point), k.dtype, "weight_zero_point"),
        g.constant(np.float32(y_scale), "y_scale"),
        g.integers(np.asarray(y_zero_point), np.uint8, "y_zero_point"),
        g.constant(bias.astype(np.int32), "bias_int32"),
    ]
    return g.node("QLinearConv", inputs, hint="qlinear_conv", **a.attrs)


def emit_matmul_integer(g: Graph, a: Affine, k: IntKernel) -> str:
    """``MatMulInteger`` of ``a`` (exact int32 sums), then ``* x_scale * w_scale + add`` per
    output channel in float32; returns the float output ``(..., out)``."""
    acc = g.node(
        "MatMulInteger",
        [
            a.x,
            g.integers(k.ints, k.dtype, "weight_int"),
            _x_zero_point(g, a.qx),
            g.integers(np.asarray(k.zero_point), k.dtype, "weight_zero_point"),
        ],
        hint="matmul_integer",
    )
    y = g.node("Cast", [acc], to=TensorProto.FLOAT, hint="acc_as_float")
    x_scale = np.float64(np.asarray(a.qx.scale).reshape(()))
    step = (x_scale * k.scale.astype(np.float64)).astype(np.float32)
    y = g.node("Mul", [y, g.constant(step, "acc_scale")])
    if np.any(k.add != 0):
        y = g.node("Add", [y, g.constant(k.add.astype(np.float32), "bias")])
    return y


def clip_bounds(
    clamp: tuple[float, float] | None, scale: float, zero_point: float, offset: float, top: float
) -> tuple[int, int]:
    """The stored-integer bounds ``[low, high]`` (within ``[0, top]``) equivalent to clipping
    the float output to ``clamp`` before quantizing it with ``scale`` and ``zero_point``
    (``round`` is monotone, so ``round(clip(y, c0, c1) / s) = clip(round(y / s), round(c0 / s),
    round(c1 / s))``), then storing ``q - offset``."""
    low, high = 0, int(top)
    if clamp is None:
        return low, high
    s = np.float32(scale)
    ends = []
    for c in clamp:
        if np.isinf(c):
            ends.append(-np.inf if c < 0 else np.inf)
        else:
            ends.append(float(np.round(np.float32(c) / s)) + zero_point - offset)
    return (int(np.clip(ends[0], low, high)), int(np.clip(ends[1], low, high)))
