"""Oscillation-aware QAT for ``flax.nnx`` models: rules replace ``nnx.Conv`` / ``nnx.Linear``.

:func:`quantize_nnx` walks a user's NNX model and replaces, in place, every ``nnx.Conv`` and
``nnx.Linear`` whose ``'/'``-joined attribute path (``"stem"``, ``"blocks/0/conv"``,
``"features_3/depthwise"``) matches a :class:`~oscqat_jax.nn.rules.QuantRule` by a
:class:`QuantizedLayer` (the rule's ``weight_bits`` quantize the kernel, its ``act_bits`` the
layer's input), and every :class:`ActQuant` hook (an identity the user places where a value
should be quantized, e.g. after BN and the activation) that a rule gives ``output_bits`` by a
:class:`QuantizedActivation`. A quantized layer keeps the user's ``kernel`` and ``bias``
``nnx.Param`` objects and the layer's own forward (the float layer's ``__call__`` runs on the
fake-quantized input and kernel), and adds the quantizer's state as attributes:

- ``weight_scale`` (float32, ``()`` or ``(1, ..., 1, C_out)`` per channel), ``input_scale``
  (``output_scale`` on a hook; ``()``) and, for asymmetric quantizers, ``<q>_zero_point``:
  ``nnx.Param``.
- ``prev_int``, ``prev_dir``, ``ema_osc``, ``ema_int``, ``frozen``, ``frozen_int``,
  ``freezing_started`` for a tracked weight: :class:`Oscillation` variables holding the
  fields of :class:`oscqat_jax.oscillation.OscillationState`, so that
  ``nnx.state(model, Oscillation)`` is exactly the tracking and freezing state.
- ``input_signed`` (``output_signed`` on a hook; bool scalars, the grid's signedness learnt at
  calibration) and ``<q>_range`` (the range estimator's accumulator, a dict of arrays with a
  ``num_batches`` counter; fixed shapes from the start so calibration compiles once):
  :class:`QuantStats` variables.
- ``dampening_term`` (float32 scalar) for a dampened weight: a :class:`Dampening` variable.

How the mode and the schedules reach the layers under ``nnx.jit``: a user's model calls its
layers as ``self.conv(x)``, so nothing can be threaded through the call. Instead

- the **mode** (``"float"``, ``"calibrate"``, ``"train"``, ``"eval"``; :data:`NNX_MODES`) is a
  static attribute of every quantized layer set by :func:`set_mode`. Like
  ``QuantContext.mode`` in Linen, another mode is another compiled program (``nnx.jit``
  keys its cache on the graph's static attributes, so each mode compiles once);
- the **freezing threshold** and the **EMA momentum** are float32 scalars held in
  :class:`QuantControl` variables (``freeze_threshold``, ``osc_momentum``) of every quantized
  layer. They are state, so a jitted step sees them as traced inputs: set them before the
  step with :func:`set_mode` (or inside it, with a traced value, via
  :func:`set_schedule`) and the step does not recompile when they change.

Modes compute what the Linen layers compute for the same ``QuantContext`` mode (see
``oscqat_jax.nn.config.MODES``): ``"float"`` is ``float_train`` / ``float_eval`` (quantizers
off), ``"calibrate"``, ``"train"`` and ``"eval"`` are the Linen modes of the same name.
BatchNorm and Dropout stay the user's (``model.train()`` / ``model.eval()``), except that
:func:`calibrate_nnx` puts the model in ``eval()`` as the Linen ``calibrate`` mode uses running
statistics. In ``"train"`` tracking and freezing advance at every call; the dampening term
of each dampened weight is *overwritten* at every call (0 outside ``"train"``), so
:func:`dampening_loss` is the term of the last forward pass and can never accumulate.

Quantizer scales and zero points are ``nnx.Param`` like the weights, but must not share the
weights' optimizer (a large momentum step drives a scale below zero): give every Param whose
name ends in ``_scale`` / ``_zero_point`` its own transformation, e.g. with
``optax.multi_transform`` over labels from those names. A typical step::

    quantize_nnx(model, rules)
    calibrate_nnx(model, batches)          # MSE ranges from data; leaves mode "eval"
    set_mode(model, "train"); model.train()

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            task = cross_entropy(model(x), y)
            return task + dampening_weight * dampening_loss(model)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for i in range(steps):
        set_mode(model, "train", freeze_threshold=schedule(i))   # no recompile
        step(model, optimizer, x, y)
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax import dampening, oscillation, quant, ranges
from oscqat_jax.nn.config import LayerQuant, QuantizerSpec

# NNX kernels keep the output channels last too: ``(*kernel_size, in // groups, out)``, ``(in, out)``.
from oscqat_jax.nn.quantizer import (
    MSE_FIELDS,
    WEIGHT_CHANNEL_AXIS,
    mse_range_init,
    scale_and_zero_point,
)
from oscqat_jax.nn.rules import QuantRule, check_rules, hook_site_quant, layer_site_quant

NNX_MODES = ("float", "calibrate", "train", "eval")
"""Modes of a quantized NNX layer (see the module docstring)."""

QUANTIZABLE_TYPES = (nnx.Conv, nnx.Linear)
"""The NNX layer types :func:`quantize_nnx` replaces (subclasses included)."""


class Oscillation(nnx.Variable):
    """Oscillation tracking / freezing state of a quantized weight (one field of
    :class:`~oscqat_jax.oscillation.OscillationState` per variable)."""


class QuantStats(nnx.Variable):
    """Quantizer statistics that are not trained: learnt grid signedness, range accumulators."""


class QuantControl(nnx.Variable):
    """Per-step settings of the quantizers (freezing threshold, EMA momentum), float32 scalars."""


class Dampening(nnx.Variable):
    """The dampening term of a weight from the last forward pass (float32 scalar)."""


# --- pure helpers: quantizer parameters and range estimation ----------------------------------


def _empty_range(spec: QuantizerSpec, shape: tuple, *, channel_axis, signed) -> dict | None:
    """Zeroed range accumulator for a tensor of ``shape`` (``num_batches == 0`` marks it empty);
    None for ``current_minmax``, which keeps no state."""
    if spec.range_method == "current_minmax":
        return None
    if spec.range_method == "running_minmax":
        keep = (
            ()
            if channel_axis is None
            else tuple(n if a == channel_axis % len(shape) else 1 for a, n in enumerate(shape))
        )
        zeros = jnp.zeros(keep, jnp.float32)
        return {"min": zeros, "max": zeros, "num_batches": jnp.zeros((), jnp.int32)}
    abstract = jax.eval_shape(
        lambda x: mse_range_init(x, spec, channel_axis=channel_axis, signed=signed),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return {f: jnp.zeros(a.shape, a.dtype) for f in MSE_FIELDS for a in [getattr(abstract, f)]}


def _estimate_range(x, stored: dict | None, spec: QuantizerSpec, *, channel_axis, signed):
    """Updates the accumulator ``stored`` with ``x``; returns ``((x_min, x_max), new_stored)``.

    An empty accumulator (``num_batches == 0``) starts from ``x``, as the first calibration
    batch fixes the MSE candidate grid (docs/method.md §3).
    """
    if spec.range_method == "current_minmax":
        return ranges.current_minmax(x, channel_axis=channel_axis), None
    first = stored["num_batches"] == 0
    if spec.range_method == "running_minmax":
        x_min, x_max = ranges.running_minmax(
            x,
            (stored["min"], stored["max"]),
            momentum=spec.running_momentum,
            channel_axis=channel_axis,
            is_first=first,
        )
        new = {"min": x_min, "max": x_max, "num_batches": stored["num_batches"] + 1}
        return (x_min, x_max), new
    fresh = mse_range_init(x, spec, channel_axis=channel_axis, signed=signed)
    state = jax.tree.map(
        lambda new, old: jnp.where(first, new, old),
        fresh,
        ranges.MSERangeState(
            **{f: stored[f] for f in MSE_FIELDS},
            n_bits=fresh.n_bits,
            symmetric=fresh.symmetric,
            signed=fresh.signed,
            channel_axis=fresh.channel_axis,
            ndim=fresh.ndim,
        ),
    )
    state = ranges.mse_range_accumulate(state, x)
    return ranges.mse_range_result(state), {f: getattr(state, f) for f in MSE_FIELDS}


def _int_and_params(x, scale, zero_point, spec: QuantizerSpec, signed):
    """``(x_int, params)``: the integer grid values of ``x`` (floats, STE gradients) and the
    prepared quantization parameters to dequantize them with."""
    p = quant.quant_params(
        scale,
        zero_point,
        x_shape=x.shape,
        n_bits=spec.n_bits,
        signed=signed,
        grad_scale=spec.grad_scale,
    )
    x_int = quant.to_int_with(x, p)
    return x_int, p


@functools.partial(jax.jit, static_argnames=("spec", "track"))
def _initial_weight_quantizer(w: jax.Array, spec: QuantizerSpec, track: bool):
    """``(scale, zero_point or None, OscillationState or None)`` of a kernel before
    calibration: the range is the kernel's min-max (the Linen layers' initial weight range),
    so an uncalibrated layer already quantizes sensibly; tracking starts from its integers."""
    channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
    x_min, x_max = ranges.current_minmax(w, channel_axis=channel_axis)
    scale, zero_point = scale_and_zero_point(x_min, x_max, spec, True)
    if not track:
        return scale, zero_point, None
    w_int, _ = _int_and_params(w, scale, zero_point, spec, True)
    return scale, zero_point, oscillation.init(w_int)


# --- the quantized layer ---------------------------------------------------------------------


def is_depthwise(layer: nnx.Module) -> bool:
    """Whether ``layer`` is a depth-wise conv (one group per input channel, more than one), as
    the Linen rules define it."""
    if not isinstance(layer, nnx.Conv):
        return False
    return layer.feature_group_count == layer.in_features > 1


class ActQuant(nnx.Module):
    """Marks an activation for quantization: identity ``(...) -> (...)`` until
    :func:`quantize_nnx` replaces it, when a rule matches its path, by a
    :class:`QuantizedActivation` using the rule's ``output_bits`` (the NNX counterpart of
    :class:`oscqat_jax.nn.intercept.ActQuant`; place it after BN and the activation, after a
    residual add, or on the logits)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class _Quantizers(nnx.Module):
    """Mode and activation-quantizer machinery shared by the quantized NNX modules."""

    def _init_activation_quantizer(self, name: str, spec: QuantizerSpec) -> None:
        if spec.enabled and spec.per_channel:
            raise ValueError(
                f"Layer {self.quant_path}: the {name} quantizer has per_channel=True, but "
                "activations are quantized per tensor; set per_channel only on weights."
            )
        if not spec.enabled:
            return
        setattr(self, f"{name}_scale", nnx.Param(jnp.ones((), jnp.float32)))
        if not spec.symmetric:
            setattr(self, f"{name}_zero_point", nnx.Param(jnp.zeros((), jnp.float32)))
        setattr(self, f"{name}_signed", QuantStats(jnp.asarray(spec.symmetric, jnp.bool_)))
        stats = _empty_range(spec, (1,), channel_axis=None, signed=_activation_signed(spec))
        if stats is not None:
            setattr(self, f"{name}_range", QuantStats(stats))

    def _calibrate(self, name: str, x: jax.Array, spec: QuantizerSpec, *, channel_axis, signed):
        """Updates quantizer ``name``'s range estimator with ``x`` and writes the scale (zero
        point, and for activations the grid's signedness) that it gives."""
        stored = getattr(self, f"{name}_range", None)
        (x_min, x_max), new = _estimate_range(
            x,
            None if stored is None else stored.get_value(),
            spec,
            channel_axis=channel_axis,
            signed=signed,
        )
        if stored is not None:
            stored.set_value(new)
        if name == "weight":
            grid_signed = True
        else:
            # Symmetric grids take their sign from the data; asymmetric ones stay unsigned.
            grid_signed = (x_min < 0) if spec.symmetric else False
            getattr(self, f"{name}_signed")[...] = jnp.asarray(grid_signed, jnp.bool_)
        initial = scale_and_zero_point(x_min, x_max, spec, grid_signed)
        for kind, value in zip(("scale", "zero_point"), initial, strict=True):
            if value is not None:
                variable = getattr(self, f"{name}_{kind}")
                variable[...] = jnp.reshape(value, variable.shape)

    def _scale_zero_point(self, name: str) -> tuple[jax.Array, jax.Array | None]:
        zero_point = getattr(self, f"{name}_zero_point", None)
        return getattr(self, f"{name}_scale")[...], None if zero_point is None else zero_point[...]

    def _quantize_activation(self, name: str, x: jax.Array, spec: QuantizerSpec) -> jax.Array:
        """Fake-quantizes activation ``x`` (per tensor; float32 out) with quantizer ``name``;
        ``x`` unchanged when ``spec`` is disabled or the mode is ``"float"``."""
        if not spec.enabled or self.quant_mode == "float":
            return x
        x = x.astype(jnp.float32)
        if self.quant_mode == "calibrate":
            self._calibrate(name, x, spec, channel_axis=None, signed=_activation_signed(spec))
        scale, zero_point = self._scale_zero_point(name)
        x_int, p = _int_and_params(x, scale, zero_point, spec, getattr(self, f"{name}_signed")[...])
        return quant.dequantize_with(x_int, p)


