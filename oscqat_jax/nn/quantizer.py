"""Weight and activation quantizers for Flax layers: variables, modes and collections.

These helpers are called from a layer's compact method and declare their variables in that
layer's scope (so a conv's weight scale is ``params/<conv>/weight_scale``, not a submodule).
The arithmetic is the functional core's (:mod:`oscqat_jax.quant`, :mod:`oscqat_jax.ranges`,
:mod:`oscqat_jax.oscillation`, :mod:`oscqat_jax.dampening`); this module only decides, per
:class:`~oscqat_jax.nn.config.QuantContext` mode, which of it runs and where results are kept.

Variables of a quantizer named ``<q>`` (``weight``, ``input``, ``output`` or ``residual``):

- ``params/<q>_scale``: float32, shape ``()`` per tensor or ``(1, ..., 1, C_out)`` per
  channel (weights only); ``params/<q>_zero_point`` (same shape) for asymmetric quantizers.
- ``quant_stats/<q>_signed`` (activations only): bool scalar, the grid's signedness, learnt
  from the data at calibration (docs/method.md §2); asymmetric activations keep the reference's
  unsigned grid, so theirs stays False.
- ``quant_stats/<q>_range`` (created by the first ``calibrate`` call, updated by later ones):
  the range estimator's accumulator, a dict of arrays (``min``/``max`` for running min-max;
  ``lower``/``upper``/``loss``/``one_sided``/``num_batches`` for the MSE search).
- ``oscillation/{prev_int, prev_dir, ema_osc, ema_int, frozen, frozen_int, freezing_started}``
  for a tracked weight: its :class:`~oscqat_jax.oscillation.OscillationState`.
- ``dampening/kernel`` (sown in ``train`` mode by a dampened weight): a 1-tuple holding the
  weight's dampening term, a float32 scalar. It is an output only: passing it back in raises.

Train calls fail loudly rather than silently: a tracked weight needs ``oscillation`` mutable
and a dampened one ``dampening`` mutable, unless the context switches that off
(``QuantContext.track_oscillations`` / ``QuantContext.dampen``).

``init`` only creates variables: no calibration, tracking or sowing happens while
initialising, so the layout after ``init`` does not depend on the context's mode.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax import dampening, oscillation, quant, ranges
from oscqat_jax.nn.config import QuantContext, QuantizerSpec

QUANT_STATS = "quant_stats"
OSCILLATION = "oscillation"
DAMPENING = "dampening"
QUANTIZED_WEIGHTS = "quantized_weights"
"""Collection names written by the quantizers (see the module docstring and ``collect``)."""

WEIGHT_CHANNEL_AXIS = -1
"""Output-channel axis of Flax kernels: HWIO for convs, (in, out) for dense layers."""

QUANTIZER_PARAM_KINDS = ("scale", "zero_point")
"""A quantizer ``<q>`` names its parameters ``<q>_scale`` and ``<q>_zero_point``."""

MSE_FIELDS = ("lower", "upper", "loss", "one_sided", "num_batches")


def split_quantizer_param(name: str) -> tuple[str, str] | None:
    """``(quantizer, kind)`` of a parameter leaf named ``<quantizer>_<kind>``, e.g.
    ``("input", "zero_point")`` for ``input_zero_point``; None for a leaf no quantizer owns
    (``kernel``, ``bias``, BatchNorm's ``scale``, which has no prefix)."""
    for kind in QUANTIZER_PARAM_KINDS:
        quantizer = name.removesuffix(f"_{kind}")
        if quantizer and quantizer != name:
            return quantizer, kind
    return None


def is_quantizer_param(name: str) -> bool:
    """Whether a parameter leaf named ``name`` belongs to a quantizer (``weight_scale``,
    ``input_scale``, ``output_zero_point``, ...): the one rule that the optimizer, the
    converter and the export follow."""
    return split_quantizer_param(name) is not None


def _path(module: nn.Module) -> str:
    return "/".join(module.scope.path) or "<top>"


def _check_dampening_collection(module: nn.Module) -> None:
    """Raises unless this train call can sow a fresh dampening term for ``module``.

    ``sow`` appends to what the collection already holds, so a ``dampening`` collection fed
    back from an earlier call (``{**variables, **mutated}``) would double the term each step
    (and recompile the step, the tuple growing); an immutable one would drop it silently.
    """
    if module.has_variable(DAMPENING, "kernel"):
        raise ValueError(
            f"Layer {_path(module)} already holds a '{DAMPENING}' term before its train call: "
            f"the variables passed to apply contain the '{DAMPENING}' collection of an earlier "
            "call, which sow would add to; drop it from the variables you keep "
            "(term, rest = oscqat_jax.nn.strip_dampening(mutated)), and call each quantized "
            "layer once per apply."
        )
    if not module.is_mutable_collection(DAMPENING):
        raise ValueError(
            f"Layer {_path(module)} dampens its weight in train mode, but '{DAMPENING}' is not "
            f"mutable, so its term would silently be 0; pass mutable=[..., '{DAMPENING}'] and "
            "add oscqat_jax.nn.strip_dampening(mutated)[0] (weighted) to the loss, or train "
            "without dampening: QuantContext.create('train', dampen=False)."
        )


def _require_mutable(module: nn.Module, collections: tuple[str, ...], why: str) -> None:
    missing = [c for c in collections if not module.is_mutable_collection(c)]
    if missing:
        raise ValueError(
            f"{why} needs the collections {missing} to be mutable in apply; pass "
            f"mutable={list(collections)} (layer {'/'.join(module.scope.path)})."
        )


def mse_range_init(
    x: jax.Array, spec: QuantizerSpec, *, channel_axis: int | None, signed
) -> ranges.MSERangeState:
    """The MSE range search of ``spec`` started on ``x`` (its first calibration batch fixes
    the candidate grid, docs/method.md §3); shared by the Linen layers and the NNX path."""
    return ranges.mse_range_init(
        x,
        n_bits=spec.n_bits,
        symmetric=spec.symmetric,
        signed=signed,
        channel_axis=channel_axis,
        num_candidates=spec.num_candidates,
        range_margin=spec.range_margin,
    )


def _estimate_range(
    module: nn.Module,
    name: str,
    x: jax.Array,
    spec: QuantizerSpec,
    *,
    channel_axis: int | None,
    signed: bool | None,
) -> tuple[jax.Array, jax.Array]:
    """Updates the ``spec.range_method`` estimator of quantizer ``name`` with ``x``; returns its range."""
    key = f"{name}_range"
    stored = module.get_variable(QUANT_STATS, key)
    if spec.range_method == "current_minmax":
        return ranges.current_minmax(x, channel_axis=channel_axis)
    if spec.range_method == "running_minmax":
        prev = None if stored is None else (stored["min"], stored["max"])
        x_min, x_max = ranges.running_minmax(
            x, prev, momentum=spec.running_momentum, channel_axis=channel_axis
        )
        module.put_variable(QUANT_STATS, key, {"min": x_min, "max": x_max})
        return x_min, x_max
    if stored is None:
        # The first calibration batch fixes the candidate grid (docs/method.md §3).
        state = mse_range_init(x, spec, channel_axis=channel_axis, signed=signed)
    else:
        state = ranges.MSERangeState(
            **{f: stored[f] for f in MSE_FIELDS},
            n_bits=spec.n_bits,
            symmetric=spec.symmetric,
            signed=signed,
            channel_axis=None if channel_axis is None else channel_axis % x.ndim,
            ndim=x.ndim,
        )
    state = ranges.mse_range_accumulate(state, x)
    module.put_variable(QUANT_STATS, key, {f: getattr(state, f) for f in MSE_FIELDS})
    return ranges.mse_range_result(state)


def scale_and_zero_point(x_min, x_max, spec: QuantizerSpec, signed) -> tuple:
    """Initial ``(scale, zero_point or None)`` of a quantizer covering ``[x_min, x_max]`` (float32)."""
    if spec.symmetric:
        scale = quant.symmetric_scale(x_min, x_max, n_bits=spec.n_bits, signed=signed)
        return scale.astype(jnp.float32), None
    scale, zero_point = quant.asymmetric_scale(x_min, x_max, n_bits=spec.n_bits, signed=signed)
    return scale.astype(jnp.float32), zero_point.astype(jnp.float32)


def quantize_activation(
    module: nn.Module, name: str, x: jax.Array, spec: QuantizerSpec, ctx: QuantContext
) -> jax.Array:
    """Fake-quantizes the activation ``x`` with quantizer ``name`` of ``module`` (per tensor).

    Returns ``x`` unchanged when ``spec`` is disabled or the mode is a float mode; otherwise
    a float32 array shaped like ``x``. In ``calibrate`` mode the range estimator is updated
    with ``x`` first and the scale (zero point, signedness) it gives are written and used.
    """
    if not spec.enabled:
        return x
    if spec.per_channel:
        raise ValueError(
            f"The {name} quantizer of {'/'.join(module.scope.path)} has per_channel=True, but "
            "activations are quantized per tensor; set per_channel only on weight quantizers."
        )
    scale = module.param(f"{name}_scale", quant.scale_initializer(1.0), (), jnp.float32)
    zero_point = None
    if not spec.symmetric:
        zero_point = module.param(f"{name}_zero_point", nn.initializers.zeros, (), jnp.float32)
    signed = module.variable(
        QUANT_STATS, f"{name}_signed", lambda: jnp.asarray(spec.symmetric, jnp.bool_)
    )
    if not ctx.quantize:
        return x
    x = x.astype(jnp.float32)
    if ctx.mode == "calibrate" and not module.is_initializing():
        _require_mutable(module, ("params", QUANT_STATS), "calibrate mode")
        # Symmetric grids take their sign from the data; asymmetric ones stay unsigned with
        # a zero point, as the reference.
        x_min, x_max = _estimate_range(
            module, name, x, spec, channel_axis=None, signed=None if spec.symmetric else False
        )
        grid_signed = (x_min < 0) if spec.symmetric else False
        scale, zero_point = scale_and_zero_point(x_min, x_max, spec, grid_signed)
        signed.value = jnp.asarray(grid_signed, jnp.bool_)
        module.put_variable("params", f"{name}_scale", scale)
        if zero_point is not None:
            module.put_variable("params", f"{name}_zero_point", zero_point)
    p = quant.quant_params(
        scale,
        zero_point,
        x_shape=x.shape,
        n_bits=spec.n_bits,
        signed=signed.value,
        grad_scale=spec.grad_scale,
    )
    return quant.dequantize_with(quant.to_int_with(x, p), p)


def _oscillation_variables(module: nn.Module, w_int: jax.Array) -> dict[str, nn.Variable]:
    """The ``oscillation`` variables of ``module``, created from ``w_int`` when absent."""
    fields = oscillation.OscillationState._fields
    missing = [f for f in fields if not module.has_variable(OSCILLATION, f)]
    if missing and not module.is_mutable_collection(OSCILLATION):
        raise ValueError(
            f"Layer {'/'.join(module.scope.path)} tracks oscillations but the variables have no "
            f"'{OSCILLATION}' entries {missing}; pass the model's '{OSCILLATION}' collection."
        )
    fresh = oscillation.init(w_int) if missing else None
    return {f: module.variable(OSCILLATION, f, lambda f=f: getattr(fresh, f)) for f in fields}


def _tracked_int(
    module: nn.Module, w_int: jax.Array, ctx: QuantContext, *, calibrating: bool
) -> jax.Array:
    """The integers the forward uses for a tracked weight, advancing its state when allowed.

    Tracking advances in ``train`` mode unless the context turns it off, and then needs a
    mutable ``oscillation`` collection (raises otherwise); calibration restarts the state
    from the new integers; otherwise frozen values are applied and the state is left alone.
    """
    variables = _oscillation_variables(module, w_int)
    state = oscillation.OscillationState(**{f: v.value for f, v in variables.items()})
    if calibrating:
        new_state = oscillation.init(w_int)
    elif ctx.tracking and not module.is_initializing():
        if not module.is_mutable_collection(OSCILLATION):
            raise ValueError(
                f"Layer {_path(module)} tracks oscillations in train mode, but "
                f"'{OSCILLATION}' is not mutable, so tracking and freezing would silently "
                f"stop; pass mutable=[..., '{OSCILLATION}'] and keep the returned collection, "
                "or train without tracking: QuantContext.create('train', "
                "track_oscillations=False)."
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
    for f, v in variables.items():
        v.value = getattr(new_state, f)
    return w_int


def _weight_params(
    module: nn.Module, w: jax.Array, spec: QuantizerSpec
) -> tuple[jax.Array, jax.Array | None]:
    """Declares ``weight_scale`` (and ``weight_zero_point``); returns their values.

    Their initial range is the kernel's min-max (the reference CLI's weight default), so an
    uncalibrated layer already quantizes sensibly.
    """
    channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
    shape = () if channel_axis is None else (1,) * (w.ndim - 1) + (w.shape[channel_axis],)

    def initial(index: int):
        def init(_key):
            x_min, x_max = ranges.current_minmax(w, channel_axis=channel_axis)
            return jnp.reshape(scale_and_zero_point(x_min, x_max, spec, True)[index], shape)

        return init

    scale = module.param("weight_scale", initial(0))
    zero_point = None if spec.symmetric else module.param("weight_zero_point", initial(1))
    return scale, zero_point


def _calibrate_weight(
    module: nn.Module, w: jax.Array, spec: QuantizerSpec, *, track: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Updates the weight's range estimator with ``w`` and writes the scale it gives."""
    needed = ("params", QUANT_STATS, OSCILLATION) if track else ("params", QUANT_STATS)
    _require_mutable(module, needed, "calibrate mode")
    channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
    x_min, x_max = _estimate_range(
        module, "weight", w, spec, channel_axis=channel_axis, signed=True
    )
    scale, zero_point = scale_and_zero_point(x_min, x_max, spec, True)
    module.put_variable("params", "weight_scale", scale)
    if zero_point is not None:
        module.put_variable("params", "weight_zero_point", zero_point)
    return scale, zero_point


def _sow_weight(
    module: nn.Module,
    w: jax.Array,
    w_q: jax.Array,
    w_int: jax.Array,
    p: quant.QuantParams,
    spec: QuantizerSpec,
    ctx: QuantContext,
    *,
    dampen: bool,
) -> None:
    """Sows the dampening term (train, unless the context turns dampening off) and the
    export record (eval, when ``quantized_weights`` is mutable)."""
    if dampen and ctx.dampening:
        _check_dampening_collection(module)
        scale, zero_point = module.get_variable("params", "weight_scale"), None
        if not spec.symmetric:
            zero_point = module.get_variable("params", "weight_zero_point")
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
        module.sow(DAMPENING, "kernel", term)
    if ctx.mode == "eval" and module.is_mutable_collection(QUANTIZED_WEIGHTS):
        record = {"int_weight": w_int, "scale": p.scale, "n_bits": jnp.asarray(spec.n_bits)}
        if p.zero_point is not None:
            record["zero_point"] = p.zero_point
        module.sow(QUANTIZED_WEIGHTS, "kernel", record)


def quantize_weight(
    module: nn.Module,
    w: jax.Array,
    spec: QuantizerSpec,
    ctx: QuantContext,
    *,
    track: bool,
    dampen: bool,
) -> jax.Array:
    """Fake-quantizes the kernel ``w`` (signed grid; per tensor or per output channel).

    Args:
      module: the layer; it receives ``weight_scale`` (and ``weight_zero_point``), and the
        ``oscillation`` variables when ``track``.
      w: float32 kernel, output channels on the last axis.
      spec: the weight quantizer; disabled returns ``w`` unchanged.
      ctx: the call's mode and dynamic settings.
      track: whether this weight is tracked and frozen (docs/method.md §5-6).
      dampen: whether this weight sows its dampening term (docs/method.md §7) in train mode (when
        ``ctx.dampen``; the ``dampening`` collection must then be mutable and empty).

    Returns:
      ``w_q`` (float32, shape of ``w``), the fake-quantized kernel with frozen entries at
      their frozen value; ``w`` itself in float modes.
    """
    if not spec.enabled:
        return w
    scale, zero_point = _weight_params(module, w, spec)
    initializing = module.is_initializing()
    if not ctx.quantize and not initializing:
        return w
    calibrating = ctx.mode == "calibrate" and not initializing
    if calibrating:
        scale, zero_point = _calibrate_weight(module, w, spec, track=track)
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
        w_int = _tracked_int(module, w_int, ctx, calibrating=calibrating)
    w_q = quant.dequantize_with(w_int, p)
    if initializing:
        return w_q if ctx.quantize else w
    _sow_weight(module, w, w_q, w_int, p, spec, ctx, dampen=dampen)
    return w_q
