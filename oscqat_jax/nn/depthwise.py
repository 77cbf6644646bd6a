"""Depth-wise 2-D convolution (NHWC input, HWIO kernel) with a CPU-friendly implementation.

XLA's grouped convolution with ``feature_group_count == channels`` is very slow on the CPU
backend. :func:`depthwise_conv_shifted` computes the same result as ``kh * kw`` strided
slices of the padded input, each multiplied by one kernel tap and summed; on accelerators
:func:`depthwise_conv_lax` (the grouped convolution) is the fast one. :func:`depthwise_conv`
picks between them by ``jax.default_backend()`` at trace time unless told which to use.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "shifted", "lax")
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Padding = str | int | Sequence[int | tuple[int, int]]


def resolve_impl(impl: str) -> str:
    """``"shifted"`` or ``"lax"``: ``"auto"`` means shifted slices on CPU, grouped conv elsewhere."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"depthwise_impl must be one of {', '.join(DEPTHWISE_IMPLS)}, got {impl!r}."
        )
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "lax"
    return impl


def explicit_padding(
    padding: Padding,
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` pixels of padding, as ``lax.conv_general_dilated`` pads.

    ``padding`` is ``"SAME"``, ``"VALID"``, an int (the same on every side), or two entries
    (one per spatial axis), each an int or a ``(low, high)`` pair.
    """
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}.")
        pads = lax.padtype_to_pads(
            tuple(input_hw), tuple(kernel_hw), tuple(strides), padding.upper()
        )
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    padding = tuple(padding)
    if len(padding) != 2:
        raise ValueError(f"padding needs one entry per spatial axis (2), got {padding!r}.")
    pairs = []
    for p in padding:
        if isinstance(p, int):
            pairs.append((p, p))
        elif len(p) == 2 and all(isinstance(v, int) for v in p):
            pairs.append((int(p[0]), int(p[1])))
        else:
            raise ValueError(f"each padding entry must be an int or a (low, high) pair, got {p!r}.")
    return tuple(pairs)


def _check(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> None:
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"depth-wise conv needs an NHWC input and an HWIO kernel, got shapes {x.shape} and "
            f"{kernel.shape}."
        )
    channels = x.shape[-1]
    if kernel.shape[2] != 1 or kernel.shape[3] % channels:
        raise ValueError(
            f"a depth-wise kernel for {channels} input channels must have shape "
            f"(kh, kw, 1, multiple of {channels}), got {kernel.shape}."
        )
    if len(strides) != 2 or any(int(s) < 1 for s in strides):
        raise ValueError(f"strides must be two positive ints, got {tuple(strides)}.")


def depthwise_conv_lax(
    x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Depth-wise conv as XLA's grouped convolution.

    Args:
      x: ``(N, H, W, C)``.
      kernel: ``(kh, kw, 1, C * m)``; output channel ``o`` reads input channel ``o // m``.
      strides: ``(sh, sw)``.
      padding: see :func:`explicit_padding`.

    Returns:
      ``(N, Ho, Wo, C * m)``.
    """
    _check(x, kernel, strides)
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=pads,
        dimension_numbers=DIMENSION_NUMBERS,
        feature_group_count=x.shape[-1],
    )


def depthwise_conv_shifted(
    x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Depth-wise conv as ``kh * kw`` strided slices times kernel taps; same contract as
    :func:`depthwise_conv_lax`. Products are summed in at least float32."""
    _check(x, kernel, strides)
    n, h, w, channels = x.shape
    kh, kw, _, features = kernel.shape
    sh, sw = (int(s) for s in strides)
    (top, bottom), (left, right) = explicit_padding(padding, (h, w), (kh, kw), (sh, sw))
    out_h = (h + top + bottom - kh) // sh + 1
    out_w = (w + left + right - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"a {kh}x{kw} kernel does not fit the padded {h}x{w} input (padding {padding!r})."
        )
    if features != channels:
        x = jnp.repeat(x, features // channels, axis=-1)
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    acc_dtype = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
    y = jnp.zeros((n, out_h, out_w, features), acc_dtype)
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, features),
                (1, sh, sw, 1),
            )
            y = y + patch.astype(acc_dtype) * kernel[i, j, 0].astype(acc_dtype)
    return y.astype(jnp.result_type(x, kernel))


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Depth-wise conv with the implementation ``impl`` (``auto``, ``shifted`` or ``lax``)."""
    if resolve_impl(impl) == "shifted":
        return depthwise_conv_shifted(x, kernel, strides=strides, padding=padding)
    return depthwise_conv_lax(x, kernel, strides=strides, padding=padding)
