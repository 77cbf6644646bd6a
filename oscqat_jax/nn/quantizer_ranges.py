"""Range estimation of the quantizer state machine (:mod:`oscqat_jax.nn.quantizer`): the
accumulator each range method keeps between calibration batches, as a dict of arrays with a
``num_batches`` counter, and the initial scale and zero point of a range (docs/method.md §3).
The arithmetic is the functional core's (:mod:`oscqat_jax.ranges`, :mod:`oscqat_jax.quant`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from oscqat_jax import quant, ranges
from oscqat_jax.nn.config import QuantizerSpec

MSE_FIELDS = ("lower", "upper", "loss", "one_sided", "num_batches")
"""The fields of the MSE search's accumulator (:class:`oscqat_jax.ranges.MSERangeState`)."""


def scale_and_zero_point(x_min, x_max, spec: QuantizerSpec, signed) -> tuple:
    """Initial ``(scale, zero_point or None)`` of a quantizer covering ``[x_min, x_max]`` (float32)."""
    if spec.symmetric:
        scale = quant.symmetric_scale(x_min, x_max, n_bits=spec.n_bits, signed=signed)
        return scale.astype(jnp.float32), None
    scale, zero_point = quant.asymmetric_scale(x_min, x_max, n_bits=spec.n_bits, signed=signed)
    return scale.astype(jnp.float32), zero_point.astype(jnp.float32)


def activation_signed(spec: QuantizerSpec) -> bool | None:
    """The ``signed`` argument of an activation's range search: learnt from the data (None)
    for symmetric grids, unsigned for asymmetric ones (as the reference)."""
    return None if spec.symmetric else False


def _mse_init(x, spec: QuantizerSpec, *, channel_axis, signed) -> ranges.MSERangeState:
    return ranges.mse_range_init(
        x,
        n_bits=spec.n_bits,
        symmetric=spec.symmetric,
        signed=signed,
        channel_axis=channel_axis,
        num_candidates=spec.num_candidates,
        range_margin=spec.range_margin,
    )


def range_template(spec: QuantizerSpec, shape: tuple, *, channel_axis, signed) -> dict:
    """A zeroed range accumulator for tensors of ``shape`` (``num_batches == 0``: empty)."""
    counter = {"num_batches": jnp.zeros((), jnp.int32)}
    if spec.range_method == "current_minmax":
        return counter
    if spec.range_method == "running_minmax":
        keep = (
            ()
            if channel_axis is None
            else tuple(n if a == channel_axis % len(shape) else 1 for a, n in enumerate(shape))
        )
        zeros = jnp.zeros(keep, jnp.float32)
        return {"min": zeros, "max": zeros, **counter}
    abstract = jax.eval_shape(
        lambda x: _mse_init(x, spec, channel_axis=channel_axis, signed=signed),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return {
        f: jnp.zeros(getattr(abstract, f).shape, getattr(abstract, f).dtype) for f in MSE_FIELDS
    }


def estimate_range(x, stored: dict | None, spec: QuantizerSpec, *, channel_axis, signed):
    """Updates the accumulator ``stored`` with the batch ``x``; returns ``((x_min, x_max), new)``.

    ``stored`` None (Linen's first calibration batch) or counting no batch (NNX's zeroed
    accumulator) starts from ``x``: the first batch fixes the MSE candidate grid
    (docs/method.md §3).
    """
    fields = {"current_minmax": (), "running_minmax": ("min", "max")}.get(
        spec.range_method, MSE_FIELDS
    )
    if stored is not None and not set(fields) <= set(stored):
        # A marker without this method's accumulator (a loaded export's): start afresh.
        stored = None
    # A count of 0 is an empty accumulator; below 0, scales set elsewhere (a loaded export)
    # with an empty accumulator: both start afresh.
    count = jnp.zeros((), jnp.int32) if stored is None else stored["num_batches"]
    first = None if stored is None else count <= 0
    count = jnp.maximum(count, 0)
    if spec.range_method == "current_minmax":
        return ranges.current_minmax(x, channel_axis=channel_axis), {"num_batches": count + 1}
    if spec.range_method == "running_minmax":
        prev = None if stored is None else (stored["min"], stored["max"])
        x_min, x_max = ranges.running_minmax(
            x, prev, momentum=spec.running_momentum, channel_axis=channel_axis, is_first=first
        )
        return (x_min, x_max), {"min": x_min, "max": x_max, "num_batches": count + 1}
    fresh = _mse_init(x, spec, channel_axis=channel_axis, signed=signed)
    if stored is None:
        state = fresh
    else:
        kept = ranges.MSERangeState(
            **{f: stored[f] for f in MSE_FIELDS},
            n_bits=fresh.n_bits,
            symmetric=fresh.symmetric,
            signed=fresh.signed,
            channel_axis=fresh.channel_axis,
            ndim=fresh.ndim,
        )
        state = jax.tree.map(lambda new, old: jnp.where(first, new, old), fresh, kept)
    state = ranges.mse_range_accumulate(state, x)
    return ranges.mse_range_result(state), {f: getattr(state, f) for f in MSE_FIELDS}