def _activation_signed(spec: QuantizerSpec) -> bool | None:
    """The ``signed`` argument of an activation's range search: learnt from the data (None)
    for symmetric grids, unsigned for asymmetric ones (as the reference)."""
    return None if spec.symmetric else False


class QuantizedActivation(_Quantizers):
    """An :class:`ActQuant` hook whose value is fake-quantized (quantizer ``output``:
    ``output_scale`` and ``output_signed``; per tensor; input dtype out)."""

    def __init__(self, spec: QuantizerSpec, *, path: str):
        self.quant_path = path
        self.quant_mode = "eval"
        self.spec = spec
        self._init_activation_quantizer("output", spec)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._quantize_activation("output", x, self.spec).astype(x.dtype)


class QuantizedLayer(_Quantizers):
    """An ``nnx.Conv`` or ``nnx.Linear`` with quantized input and kernel.

    Built by :func:`quantize_nnx` from the user's layer: it takes over that layer's
    attributes (the same ``kernel`` / ``bias`` ``nnx.Param`` objects) and runs the float
    layer's own ``__call__`` on the fake-quantized input; the kernel is fake-quantized as the
    layer passes it through ``promote_dtype`` (after ``Conv``'s mask, right before the
    convolution or matmul), the place the Linen interceptor uses too. Its variables are
    listed in the module docstring.

    Attributes (static):
      quant: how the layer is quantized (from the matching rule; ``output`` stays float).
      quant_path: the layer's ``'/'``-joined path in the model (for messages).
      quant_mode: one of :data:`NNX_MODES`; set with :func:`set_mode`.
      float_type: the float layer's class, whose ``__call__`` computes the conv or matmul.
      float_attributes: names of the attributes taken over from the float layer.
    """

    def __init__(self, layer: nnx.Module, quant_spec: LayerQuant, *, path: str):
        self.quant_path = path
        if quant_spec.track_oscillations and not quant_spec.weight.enabled:
            raise ValueError(
                f"Layer {path} has track_oscillations=True but its weight is not quantized; "
                "set weight bits or turn tracking off."
            )
        names = tuple(n for n in vars(layer) if not n.startswith("_"))
        for name in names:
            setattr(self, name, getattr(layer, name))
        self.float_type = type(layer)
        self.float_attributes = names
        self.quant = quant_spec
        self.quant_mode = "eval"
        self.freeze_threshold = QuantControl(jnp.zeros((), jnp.float32))
        self.osc_momentum = QuantControl(jnp.asarray(oscillation.EMA_MOMENTUM, jnp.float32))
        self._init_weight_quantizer()
        self._init_activation_quantizer("input", quant_spec.input)

    def _init_weight_quantizer(self) -> None:
        spec = self.quant.weight
        if not spec.enabled:
            return
        w = jnp.asarray(self.kernel[...], jnp.float32)
        mask = getattr(self, "mask", None)
        if mask is not None:
            w = w * mask
        scale, zero_point, state = _initial_weight_quantizer(w, spec, self.quant.track_oscillations)
        self.weight_scale = nnx.Param(scale)
        if zero_point is not None:
            self.weight_zero_point = nnx.Param(zero_point)
        channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
        stats = _empty_range(spec, w.shape, channel_axis=channel_axis, signed=True)
        if stats is not None:
            self.weight_range = QuantStats(stats)
        if state is not None:
            for field, value in state._asdict().items():
                setattr(self, field, Oscillation(value))
        if self.quant.dampen:
            self.dampening_term = Dampening(jnp.zeros((), jnp.float32))

    def _tracked_int(self, w_int: jax.Array) -> jax.Array:
        """Integers the forward uses for a tracked weight: tracking and freezing advance in
        ``"train"``, calibration restarts the state from the new integers, other modes only
        apply the frozen values."""
        fields = oscillation.OscillationState._fields
        state = oscillation.OscillationState(*(getattr(self, f)[...] for f in fields))
        if self.quant_mode == "calibrate":
            new_state = oscillation.init(w_int)
        elif self.quant_mode == "train":
            w_int, new_state = oscillation.update(
                state,
                w_int,
                momentum=self.osc_momentum[...],
                freeze_threshold=self.freeze_threshold[...],
            )
        else:
            return oscillation.apply_frozen(state, w_int)
        for field, value in new_state._asdict().items():
            getattr(self, field)[...] = value
        return w_int

    def _quantize_weight(self, w: jax.Array) -> jax.Array:
        """The fake-quantized kernel (float32, shape of ``w``, signed grid, frozen entries at
        their frozen value); writes this pass's dampening term (0 outside ``"train"``)."""
        spec = self.quant.weight
        w = w.astype(jnp.float32)
        channel_axis = WEIGHT_CHANNEL_AXIS if spec.per_channel else None
        if self.quant_mode == "calibrate":
            self._calibrate("weight", w, spec, channel_axis=channel_axis, signed=True)
        scale, zero_point = self._scale_zero_point("weight")
        w_int, p = _int_and_params(w, scale, zero_point, spec, True)
        if self.quant.track_oscillations:
            w_int = self._tracked_int(w_int)
        w_q = quant.dequantize_with(w_int, p)
        if self.quant.dampen:
            self.dampening_term[...] = (
                dampening.dampening_loss_from_quantized(
                    w,
                    w_q,
                    scale,
                    zero_point,
                    n_bits=spec.n_bits,
                    signed=True,
                    channel_axis=WEIGHT_CHANNEL_AXIS,
                )
                if self.quant_mode == "train"
                else jnp.zeros((), jnp.float32)
            )
        return w_q

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        """The float layer's output for the fake-quantized input and kernel (shape and dtype
        as the float layer's); arguments after ``x`` go to the float layer's ``__call__``."""
        x = self._quantize_activation("input", x, self.quant.input)
        view = types.SimpleNamespace(**{n: getattr(self, n) for n in self.float_attributes})
        if self.quant.weight.enabled and self.quant_mode != "float":
            calls = []

            def promote(arrays, *promote_args, **promote_kwargs):
                inputs, kernel, *rest = arrays
                calls.append(kernel.shape)
                kernel = self._quantize_weight(kernel)
                return self.promote_dtype((inputs, kernel, *rest), *promote_args, **promote_kwargs)

            view.promote_dtype = promote
            y = self.float_type.__call__(view, x, *args, **kwargs)
            if len(calls) != 1:
                raise RuntimeError(
                    f"Layer {self.quant_path} ({self.float_type.__name__}) passed its kernel "
                    f"through promote_dtype {len(calls)} times instead of once; this layer "
                    "cannot be quantized by quantize_nnx."
                )
            return y
        if self.quant.weight.enabled and self.quant.dampen:
            self.dampening_term[...] = jnp.zeros((), jnp.float32)
        return self.float_type.__call__(view, x, *args, **kwargs)


