"""LSQ-style uniform fake quantization with straight-through gradients (docs/method.md §2).

Every function here is pure JAX: it composes with ``jax.jit``, ``jax.grad`` and ``jax.vmap``
and holds no state. Scales and zero points broadcast against the input, so a scalar gives
per-tensor quantization and an array such as ``(1, 1, 1, C)`` (HWIO kernel) or ``(C, 1)``
gives per-channel quantization.

Forward, for a scale ``s`` and an optional float zero point ``z``::

    zp    = clip(round(z), int_min, int_max)
    x_int = clip(round(x / s) + zp, int_min, int_max)
    x_q   = s * (x_int - zp)

Backward, exactly as the reference: rounding is the identity, and a clip passes the
gradient only where the *rounded* value lies in ``[int_min, int_max]`` (bounds included).
So ``d x_q / d x`` is 1 inside and 0 outside, ``d x_q / d s`` is ``round(x/s) - x/s``
inside and ``bound - zp`` outside, and ``d x_q / d z`` is 0 inside and ``-s`` outside.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax._checks import (
    as_float_array,
    check_broadcasts_to,
    check_n_bits,
    check_static_bool,
    is_concrete,
)

SCALE_EPS = 1e-8
"""Smallest scale the quantizer uses; smaller (or negative) learned scales are raised to it."""

TO_INT_SCOPE = "oscqat_to_int"
DEQUANTIZE_SCOPE = "oscqat_dequantize"
"""Names of the ``jax.named_scope`` around :func:`to_int_with` and :func:`dequantize_with`."""


def int_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid ``(int_min, int_max)``: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``."""
    n_bits = check_n_bits(n_bits)
    if check_static_bool(signed, "signed"):
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
    """Rounds half to even (as ``torch.round``) and passes the gradient through unchanged."""
    return jnp.round(x)


def _round_ste_fwd(x):
    return jnp.round(x), None


def _round_ste_bwd(_, g):
    return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


