"""The quantizer state machine, written once for every front end.

Each function here handles one quantizer of one layer: it declares the quantizer's variables,
estimates its range during calibration, fake-quantizes a weight (with oscillation tracking,
freezing and the dampening term) or an activation. It reads and writes variables only through
a :class:`VariableStore`, the small accessor each front end implements:

- the Linen adapter (:mod:`oscqat_jax.nn.linen_store`) maps it onto a module's scope, used by
  the package's own layers and by the rules interceptor (:mod:`oscqat_jax.nn.intercept`);
- the NNX adapter (:mod:`oscqat_jax.nn.nnx_layers`) maps it onto a quantized layer's
  ``nnx.Variable`` attributes.

So every option (per-channel, asymmetric grids, range methods, LSQ gradient scaling, EMA or
instantaneous freezing, dampening aggregations, tracking and dampening switches) is one code
path for both. The arithmetic itself is the functional core's (:mod:`oscqat_jax.quant`,
:mod:`oscqat_jax.ranges`, :mod:`oscqat_jax.oscillation`, :mod:`oscqat_jax.dampening`; the method
is docs/method.md §2-§7).

Variables of a quantizer named ``<q>`` (``weight``, ``input``, ``output`` or ``residual``), by
collection (Linen) or variable type (NNX):

- ``params``: ``<q>_scale`` (float32, ``()`` per tensor or ``(1, ..., 1, C_out)`` per channel,
  weights only) and, for asymmetric grids, ``<q>_zero_point`` of the same shape.
- ``quant_stats``: ``<q>_signed`` (activations: the grid's signedness, learnt from the data at
  calibration, docs/method.md §2; asymmetric grids stay unsigned) and ``<q>_range``, the range
  estimator's accumulator (a dict of arrays with a ``num_batches`` counter: ``min``/``max``
  for running min-max, ``lower``/``upper``/``loss``/``one_sided`` for the MSE search, only the
  counter for the current batch's min-max). A quantizer whose ``<q>_range`` is absent (Linen)
  or counts no batch (NNX) has not been calibrated.
- ``oscillation``: the seven fields of a tracked weight's
  :class:`~oscqat_jax.oscillation.OscillationState` (``prev_int``, ``prev_dir``, ``ema_osc``,
  ``ema_int``, ``frozen``, ``frozen_int``, ``freezing_started``).
- the weight's dampening term of a ``train`` call (a float32 scalar), handed to the store,
  which keeps it where its front end sums it (:meth:`VariableStore.dampening`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from oscqat_jax import dampening, oscillation, quant, ranges
from oscqat_jax.nn.config import QuantContext, QuantizerSpec
from oscqat_jax.nn.quantizer_ranges import (
    activation_signed,
    estimate_range,
    range_template,
    scale_and_zero_point,
)

PARAMS = "params"
QUANT_STATS = "quant_stats"
OSCILLATION = "oscillation"
DAMPENING = "dampening"
QUANTIZED_WEIGHTS = "quantized_weights"
"""Collection names of the quantizers' variables and outputs (see the module docstring)."""

WEIGHT_CHANNEL_AXIS = -1
"""Output-channel axis of Flax kernels: HWIO for convs, (in, out) for dense layers (NNX too)."""

QUANTIZER_NAMES = ("weight", "input", "output", "residual")
"""The quantizers a layer can have: its kernel's, its input's, its output's (an ``ActQuant``
hook's value) and, in the package's residual blocks, the sum's."""

QUANTIZER_PARAM_KINDS = ("scale", "zero_point")
"""A quantizer ``<q>`` names its parameters ``<q>_scale`` and ``<q>_zero_point``."""


def split_quantizer_param(name: str) -> tuple[str, str] | None:
    """``(quantizer, kind)`` of a parameter leaf that a quantizer creates, named
    ``<quantizer>_<kind>`` with a quantizer of :data:`QUANTIZER_NAMES` (e.g.
    ``("input", "zero_point")`` for ``input_zero_point``); None for any other name, such as
    a model's own ``logit_scale`` or BatchNorm's ``scale``."""
    for kind in QUANTIZER_PARAM_KINDS:
        quantizer = name.removesuffix(f"_{kind}")
        if quantizer in QUANTIZER_NAMES and quantizer != name:
            return quantizer, kind
    return None