QUANTIZED_TYPES = (QuantizedLayer, QuantizedActivation)
"""The module types :func:`quantize_nnx` puts into a model."""


# --- the model-level API ---------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _sites(model: nnx.Module):
    """``(path, module)`` of every ``nnx.Conv`` / ``nnx.Linear`` / :class:`ActQuant` under
    ``model``, path as a tuple of attribute names and indices."""
    if not isinstance(model, nnx.Module):
        raise ValueError(f"quantize_nnx needs a flax.nnx Module, got {type(model).__name__}.")
    for path, module in nnx.iter_modules(model):
        if path and isinstance(module, (*QUANTIZABLE_TYPES, ActQuant)):
            yield path, module


def quantized_modules(model: nnx.Module) -> dict[str, QuantizedLayer | QuantizedActivation]:
    """The quantized layers and hooks of ``model`` by ``'/'``-joined path."""
    return {_path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZED_TYPES)}


def _site_quant(rules: tuple[QuantRule, ...], path: str, module: nnx.Module):
    if isinstance(module, ActQuant):
        return hook_site_quant(rules, path)
    return layer_site_quant(rules, path, depthwise=is_depthwise(module))


def plan_nnx(model: nnx.Module, rules: Sequence[QuantRule]) -> dict[str, LayerQuant]:
    """``{path: LayerQuant}`` of every site ``rules`` quantize (layers report ``weight`` /
    ``input``, :class:`ActQuant` hooks ``output``), as :meth:`QuantizedModel.plan` in Linen."""
    rules = check_rules(rules)
    plan = {}
    for path, module in _sites(model):
        site = _site_quant(rules, _path_str(path), module)
        if isinstance(site, QuantizerSpec):
            site = LayerQuant(output=site)
        if site.quantized:
            plan[_path_str(path)] = site
    return plan


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(parent, key)
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def quantize_nnx(model: nnx.Module, rules: Sequence[QuantRule]) -> nnx.Module:
    """Replaces, in place, each ``nnx.Conv`` / ``nnx.Linear`` / :class:`ActQuant` of ``model``
    that a rule quantizes.

    Args:
      model: an NNX model; its layers are found by ``nnx.iter_modules`` and named by their
        ``'/'``-joined attribute path (``nnx.List`` / ``nnx.Sequential`` items by index,
        e.g. ``"blocks/0/conv"``).
      rules: :class:`~oscqat_jax.nn.rules.QuantRule` objects; the first rule whose
        ``module_path`` regex fully matches a site's path (and whose ``depthwise`` filter
        agrees) decides how it is quantized; sites that no rule matches stay float.

    Returns:
      ``model`` itself, its matched layers now :class:`QuantizedLayer` (hooks
      :class:`QuantizedActivation`) in mode ``"eval"``: weights quantized with the kernel's
      min-max range and activations with unit scales until :func:`calibrate_nnx` runs.
    """
    if quantized_modules(model):
        raise ValueError(
            "quantize_nnx was given a model that already has quantized layers "
            f"({', '.join(quantized_modules(model))}); quantize the float model once."
        )
    plan = plan_nnx(model, rules)
    if not plan:
        found = [_path_str(p) for p, _ in _sites(model)]
        raise ValueError(
            f"No rule quantizes any layer; the model's nnx.Conv / nnx.Linear / ActQuant paths "
            f"are {found}. Write QuantRule.module_path as a regex over these."
        )
    for path, module in list(_sites(model)):
        name = _path_str(path)
        if name not in plan:
            continue
        if isinstance(module, ActQuant):
            new = QuantizedActivation(plan[name].output, path=name)
        else:
            new = QuantizedLayer(module, plan[name], path=name)
        _replace(model, path, new)
    return model


