"""Depth-wise 2-D convolution (NHWC input, HWIO kernel) with a CPU-friendly implementation.

XLA's grouped convolution with ``feature_group_count == channels`` is very slow on the CPU
backend. :func:`depthwise_conv_shifted` computes the same result as ``kh * kw`` strided
slices of the padded input, each multiplied by one kernel tap and summed; on accelerators
:func:`depthwise_conv_lax` (the grouped convolution) is the fast one. :func:`depthwise_conv`
picks between them by ``jax.default_backend()`` at trace time unless told which to use.

Within :func:`exporting` every implementation resolves to ``lax``, so a function traced for
an export (ONNX) holds each depth-wise conv as one grouped convolution, whatever
``depthwise_impl`` the model was built or quantized with: the shifted form would be exported
as ``kh * kw`` float slices, multiplies and adds. The export traces inside it itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "shifted", "lax")
SHIFTED_SCOPE = "depthwise_shifted"
"""The ``jax.named_scope`` around the shifted form, by which an export recognises one left in
a function traced outside :func:`exporting`."""
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Padding = str | int | Sequence[int | tuple[int, int]]


_EXPORTING = contextvars.ContextVar("oscqat_jax_depthwise_exporting", default=False)


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Within the block (in this thread or task) :func:`resolve_impl` answers ``"lax"`` for
    every implementation: what is traced there convolves depth-wise as XLA's grouped
    convolution. It decides at trace time, so a function jitted and traced before keeps the
    form it was traced with."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def resolve_impl(impl: str) -> str:
    """``"shifted"`` or ``"lax"``: ``"auto"`` means shifted slices on CPU, grouped conv elsewhere;
    inside :func:`exporting`, always ``"lax"``."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"depthwise_impl must be one of {', '.join(DEPTHWISE_IMPLS)}, got {impl!r}."
        )
    if _EXPORTING.get():
        return "lax"
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


def _pad(x: jax.Array, pads) -> jax.Array:
    """``lax.pad`` of the spatial axes of NHWC ``x`` with ``((lo, hi, interior), ...)``."""
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0)))


def _taps(xp: jax.Array, kernel: jax.Array, out_hw, strides) -> jax.Array:
    """``sum_ij slice(xp, tap ij) * kernel[i, j, 0]`` in float32 or wider: the shifted correlation."""
    n, channels = xp.shape[0], xp.shape[-1]
    kh, kw = kernel.shape[:2]
    (out_h, out_w), (sh, sw) = out_hw, strides
    acc_dtype = jnp.promote_types(jnp.result_type(xp, kernel), jnp.float32)
    y = jnp.zeros((n, out_h, out_w, channels), acc_dtype)
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
                (1, sh, sw, 1),
            )
            y = y + patch.astype(acc_dtype) * kernel[i, j, 0].astype(acc_dtype)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted(x: jax.Array, kernel: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """Depth-wise conv (one kernel per channel) as shifted multiply-adds, explicit padding."""
    (top, bottom), (left, right) = pads
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] + top + bottom - kh) // strides[0] + 1
    out_w = (x.shape[2] + left + right - kw) // strides[1] + 1
    xp = _pad(x, ((top, bottom, 0), (left, right, 0)))
    return _taps(xp, kernel, (out_h, out_w), strides).astype(jnp.result_type(x, kernel))


def _shifted_fwd(x, kernel, strides, pads):
    return _shifted(x, kernel, strides, pads), (x, kernel)


def _shifted_bwd(strides, pads, residuals, g):
    # Autodiff of the slices would build the input gradient as kh*kw padded copies into
    # which XLA fuses (and so repeats) the producer of g. Instead: the input gradient is a
    # stride-1 shifted correlation of g, dilated by the stride and padded once, with the
    # flipped kernel; the kernel gradient is one reduction per tap.
    x, kernel = residuals
    (top, bottom), (left, right) = pads
    n, h, w, channels = x.shape
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    out_h, out_w = g.shape[1:3]
    gp = _pad(
        g,
        (
            (kh - 1 - top, h + top - ((out_h - 1) * sh + 1), sh - 1),
            (kw - 1 - left, w + left - ((out_w - 1) * sw + 1), sw - 1),
        ),
    )
    dx = _taps(gp, kernel[::-1, ::-1], (h, w), (1, 1)).astype(x.dtype)
    xp = _pad(x, ((top, bottom, 0), (left, right, 0)))
    acc_dtype = jnp.promote_types(jnp.result_type(x, g), jnp.float32)
    dk = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.sum(
                        lax.slice(
                            xp,
                            (0, i, j, 0),
                            (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
                            (1, sh, sw, 1),
                        ).astype(acc_dtype)
                        * g.astype(acc_dtype),
                        axis=(0, 1, 2),
                    )
                    for j in range(kw)
                ]
            )
            for i in range(kh)
        ]
    )[:, :, None, :]
    return dx, dk.astype(kernel.dtype)


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv_shifted(
    x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Depth-wise conv as ``kh * kw`` strided slices times kernel taps; same contract as
    :func:`depthwise_conv_lax`. Products are summed in at least float32, and the backward
    pass is shifted correlations too (a custom VJP, ~20 % faster training steps on CPU)."""
    _check(x, kernel, strides)
    _, h, w, channels = x.shape
    kh, kw, _, features = kernel.shape
    sh, sw = (int(s) for s in strides)
    pads = explicit_padding(padding, (h, w), (kh, kw), (sh, sw))
    (top, bottom), (left, right) = pads
    if (h + top + bottom - kh) // sh + 1 < 1 or (w + left + right - kw) // sw + 1 < 1:
        raise ValueError(
            f"a {kh}x{kw} kernel does not fit the padded {h}x{w} input (padding {padding!r})."
        )
    if features != channels:
        x = jnp.repeat(x, features // channels, axis=-1)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    with jax.named_scope(SHIFTED_SCOPE):
        return _shifted(x, kernel, (sh, sw), pads)


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


def conv_general_dilated_with(impl: str, original: Callable | None = None) -> Callable:
    """A drop-in for ``lax.conv_general_dilated`` (a Flax conv's ``conv_general_dilated``
    field) that convolves a depth-wise NHWC conv (one input channel per group, no dilation)
    with :func:`depthwise_conv` and ``impl``, and anything else with ``original`` (default
    ``lax.conv_general_dilated``). Only the summation order differs from the grouped conv."""
    fallback = original or jax.lax.conv_general_dilated

    def conv(lhs, rhs, window_strides, padding, *args, **kwargs):
        dilated = any(
            d is not None and any(int(v) != 1 for v in d)
            for d in (kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"))
        )
        if dilated or args or lhs.ndim != 4 or rhs.shape[2] != 1:
            return fallback(lhs, rhs, window_strides, padding, *args, **kwargs)
        return depthwise_conv(lhs, rhs, strides=tuple(window_strides), padding=padding, impl=impl)

    return conv