def is_quantizer_param(name: str) -> bool:
    """Whether a parameter leaf named ``name`` is one a quantizer creates (``weight_scale``,
    ``input_scale``, ``output_zero_point``, ...; see :func:`split_quantizer_param`)."""
    return split_quantizer_param(name) is not None


class VariableStore(Protocol):
    """How the state machine reaches one layer's variables.

    Attributes:
      path: the layer's ``/``-joined path, for messages.
      creating: True while variables are being declared (Linen ``init``, NNX ``quantize``):
        nothing is calibrated, tracked or emitted then.
    """

    path: str
    creating: bool

    def get(self, collection: str, name: str) -> Any | None:
        """The variable's value, or None when the layer has no such variable."""

    def declare(self, collection: str, name: str, init: Callable[[], Any]) -> Any:
        """The variable's value, created from ``init()`` when absent."""

    def put(self, collection: str, name: str, value: Any) -> None:
        """Overwrites an existing variable (or creates it: range accumulators)."""

    def writable(self, collection: str) -> bool:
        """Whether this call may change ``collection``."""

    def declare_range(self, name: str, template: Callable[[], dict | None]) -> None:
        """Called while creating: an NNX layer creates the zeroed range accumulator here (a
        jitted call cannot add variables); a Linen layer creates it on its first
        calibration instead, keeping the layout of an uncalibrated model unchanged."""

    def dampening(self, term: jax.Array | None) -> None:
        """Keeps this call's dampening term of the layer's weight (None: no term this call,
        as outside ``train``)."""

    def export_record(self, record: dict) -> None:
        """Keeps the eval forward's integer weight (for exports), when the caller asks."""


def _require_writable(store: VariableStore, collections: tuple[str, ...]) -> None:
    missing = [c for c in collections if not store.writable(c)]
    if missing:
        raise ValueError(
            f"calibrate mode needs the collections {missing} to be mutable in apply; pass "
            f"mutable={list(collections)} (layer {store.path}), or use the package's "
            "calibrate function, which does."
        )


def _calibrate(store: VariableStore, name: str, x, spec: QuantizerSpec, *, channel_axis, signed):
    """Feeds ``x`` to quantizer ``name``'s range estimator and writes the scale (zero point,
    activation signedness) it gives. Returns ``(scale, zero_point or None, grid_signed)``."""
    _require_writable(store, (PARAMS, QUANT_STATS))
    key = f"{name}_range"
    (x_min, x_max), new = estimate_range(
        x, store.get(QUANT_STATS, key), spec, channel_axis=channel_axis, signed=signed
    )
    store.put(QUANT_STATS, key, new)
    if signed is None:
        grid_signed = x_min < 0
    else:
        grid_signed = signed
    scale, zero_point = scale_and_zero_point(x_min, x_max, spec, grid_signed)
    for kind, value in (("scale", scale), ("zero_point", zero_point)):
        if value is not None:
            current = store.get(PARAMS, f"{name}_{kind}")
            store.put(PARAMS, f"{name}_{kind}", jnp.reshape(value, jnp.shape(current)))
    return grid_signed


def _require_calibrated(store: VariableStore, name: str, ctx: QuantContext) -> None:
    """Raises when a front end that asks for it runs quantizer ``name`` uncalibrated."""
    if (
        getattr(store, "require_calibration", False)
        and store.get(QUANT_STATS, f"{name}_range") is None
    ):
        raise ValueError(
            f"The {name} quantizer of layer {store.path} has not been calibrated, so its scale "
            f"is a placeholder and '{ctx.mode}' would quantize with it; run calibrate on a few "
            "batches of training data first."
        )


# --- activations -------------------------------------------------------------------------------