def _quantized_or_error(model: nnx.Module) -> dict[str, QuantizedLayer | QuantizedActivation]:
    modules = quantized_modules(model)
    if not modules:
        raise ValueError(
            "The model has no quantized layers; call quantize_nnx(model, rules) first."
        )
    return modules


def _layers(model: nnx.Module) -> list[QuantizedLayer]:
    return [m for m in _quantized_or_error(model).values() if isinstance(m, QuantizedLayer)]


def set_schedule(model: nnx.Module, *, freeze_threshold=None, osc_momentum=None) -> None:
    """Sets the freezing threshold and/or the EMA momentum of every quantized layer.

    Values are float scalars or scalar arrays, traced ones too (inside ``nnx.jit``); they
    are state, so changing them never recompiles a jitted step. None leaves a value alone.
    """
    for layer in _layers(model):
        if freeze_threshold is not None:
            layer.freeze_threshold[...] = jnp.asarray(freeze_threshold, jnp.float32)
        if osc_momentum is not None:
            layer.osc_momentum[...] = jnp.asarray(osc_momentum, jnp.float32)


def set_mode(model: nnx.Module, mode: str, *, freeze_threshold=None, osc_momentum=None) -> None:
    """Sets the quantizers' mode (one of :data:`NNX_MODES`) and optionally the schedules.

    Call it outside jitted code: the mode is static (each mode compiles once). BatchNorm and
    Dropout are left alone; use ``model.train()`` / ``model.eval()`` for those.
    """
    if mode not in NNX_MODES:
        raise ValueError(f"mode must be one of {', '.join(NNX_MODES)}, got {mode!r}.")
    for module in _quantized_or_error(model).values():
        module.quant_mode = mode
    set_schedule(model, freeze_threshold=freeze_threshold, osc_momentum=osc_momentum)


