"""Range estimators for initialising quantizer scales (docs/method.md §3).

Each estimator gives ``(x_min, x_max)``. Per tensor (``channel_axis=None``) they are scalars;
per channel they keep the input's rank with size 1 on every axis but ``channel_axis``, so
they broadcast against the tensor and feed ``quant.symmetric_scale`` directly.

``mse_range`` is the reference's grid search: candidate ranges are built once from the first
batch, the squared quantization error of every candidate is accumulated over any number of
batches in an explicit :class:`MSERangeState`, and the best candidate wins (per channel when
``channel_axis`` is set). All candidates of a batch are evaluated in one compiled call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oscqat_jax import quant
from oscqat_jax._checks import as_float_array, check_n_bits

# Elements (candidates x tensor size) evaluated at once by the MSE search; bounds its memory.
_MSE_CHUNK_ELEMENTS = 1 << 25


def _reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(ndim))
    if not -ndim <= channel_axis < ndim:
        raise ValueError(
            f"channel_axis {channel_axis} is out of range for an input with {ndim} dimensions."
        )
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)


def current_minmax(x: jax.Array, *, channel_axis: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Minimum and maximum of ``x`` (per channel when ``channel_axis`` is given)."""
    x = jax.lax.stop_gradient(as_float_array(x, "x"))
    axes = _reduce_axes(x.ndim, channel_axis)
    keep = channel_axis is not None
    return jnp.min(x, axis=axes, keepdims=keep), jnp.max(x, axis=axes, keepdims=keep)


def running_minmax(
    x: jax.Array,
    prev: tuple[jax.Array, jax.Array] | None = None,
    *,
    momentum: float = 0.9,
    channel_axis: int | None = None,
    is_first=None,
) -> tuple[jax.Array, jax.Array]:
    """Running range: the first batch sets it, later ones give ``momentum * prev + (1 - momentum) * batch``.

    Args:
      x: this batch.
      prev: the range returned for the previous batch, or None for the first batch.
      momentum: weight of the previous range (0.9 in the reference).
      channel_axis: per-channel ranges when set.
      is_first: optional boolean scalar (may be traced); where True the batch range replaces
        ``prev``. Lets a jitted caller keep ``prev`` in fixed-shape storage from the start.
    """
    batch_min, batch_max = current_minmax(x, channel_axis=channel_axis)
    if prev is None:
        return batch_min, batch_max
    m = jnp.asarray(momentum, batch_min.dtype)
    prev_min, prev_max = (jnp.asarray(p, batch_min.dtype) for p in prev)
    if prev_min.shape != batch_min.shape or prev_max.shape != batch_max.shape:
        raise ValueError(
            f"prev range has shapes {prev_min.shape} and {prev_max.shape} but this batch gives "
            f"{batch_min.shape}; use the same channel_axis and tensor rank on every batch."
        )
    new_min = m * prev_min + (1 - m) * batch_min
    new_max = m * prev_max + (1 - m) * batch_max
    if is_first is not None:
        new_min = jnp.where(is_first, batch_min, new_min)
        new_max = jnp.where(is_first, batch_max, new_max)
    return new_min, new_max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MSERangeState:
    """Accumulator of the MSE grid search.

    Attributes:
      lower, upper: the candidate ranges, shape ``(K,)``; ``K = num_candidates`` for symmetric
        quantizers and one-sided data, ``num_candidates * max_int_skew * 2`` for asymmetric
        ones (entries unused for one-sided data carry an infinite loss).
      loss: summed squared error of every candidate, shape ``(K, C)`` (C = 1 per tensor).
      one_sided: whether the first batch had no negative values (scalar bool).
      num_batches: batches accumulated so far (int32 scalar).
    The remaining fields are static settings fixed at :func:`mse_range_init`.
    """

    lower: jax.Array
    upper: jax.Array
    loss: jax.Array
    one_sided: jax.Array
    num_batches: jax.Array
    n_bits: int = dataclasses.field(metadata=dict(static=True))
    symmetric: bool = dataclasses.field(metadata=dict(static=True))
    signed: bool | None = dataclasses.field(metadata=dict(static=True))
    channel_axis: int | None = dataclasses.field(metadata=dict(static=True))
    ndim: int = dataclasses.field(metadata=dict(static=True))