def quantize_activation(
    store: VariableStore, name: str, x: jax.Array, spec: QuantizerSpec, ctx: QuantContext
) -> jax.Array:
    """Fake-quantizes the activation ``x`` with quantizer ``name`` (per tensor).

    Returns ``x`` unchanged when ``spec`` is disabled or the mode is a float mode; otherwise
    a float32 array shaped like ``x``. In ``calibrate`` mode the range estimator sees ``x``
    first and the scale (zero point, signedness) it gives are written and used.
    """
    if not spec.enabled:
        return x
    if spec.per_channel:
        raise ValueError(
            f"The {name} quantizer of layer {store.path} has per_channel=True, but activations "
            "are quantized per tensor; set per_channel only on weight quantizers."
        )
    scale = store.declare(PARAMS, f"{name}_scale", lambda: jnp.ones((), jnp.float32))
    zero_point = None
    if not spec.symmetric:
        zero_point = store.declare(PARAMS, f"{name}_zero_point", lambda: jnp.zeros((), jnp.float32))
    signed = store.declare(
        QUANT_STATS, f"{name}_signed", lambda: jnp.asarray(spec.symmetric, jnp.bool_)
    )
    if store.creating:
        store.declare_range(
            name,
            lambda: range_template(spec, (1,), channel_axis=None, signed=activation_signed(spec)),
        )
    if not ctx.quantize:
        return x
    x = x.astype(jnp.float32)
    if ctx.mode == "calibrate" and not store.creating:
        grid_signed = _calibrate(
            store, name, x, spec, channel_axis=None, signed=activation_signed(spec)
        )
        signed = jnp.asarray(grid_signed, jnp.bool_)
        store.put(QUANT_STATS, f"{name}_signed", signed)
        scale = store.get(PARAMS, f"{name}_scale")
        zero_point = store.get(PARAMS, f"{name}_zero_point") if not spec.symmetric else None
    elif not store.creating:
        _require_calibrated(store, name, ctx)
    p = quant.quant_params(
        scale,
        zero_point,
        x_shape=x.shape,
        n_bits=spec.n_bits,
        signed=signed,
        grad_scale=spec.grad_scale,
    )
    return quant.dequantize_with(quant.to_int_with(x, p), p)


# --- weights -----------------------------------------------------------------------------------


def _declare_weight(store: VariableStore, w: jax.Array, spec: QuantizerSpec):
    """Declares ``weight_scale`` (and ``weight_zero_point``), first set from the kernel's
    min-max (the reference's weight default), so an uncalibrated layer quantizes sensibly."""
    channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
    shape = () if channel_axis is None else (1,) * (w.ndim - 1) + (w.shape[channel_axis],)

    def initial(index: int):
        def init():
            x_min, x_max = ranges.current_minmax(w, channel_axis=channel_axis)
            return jnp.reshape(scale_and_zero_point(x_min, x_max, spec, True)[index], shape)

        return init

    scale = store.declare(PARAMS, "weight_scale", initial(0))
    zero_point = None if spec.symmetric else store.declare(PARAMS, "weight_zero_point", initial(1))
    if store.creating:
        store.declare_range(
            "weight",
            lambda: range_template(spec, w.shape, channel_axis=channel_axis, signed=True),
        )
    return scale, zero_point


def _oscillation_state(store: VariableStore, w_int: jax.Array) -> oscillation.OscillationState:
    """The weight's tracking state, created from ``w_int`` when the layer has none."""
    fields = oscillation.OscillationState._fields
    missing = [f for f in fields if store.get(OSCILLATION, f) is None]
    if missing and not store.creating and not store.writable(OSCILLATION):
        raise ValueError(
            f"Layer {store.path} tracks oscillations but the variables have no "
            f"'{OSCILLATION}' entries {missing}; pass the model's '{OSCILLATION}' collection "
            "(from init or calibrate, updated with each train call's updates)."
        )
    fresh = oscillation.init(w_int) if missing else None
    values = {f: store.declare(OSCILLATION, f, lambda f=f: getattr(fresh, f)) for f in fields}
    return oscillation.OscillationState(**values)