def dampening_loss(model: nnx.Module) -> jax.Array:
    """Sum over dampened kernels of their dampening terms from the last forward pass
    (float32 scalar, ``kernel_mean`` aggregation per kernel, docs/method.md §7).

    Call it inside the loss function after the forward pass, so its gradient reaches the
    weights; it is 0 when that pass was not in ``"train"`` mode. Each pass overwrites the
    terms, so the value never accumulates across calls or steps.
    """
    total = jnp.zeros((), jnp.float32)
    for layer in _layers(model):
        if layer.quant.weight.enabled and layer.quant.dampen:
            total = total + layer.dampening_term[...]
    return total


@functools.partial(nnx.jit, static_argnames="call_kwargs")
def _calibration_pass(model: nnx.Module, args: tuple, call_kwargs: tuple) -> None:
    model(*args, **dict(call_kwargs))


def calibrate_nnx(model: nnx.Module, batches: Iterable[Any], **call_kwargs) -> nnx.Module:
    """Sets every quantizer's range from data (docs/method.md §3), as the Linen ``calibrate`` mode.

    Puts the model in ``eval()`` (BatchNorm uses running statistics, as in Linen) and the
    quantizers in ``"calibrate"``; runs ``model(*batch, **call_kwargs)`` under ``nnx.jit``
    for each batch (an array, or a tuple of positional arguments; ``call_kwargs`` are static
    and must be hashable): each quantizer updates its range estimator, writes the scale it
    gives and restarts the oscillation state from the newly rounded weights, so downstream
    quantizers see the already-quantized network. Leaves the quantizers in ``"eval"``; range
    accumulators continue from an earlier calibration. Returns ``model``.
    """
    _quantized_or_error(model)
    model.eval()
    set_mode(model, "calibrate")
    static_kwargs = tuple(sorted(call_kwargs.items()))
    count = 0
    for batch in batches:
        _calibration_pass(model, batch if isinstance(batch, tuple) else (batch,), static_kwargs)
        count += 1
    set_mode(model, "eval")
    if count == 0:
        raise ValueError("calibrate_nnx needs at least one batch; batches was empty.")
    return model


__all__ = [
    "NNX_MODES",
    "QUANTIZED_TYPES",
    "ActQuant",
    "Dampening",
    "Oscillation",
    "QuantControl",
    "QuantStats",
    "QuantizedActivation",
    "QuantizedLayer",
    "calibrate_nnx",
    "dampening_loss",
    "is_depthwise",
    "plan_nnx",
    "quantize_nnx",
    "quantized_modules",
    "set_mode",
    "set_schedule",
]
