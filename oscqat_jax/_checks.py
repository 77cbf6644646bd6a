"""Argument checks shared by the functional core: one clear sentence per bad input."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 16


def check_n_bits(n_bits: int, name: str = "n_bits") -> int:
    """Returns ``n_bits`` as a Python int, or raises if it is not a whole number in 2..16."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral):
        raise ValueError(
            f"{name} must be a Python int between {MIN_BITS} and {MAX_BITS}, got {n_bits!r}."
        )
    if not MIN_BITS <= int(n_bits) <= MAX_BITS:
        raise ValueError(f"{name} must be between {MIN_BITS} and {MAX_BITS}, got {n_bits}.")
    return int(n_bits)


def is_concrete(x) -> bool:
    """True when ``x`` holds actual values (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(x, name: str) -> jax.Array:
    """``x`` as a strongly typed floating array (float32 unless it already is floating).

    Python scalars would otherwise become weak-typed arrays, which make a jitted caller
    recompile once the value has passed through an optimizer update.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must hold floating-point values, got dtype {dtype}.")
    if dtype is None:
        dtype = jnp.float32
    return jnp.asarray(x, dtype=dtype)


def check_broadcasts_to(param_shape: tuple, x_shape: tuple, name: str) -> None:
    """Raises unless an array of ``param_shape`` broadcasts against ``x_shape`` without growing it."""
    try:
        out = np.broadcast_shapes(tuple(param_shape), tuple(x_shape))
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"{name} has shape {tuple(param_shape)}, which does not broadcast against the "
            f"input of shape {tuple(x_shape)}; use a scalar (per tensor) or a shape with the "
            "channel dimension in place and 1 elsewhere (per channel)."
        )