def _tracked_int(
    store: VariableStore, w_int: jax.Array, ctx: QuantContext, *, calibrating: bool, repeat: bool
) -> jax.Array:
    """The integers the forward uses for a tracked weight, advancing its state when allowed.

    Tracking advances in ``train`` mode (unless the context turns it off) on the first call
    of a step; calibration restarts the state from the new integers; every other call,
    including a repeated call of the same layer in one step, applies the frozen values.
    """
    state = _oscillation_state(store, w_int)
    if store.creating:
        return oscillation.apply_frozen(state, w_int)
    if calibrating:
        new_state = oscillation.init(w_int)
    elif ctx.tracking and not repeat:
        if not store.writable(OSCILLATION):
            raise ValueError(
                f"Layer {store.path} tracks oscillations in train mode, but '{OSCILLATION}' is "
                "not mutable, so tracking and freezing would silently stop; pass "
                f"mutable=[..., '{OSCILLATION}'] and keep the returned collection, or train "
                "without tracking (track_oscillations=False)."
            )
        w_int, new_state = oscillation.update(
            state,
            w_int,
            momentum=ctx.osc_momentum,
            freeze_threshold=ctx.freeze_threshold,
            use_ema=ctx.use_ema_freeze,
        )
    else:
        return oscillation.apply_frozen(state, w_int)
    for field, value in new_state._asdict().items():
        store.put(OSCILLATION, field, value)
    return w_int


def quantize_weight(
    store: VariableStore,
    w: jax.Array,
    spec: QuantizerSpec,
    ctx: QuantContext,
    *,
    track: bool,
    dampen: bool,
    repeat: bool = False,
) -> jax.Array:
    """Fake-quantizes the kernel ``w`` (signed grid; per tensor or per output channel).

    Args:
      store: the layer's variables.
      w: float32 kernel, output channels on the last axis.
      spec: the weight quantizer; disabled returns ``w`` unchanged.
      ctx: the call's mode and settings.
      track: whether this weight is tracked and frozen (docs/method.md §5-6).
      dampen: whether this weight has a dampening term (docs/method.md §7) in ``train`` mode.
      repeat: this layer already ran in this step (a tied or looped layer): its tracking
        does not advance again and its dampening term is not counted again.

    Returns:
      ``w_q`` (float32, shape of ``w``), the fake-quantized kernel with frozen entries at
      their frozen value; ``w`` itself in float modes.
    """
    if not spec.enabled:
        return w
    w_in, w = w, w.astype(jnp.float32)
    scale, zero_point = _declare_weight(store, w, spec)
    if not ctx.quantize and not store.creating:
        if dampen:
            store.dampening(None)
        return w_in
    calibrating = ctx.mode == "calibrate" and not store.creating
    if calibrating:
        _require_writable(store, (PARAMS, QUANT_STATS, OSCILLATION) if track else ())
        channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
        _calibrate(store, "weight", w, spec, channel_axis=channel_axis, signed=True)
        scale = store.get(PARAMS, "weight_scale")
        zero_point = None if spec.symmetric else store.get(PARAMS, "weight_zero_point")
    elif not store.creating:
        _require_calibrated(store, "weight", ctx)
    p = quant.quant_params(
        scale,
        zero_point,
        x_shape=w.shape,
        n_bits=spec.n_bits,
        signed=True,
        grad_scale=spec.grad_scale,
    )
    w_int = quant.to_int_with(w, p)
    if track:
        w_int = _tracked_int(store, w_int, ctx, calibrating=calibrating, repeat=repeat)
    w_q = quant.dequantize_with(w_int, p)
    if store.creating:
        if dampen:
            store.dampening(None)
        return w_q if ctx.quantize else w_in
    if dampen and not repeat:
        term = None
        if ctx.dampening:
            term = dampening.dampening_loss_from_quantized(
                w,
                w_q,
                scale,
                zero_point,
                n_bits=spec.n_bits,
                signed=True,
                aggregation=ctx.dampening_aggregation,
                channel_axis=WEIGHT_CHANNEL_AXIS,
            )
        store.dampening(term)
    if ctx.mode == "eval":
        record = {"int_weight": w_int, "scale": p.scale, "n_bits": jnp.asarray(spec.n_bits)}
        if p.zero_point is not None:
            record["zero_point"] = p.zero_point
        store.export_record(record)
    return w_q


__all__ = [
    "DAMPENING",
    "OSCILLATION",
    "QUANTIZED_WEIGHTS",
    "QUANT_STATS",
    "VariableStore",
    "estimate_range",
    "is_quantizer_param",
    "quantize_activation",
    "quantize_weight",
    "range_template",
    "scale_and_zero_point",
    "split_quantizer_param",
]