def _candidates(
    x: jax.Array,
    *,
    n_bits: int,
    symmetric: bool,
    num_candidates: int,
    range_margin: float,
    max_int_skew: int,
):
    """Candidate ranges from the first batch, ordered as the reference's loss array."""
    x_min, x_max = jnp.min(x), jnp.max(x)
    one_sided = x_min >= 0
    index = jnp.arange(1, num_candidates + 1, dtype=jnp.float32)
    if symmetric:
        step = quant.true_divide(jnp.maximum(jnp.abs(x_min), x_max) + range_margin, num_candidates)
        upper = step * index
        lower = jnp.where(one_sided, 0.0, -upper)
        return lower, upper, jnp.ones(upper.shape, jnp.bool_), one_sided
    # Asymmetric: symmetric magnitudes shifted by whole steps of that candidate's grid,
    # laid out (candidate, shift, direction) in C order like the reference's 4-D array.
    pos_limit = x_max + range_margin
    neg_limit = x_min - range_margin
    step = quant.true_divide(jnp.maximum(jnp.abs(pos_limit), jnp.abs(neg_limit)), num_candidates)
    magnitude = (step * index)[:, None, None]
    delta = quant.true_divide(2 * magnitude, 2**n_bits - 1)
    shift = jnp.arange(max_int_skew, dtype=jnp.float32)[None, :, None]
    sign = jnp.asarray([1.0, -1.0], jnp.float32)[None, None, :]
    skew = sign * shift * delta
    two_d_lower = jnp.maximum(-magnitude + skew, neg_limit).reshape(-1)
    two_d_upper = jnp.minimum(magnitude + skew, pos_limit).reshape(-1)
    # One-sided data use the 1-D search [0, t]; its t is the symmetric grid's magnitude.
    one_step = quant.true_divide(jnp.maximum(jnp.abs(x_min), x_max) + range_margin, num_candidates)
    one_upper = jnp.broadcast_to((one_step * index)[:, None, None], skew.shape).reshape(-1)
    first_of_group = jnp.broadcast_to((shift == 0) & (sign > 0), skew.shape).reshape(-1)
    lower = jnp.where(one_sided, 0.0, two_d_lower)
    upper = jnp.where(one_sided, one_upper, two_d_upper)
    valid = jnp.where(one_sided, first_of_group, True)
    return lower, upper, valid, one_sided


def _candidate_params(lower, upper, *, n_bits, symmetric, signed) -> quant.QuantParams:
    """Quantizer parameters the reference would set for the range ``[lower, upper]``."""
    if symmetric:
        # As the reference: unless told otherwise, a symmetric grid is signed iff the range is.
        grid_signed = lower < 0 if signed is None else bool(signed)
        scale = quant.symmetric_scale(lower, upper, n_bits=n_bits, signed=grid_signed)
        zero_point = None
    else:
        grid_signed = bool(signed)
        scale, zero_point = quant.asymmetric_scale(lower, upper, n_bits=n_bits, signed=grid_signed)
    return quant.quant_params(scale, zero_point, x_shape=(), n_bits=n_bits, signed=grid_signed)


