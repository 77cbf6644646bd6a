"""Oscillation dampening (docs/method.md §7): a regulariser pulling weights to their bin centres.

For one weight ``w`` with scale ``s`` (and zero point)::

    w_q   = stop_gradient(quantize(w))               # frozen values applied
    w_clp = clip(w, s * (int_min - zp), s * (int_max - zp))
    L_d   = aggregate((w_q - w_clp) ** 2)

Clipped weights contribute nothing (``w_q`` equals the bound). The result is a scalar that
can be added to any loss: ``loss = task_loss + dampening_weight * L_d``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oscqat_jax import quant
from oscqat_jax._checks import as_float_array

AGGREGATIONS = ("kernel_mean", "sum", "mean")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}."
        )


def aggregate(loss: jax.Array, aggregation: str, channel_axis: int = -1) -> jax.Array:
    """Reduces an element-wise loss: ``kernel_mean`` sums over ``channel_axis`` (the output
    channels, the last axis of Flax HWIO and (in, out) kernels) then averages the rest;
    ``sum`` and ``mean`` reduce everything."""
    _check_aggregation(aggregation)
    if aggregation == "sum":
        return jnp.sum(loss)
    if aggregation == "mean":
        return jnp.mean(loss)
    return jnp.mean(jnp.sum(loss, axis=channel_axis))


def dampening_loss_from_quantized(
    w: jax.Array,
    w_q: jax.Array,
    scale,
    zero_point=None,
    *,
    n_bits: int,
    signed: bool,
    aggregation: str = "kernel_mean",
    channel_axis: int = -1,
) -> jax.Array:
    """Dampening term for a weight whose quantized value ``w_q`` is already at hand.

    Use this with the quantized weight of the forward pass so the weights are not quantized
    a second time; ``w_q`` is put under ``stop_gradient`` here.
    """
    _check_aggregation(aggregation)
    w = as_float_array(w, "w")
    if tuple(w_q.shape) != tuple(w.shape):
        raise ValueError(f"w_q has shape {tuple(w_q.shape)} but w has shape {tuple(w.shape)}.")
    p = quant.quant_params(scale, zero_point, x_shape=w.shape, n_bits=n_bits, signed=signed)
    lower = quant.dequantize_with(jnp.asarray(p.int_min, w.dtype), p)
    upper = quant.dequantize_with(jnp.asarray(p.int_max, w.dtype), p)
    w_clipped = jnp.minimum(jnp.maximum(w, lower), upper)
    return aggregate((jax.lax.stop_gradient(w_q) - w_clipped) ** 2, aggregation, channel_axis)


def dampening_loss(
    w: jax.Array,
    scale,
    zero_point=None,
    *,
    n_bits: int,
    signed: bool,
    aggregation: str = "kernel_mean",
    frozen: jax.Array | None = None,
    frozen_int: jax.Array | None = None,
    channel_axis: int = -1,
) -> jax.Array:
    """Dampening term of one weight tensor (a float32 scalar).

    Args:
      w: latent float weight, e.g. an HWIO conv kernel or an (in, out) dense kernel.
      scale, zero_point: its quantizer's parameters (broadcasting against ``w``).
      n_bits, signed: its integer grid.
      aggregation: ``kernel_mean`` (default), ``sum`` or ``mean``.
      frozen, frozen_int: the freezing state (``OscillationState.frozen``/``frozen_int``);
        frozen weights are pulled towards their frozen value. Tracking is not advanced.
      channel_axis: output-channel axis for ``kernel_mean``.
    """
    _check_aggregation(aggregation)
    w = as_float_array(w, "w")
    if (frozen is None) != (frozen_int is None):
        raise ValueError("frozen and frozen_int must be given together (or both left out).")
    p = quant.quant_params(scale, zero_point, x_shape=w.shape, n_bits=n_bits, signed=signed)
    w_int = quant.to_int_with(w, p)
    if frozen is not None:
        if tuple(frozen.shape) != tuple(w.shape) or tuple(frozen_int.shape) != tuple(w.shape):
            raise ValueError(
                f"frozen and frozen_int must have the weight's shape {tuple(w.shape)}, got "
                f"{tuple(frozen.shape)} and {tuple(frozen_int.shape)}."
            )
        w_int = jnp.where(frozen, frozen_int.astype(w_int.dtype), w_int)
    w_q = quant.dequantize_with(w_int, p)
    return dampening_loss_from_quantized(
        w,
        w_q,
        scale,
        zero_point,
        n_bits=n_bits,
        signed=signed,
        aggregation=aggregation,
        channel_axis=channel_axis,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DampeningTarget:
    """One quantized weight for :func:`tree_dampening_loss` (a pytree node; the grid is static)."""

    w: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None = None
    frozen: jax.Array | None = None
    frozen_int: jax.Array | None = None
    n_bits: int = dataclasses.field(default=4, metadata=dict(static=True))
    signed: bool = dataclasses.field(default=True, metadata=dict(static=True))
    channel_axis: int = dataclasses.field(default=-1, metadata=dict(static=True))


def tree_dampening_loss(tree, *, aggregation: str = "kernel_mean") -> jax.Array:
    """Sum of :func:`dampening_loss` over every :class:`DampeningTarget` in a pytree."""
    _check_aggregation(aggregation)
    targets = [
        t
        for t in jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, DampeningTarget))
        if isinstance(t, DampeningTarget)
    ]
    total = jnp.zeros((), jnp.float32)
    for t in targets:
        total = total + dampening_loss(
            t.w,
            t.scale,
            t.zero_point,
            n_bits=t.n_bits,
            signed=t.signed,
            aggregation=aggregation,
            frozen=t.frozen,
            frozen_int=t.frozen_int,
            channel_axis=t.channel_axis,
        )
    return total