@jax.custom_vjp
def _scale_grad(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Identity in the forward pass; multiplies the incoming gradient by ``factor``."""
    return x


def _scale_grad_fwd(x, factor):
    return x, factor


def _scale_grad_bwd(factor, g):
    return g * factor.astype(g.dtype), jnp.zeros_like(factor)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def clip_ste(v: jax.Array, lo, hi) -> jax.Array:
    """``clip(v, lo, hi)`` whose gradient is 1 where ``lo <= v <= hi`` (bounds included), else 0.

    ``jnp.clip`` would hand half the gradient to the bound when ``v`` equals it, and rounded
    values sit exactly on the bounds all the time, so the mask is built explicitly.
    """
    inside = (v >= lo) & (v <= hi)
    return jnp.where(inside, v, jax.lax.stop_gradient(jnp.clip(v, lo, hi)))


def _grid_bounds(n_bits: int, signed) -> tuple:
    """``int_range`` that also accepts ``signed`` as a boolean array (then the bounds are arrays).

    Activation quantizers learn their signedness from data at range initialisation and keep
    it in a variable, so under ``jit`` it is a traced value rather than a Python bool.
    """
    if isinstance(signed, (bool, np.bool_)):
        return int_range(n_bits, bool(signed))
    signed = jnp.asarray(signed)
    if signed.dtype != jnp.bool_ or signed.ndim != 0:
        raise ValueError(f"signed must be a Python bool or a boolean scalar array, got {signed!r}.")
    s_min, s_max = int_range(n_bits, True)
    u_min, u_max = int_range(n_bits, False)
    return (
        jnp.where(signed, s_min, u_min).astype(jnp.float32),
        jnp.where(signed, s_max, u_max).astype(jnp.float32),
    )


class QuantParams(NamedTuple):
    """The effective quantization parameters of one call (after eps, rounding and grad scaling)."""

    scale: jax.Array
    zero_point: jax.Array | None
    int_min: int | jax.Array
    int_max: int | jax.Array


def quant_params(
    scale,
    zero_point=None,
    *,
    x_shape: tuple,
    n_bits: int,
    signed: bool | jax.Array,
    grad_scale: bool | float = False,
) -> QuantParams:
    """Validates and prepares ``scale``/``zero_point`` for an input of ``x_shape``.

    ``signed`` is a Python bool, or a boolean scalar array for a grid whose signedness was
    learnt from data (the bounds then become arrays; shapes and compilation do not change).

    ``grad_scale``: False (off, the reference default), True (LSQ's ``1/sqrt(int_max * N)``)
    or a float factor to use instead.
    """
    int_min, int_max = _grid_bounds(n_bits, signed)
    scale = as_float_array(scale, "scale")
    check_broadcasts_to(scale.shape, x_shape, "scale")
    s = jnp.where(scale >= SCALE_EPS, scale, jnp.asarray(SCALE_EPS, scale.dtype))
    zp = None
    if zero_point is not None:
        zero_point = as_float_array(zero_point, "zero_point")
        check_broadcasts_to(zero_point.shape, x_shape, "zero_point")
        zp = clip_ste(round_ste(zero_point), int_min, int_max)
    if grad_scale is not False and grad_scale is not None:
        if grad_scale is True:
            shared = int(np.prod(x_shape)) // max(int(np.prod(scale.shape)), 1)
            grad_scale = 1.0 / jnp.sqrt(jnp.asarray(int_max, jnp.float32) * max(shared, 1))
        factor = jnp.asarray(grad_scale, dtype=s.dtype)
        s = _scale_grad(s, factor)
        if zp is not None:
            zp = _scale_grad(zp, factor.astype(zp.dtype))
    return QuantParams(s, zp, int_min, int_max)


def to_int_with(x: jax.Array, p: QuantParams) -> jax.Array:
    """Integer grid values of ``x`` (as floats) for prepared parameters ``p``."""
    # The scope only names the operations (no numeric effect); the ONNX export finds the
    # quantizers by it (oscqat_jax.deploy).
    with jax.named_scope(TO_INT_SCOPE):
        v = round_ste(x / p.scale)
        if p.zero_point is not None:
            v = v + p.zero_point
        return clip_ste(v, p.int_min, p.int_max)


def dequantize_with(x_int: jax.Array, p: QuantParams) -> jax.Array:
    """``scale * (x_int - zero_point)`` for prepared parameters ``p``."""
    with jax.named_scope(DEQUANTIZE_SCOPE):
        if p.zero_point is not None:
            x_int = x_int - p.zero_point
        return p.scale * x_int


def to_int(
    x: jax.Array,
    scale,
    zero_point=None,
    *,
    n_bits: int,
    signed: bool | jax.Array,
    grad_scale: bool | float = False,
) -> jax.Array:
    """Clipped integer grid values ``clip(round(x/s) + zp, int_min, int_max)``, as floats, with STE gradients."""
    x = as_float_array(x, "x")
    p = quant_params(
        scale, zero_point, x_shape=x.shape, n_bits=n_bits, signed=signed, grad_scale=grad_scale
    )
    return to_int_with(x, p)


def dequantize(
    x_int: jax.Array,
    scale,
    zero_point=None,
    *,
    n_bits: int,
    signed: bool | jax.Array,
    grad_scale: bool | float = False,
) -> jax.Array:
    """Maps integer grid values back to the real line: ``scale * (x_int - zp)``."""
    x_int = as_float_array(x_int, "x_int")
    p = quant_params(
        scale, zero_point, x_shape=x_int.shape, n_bits=n_bits, signed=signed, grad_scale=grad_scale
    )
    return dequantize_with(x_int, p)


def fake_quant(
    x: jax.Array,
    scale,
    zero_point=None,
    *,
    n_bits: int,
    signed: bool | jax.Array,
    grad_scale: bool | float = False,
) -> jax.Array:
    """Quantize-dequantize ``x``: returns ``scale * (x_int - zero_point)`` (same shape and dtype as ``x``)."""
    x = as_float_array(x, "x")
    p = quant_params(
        scale, zero_point, x_shape=x.shape, n_bits=n_bits, signed=signed, grad_scale=grad_scale
    )
    return dequantize_with(to_int_with(x, p), p)


def true_divide(x: jax.Array, denominator) -> jax.Array:
    """``x / denominator`` rounded as IEEE division, even when ``denominator`` is a constant.

    Under ``jit`` XLA turns division by a constant into multiplication by its reciprocal
    and rewrites ``a / (b / c)`` as ``a * c / b``, either of which can move a result by one ulp. Zero points of unskewed asymmetric ranges sit
    exactly on .5 (e.g. 3.5 on a 3-bit grid), so that ulp would flip their rounding away
    from what eager JAX, NumPy and the PyTorch reference compute.
    """
    x = jnp.asarray(x)
    # XLA never folds a float multiplication by zero (it is not IEEE-safe), so this divisor
    # is a run-time value and the division stays a true division, also inside loops; the
    # barrier keeps later divisions by the result from being reassociated with it.
    return jax.lax.optimization_barrier(x / (jnp.asarray(denominator, x.dtype) + 0 * x))


def _range_arrays(x_min, x_max) -> tuple[jax.Array, jax.Array]:
    x_min = as_float_array(x_min, "x_min")
    x_max = as_float_array(x_max, "x_max")
    if is_concrete(x_min) and is_concrete(x_max) and bool(jnp.any(x_min > x_max)):
        raise ValueError(
            "x_min must not exceed x_max anywhere in the range passed to the initialiser."
        )
    # As the reference: the range always contains 0 and is never empty.
    return jnp.minimum(x_min, 0), jnp.maximum(x_max, SCALE_EPS)


def symmetric_scale(x_min, x_max, *, n_bits: int, signed: bool | jax.Array) -> jax.Array:
    """Scale of a symmetric quantizer covering ``[x_min, x_max]``: ``max(|x_min|, x_max) / int_max``.

    The range is first widened to contain 0 and to reach at least ``SCALE_EPS`` above it.
    Shapes of ``x_min``/``x_max`` are kept, so per-channel ranges give per-channel scales.
    """
    _, int_max = _grid_bounds(n_bits, signed)
    x_min, x_max = _range_arrays(x_min, x_max)
    return true_divide(jnp.maximum(jnp.abs(x_min), x_max), int_max)


def asymmetric_scale(
    x_min, x_max, *, n_bits: int, signed: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point_float)`` of an asymmetric quantizer covering ``[x_min, x_max]``.

    ``scale = (x_max - x_min) / (2^b - 1)`` and ``zero_point = int_min - x_min / scale``,
    which is the reference's ``-x_min / scale`` on its unsigned grid.
    """
    int_min, int_max = int_range(n_bits, signed)
    x_min, x_max = _range_arrays(x_min, x_max)
    scale = true_divide(x_max - x_min, int_max - int_min)
    return scale, int_min - x_min / scale


def scale_initializer(value: float):
    """A ``jax.nn.initializers``-style function filling a scale parameter with ``value`` (> 0)."""
    if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number, got {value!r}.")

    def init(key, shape=(), dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype=dtype)

    return init


def threshold_distance(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Signed distance, in integer units, from each latent weight to its nearest rounding threshold.

    With ``x = w / scale`` (``scale`` broadcasts against ``w``, e.g. per output channel), the
    thresholds between neighbouring integers lie at half-integers. The result, shaped like the
    broadcast of ``w`` and ``scale``, is ``x - t`` for the nearest threshold ``t``: in
    ``(-0.5, 0.5]``, negative below the threshold (``x = 1.2 -> -0.3``, nearest ``t = 1.5``),
    positive above it (``1.8 -> +0.3``), 0 on it (``1.5``) and ``+0.5`` on an integer (``2.0``).
    Weights that oscillate pile up near 0. The clipping range of the grid is not considered.
    """
    x = np.asarray(w, np.float64) / np.asarray(scale, np.float64)
    return x - np.ceil(x) + 0.5