def mse_range_init(
    x: jax.Array,
    *,
    n_bits: int,
    symmetric: bool = True,
    signed: bool | None = None,
    channel_axis: int | None = None,
    num_candidates: int = 100,
    range_margin: float = 0.5,
    max_int_skew: int | None = None,
) -> MSERangeState:
    """An empty accumulator whose candidate grid is decided by the first batch ``x``.

    Args:
      x: the first batch (its global min/max and one-sidedness fix the grid, as the
        reference, also for per-channel searches).
      n_bits: bit width of the quantizer being initialised.
      symmetric: symmetric quantizer (1-D search over ``[-t, t]``, or ``[0, t]`` for
        one-sided data) or asymmetric (2-D search with integer skews).
      signed: the quantizer's grid. None follows the reference: a symmetric grid is signed
        when the candidate range has negative values, an asymmetric grid is unsigned.
      channel_axis: one search per channel along this axis (None: per tensor).
      num_candidates: magnitudes ``t_i = i * (max(|min|, max) + range_margin) / num_candidates``.
      range_margin: absolute margin added to the data's extreme value.
      max_int_skew: skews ``k * delta`` with ``|k| < max_int_skew`` (default ``2**n_bits // 4``,
        exactly the reference's ``range(max_int_skew)`` in both directions).
    """
    n_bits = check_n_bits(n_bits)
    if not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}.")
    if max_int_skew is None:
        max_int_skew = max(2**n_bits // 4, 1)
    x = jax.lax.stop_gradient(as_float_array(x, "x"))
    _reduce_axes(x.ndim, channel_axis)
    num_channels = 1 if channel_axis is None else x.shape[channel_axis]
    lower, upper, valid, one_sided = _candidates(
        x,
        n_bits=n_bits,
        symmetric=symmetric,
        num_candidates=num_candidates,
        range_margin=float(range_margin),
        max_int_skew=int(max_int_skew),
    )
    loss = jnp.where(valid[:, None], 0.0, jnp.inf) * jnp.ones((1, num_channels), jnp.float32)
    return MSERangeState(
        lower=lower.astype(jnp.float32),
        upper=upper.astype(jnp.float32),
        loss=loss.astype(jnp.float32),
        one_sided=one_sided,
        num_batches=jnp.zeros((), jnp.int32),
        n_bits=n_bits,
        symmetric=bool(symmetric),
        signed=signed,
        channel_axis=None if channel_axis is None else channel_axis % x.ndim,
        ndim=x.ndim,
    )


def mse_range_accumulate(state: MSERangeState, x: jax.Array) -> MSERangeState:
    """Adds the squared quantization error of every candidate on batch ``x`` to the state."""
    x = jax.lax.stop_gradient(as_float_array(x, "x"))
    if x.ndim != state.ndim:
        raise ValueError(
            f"x has {x.ndim} dimensions but the MSE state was created for {state.ndim}."
        )
    axes = _reduce_axes(x.ndim, state.channel_axis)
    if state.channel_axis is not None and x.shape[state.channel_axis] != state.loss.shape[1]:
        raise ValueError(
            f"x has {x.shape[state.channel_axis]} channels on axis {state.channel_axis} but "
            f"the MSE state was created for {state.loss.shape[1]}."
        )

    def error(bounds):
        lower, upper = bounds
        p = _candidate_params(
            lower,
            upper,
            n_bits=state.n_bits,
            symmetric=state.symmetric,
            signed=state.signed,
        )
        x_q = quant.dequantize_with(quant.to_int_with(x, p), p)
        per_channel = jnp.sum(jnp.square(x - x_q), axis=axes)
        return jnp.reshape(per_channel, (-1,))

    chunk = int(max(1, min(state.lower.shape[0], _MSE_CHUNK_ELEMENTS // max(x.size, 1))))
    batch_loss = jax.lax.map(error, (state.lower, state.upper), batch_size=chunk)
    return dataclasses.replace(
        state, loss=state.loss + batch_loss, num_batches=state.num_batches + 1
    )


def mse_range_result(state: MSERangeState) -> tuple[jax.Array, jax.Array]:
    """The candidate range with the smallest accumulated error (first one on ties)."""
    best = jnp.argmin(state.loss, axis=0)
    x_min, x_max = state.lower[best], state.upper[best]
    if state.channel_axis is None:
        return x_min[0], x_max[0]
    shape = [1] * state.ndim
    shape[state.channel_axis] = -1
    return jnp.reshape(x_min, shape), jnp.reshape(x_max, shape)


def mse_range(x: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
    """One-batch MSE range search: ``mse_range_result(mse_range_accumulate(mse_range_init(x), x))``.

    Takes the keyword arguments of :func:`mse_range_init`.
    """
    state = mse_range_init(x, **kwargs)
    return mse_range_result(mse_range_accumulate(state, x))


__all__ = [
    "MSERangeState",
    "current_minmax",
    "mse_range",
    "mse_range_accumulate",
    "mse_range_init",
    "mse_range_result",
    "running_minmax",
]
