"""Argument checks shared by the functional core: one clear sentence per bad input."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 16


STATIC_ARGNAMES = ("n_bits", "signed")
"""The arguments of the core's quantizers that fix the integer grid, so must be static."""


def static_argument_error(value, name: str, kind: str) -> ValueError:
    """The error for a static argument ``name`` that arrived as a tracer (inside ``jax.jit``,
    ``vmap`` or ``grad``): it names ``static_argnames`` and ``functools.partial``."""
    names = ", ".join(f'"{n}"' for n in dict.fromkeys((name, *STATIC_ARGNAMES)))
    return ValueError(
        f"{name} is a static argument and must be a Python {kind}, but it is traced "
        f"({type(value).__name__}), as when it is passed through jax.jit; mark it static, "
        f"e.g. jax.jit(f, static_argnames=({names})), or bind it first with "
        f"functools.partial(f, {name}=...)."
    )


def check_static_bool(value, name: str) -> bool:
    """Returns ``value`` as a Python bool; raises :func:`static_argument_error` if it is
    traced (its truth value is unknown while tracing)."""
    if isinstance(value, jax.core.Tracer):
        raise static_argument_error(value, name, "bool")
    return bool(value)


def check_n_bits(n_bits: int, name: str = "n_bits") -> int:
    """Returns ``n_bits`` as a Python int, or raises if it is not a whole number in 2..16
    (or is traced: it is a static argument, see :func:`static_argument_error`)."""
    if isinstance(n_bits, jax.core.Tracer):
        raise static_argument_error(n_bits, name, f"int between {MIN_BITS} and {MAX_BITS}")
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
