"""The NNX adapter of the quantizer state machine: quantized layers replace ``nnx.Conv`` /
``nnx.Linear`` in place.

Users reach it through :mod:`oscqat_jax.nn.verbs` (``quantize_model``, ``calibrate``,
``plan``, ``set_mode``, ``dampening_term`` on an NNX model); the README's NNX example shows a
training step. :func:`quantize_nnx` replaces every ``nnx.Conv`` / ``nnx.Linear`` whose
``/``-joined attribute path (``"stem"``, ``"blocks/0/conv"``) a
:class:`~oscqat_jax.nn.rules.QuantRule` quantizes by a :class:`QuantizedLayer`, and every
:class:`ActQuant` hook a rule gives ``output_bits`` by a :class:`QuantizedActivation`. A
quantized layer keeps the user's ``kernel`` and ``bias`` ``nnx.Param`` objects and the float
layer's own ``__call__``, run on the fake-quantized input and kernel; the quantizers
(:mod:`oscqat_jax.nn.quantizer`) keep their variables as its attributes, named as in Linen:
``nnx.Param`` scales and zero points, :class:`QuantStats` (grid signedness, range
accumulators, created zeroed at quantization since a jitted call cannot add variables),
:class:`Oscillation` (so ``nnx.state(model, Oscillation)`` is exactly the tracking and
freezing state) and a :class:`Dampening` term overwritten at every call (0 outside
``"train"``, so it never accumulates).

Under ``nnx.jit`` nothing can be threaded through ``self.conv(x)``, so the **mode**
(:data:`NNX_MODES`) and the static settings (:data:`SETTINGS`) are static attributes set by
:func:`set_mode` (each combination compiles once), while the **freezing threshold** and the
**EMA momentum** are :class:`QuantControl` variables, traced inputs of a jitted step
(:func:`set_schedule`; changing them never recompiles). A layer starts uncalibrated (calls
raise) until :func:`calibrate_nnx` has run. BatchNorm and Dropout stay the model's own
(``model.train()`` / ``model.eval()``); calibration puts the model in ``eval()``.
"""

from __future__ import annotations

import contextvars
import functools
import types
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax import oscillation
from oscqat_jax.nn import depthwise, quantizer
from oscqat_jax.nn.api import check_scales
from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.quantizer import OSCILLATION, PARAMS, QUANT_STATS
from oscqat_jax.nn.rules import (
    QuantRule,
    Site,
    SitePlan,
    check_coverage,
    check_rules,
    site_plan,
)

NNX_MODES = ("float", "calibrate", "train", "eval")
"""Modes of a quantized NNX layer (see the module docstring)."""

UNCALIBRATED = "uncalibrated"
"""The mode of a quantized layer between :func:`quantize_nnx` and calibration: calls raise."""

_CONTEXT_MODES = {"float": "float_eval", "calibrate": "calibrate", "train": "train", "eval": "eval"}

SETTINGS = ("use_ema_freeze", "dampening_aggregation", "track_oscillations", "dampen")
"""The static :class:`~oscqat_jax.nn.config.QuantContext` settings :func:`set_mode` takes."""

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


_VARIABLE_TYPES = {PARAMS: nnx.Param, QUANT_STATS: QuantStats, OSCILLATION: Oscillation}

_EXPORT_RECORDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "oscqat_nnx_export_records", default=None
)
"""While set (by :func:`quantized_weight_records`), ``eval`` calls record their integers."""

_TRACKED_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per quantized layer, a weak reference to the kernel value its last ``train`` call tracked:
a later call that sees the very same value runs in the same step (see ``_is_repeat``)."""


class _Store:
    """The NNX adapter of the state machine (:class:`oscqat_jax.nn.quantizer.VariableStore`):
    a quantized layer's ``nnx.Variable`` attributes, named as the Linen variables."""

    def __init__(self, layer: nnx.Module, *, creating: bool = False):
        self.layer = layer
        self.path = layer.quant_path
        self.creating = creating

    def get(self, collection: str, name: str) -> Any | None:
        variable = getattr(self.layer, name, None)
        return None if variable is None else variable.get_value()

    def declare(self, collection: str, name: str, init) -> Any:
        if getattr(self.layer, name, None) is None:
            setattr(self.layer, name, _VARIABLE_TYPES[collection](init()))
        return getattr(self.layer, name).get_value()

    def put(self, collection: str, name: str, value: Any) -> None:
        variable = getattr(self.layer, name, None)
        if variable is None:
            setattr(self.layer, name, _VARIABLE_TYPES[collection](value))
        else:
            variable.set_value(value)

    def writable(self, collection: str) -> bool:
        return True

    def declare_range(self, name: str, template) -> None:
        setattr(self.layer, f"{name}_range", QuantStats(template()))

    def dampening(self, term: jax.Array | None) -> None:
        # Overwritten at every call (0 outside train), so the term never accumulates.
        value = jnp.zeros((), jnp.float32) if term is None else term
        if self.creating:
            self.layer.dampening_term = Dampening(value)
        else:
            self.layer.dampening_term[...] = value

    def export_record(self, record: dict) -> None:
        records = _EXPORT_RECORDS.get()
        if records is not None:
            records[self.path] = record


class ActQuant(nnx.Module):
    """Marks an activation for quantization: identity ``(...) -> (...)`` until
    :func:`quantize_nnx` replaces it, when a rule matches its path, by a
    :class:`QuantizedActivation` using the rule's ``output_bits`` (the NNX counterpart of
    :class:`oscqat_jax.nn.intercept.ActQuant`; place it after BN and the activation, after a
    residual add, or on the logits)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def is_depthwise(layer: nnx.Module) -> bool:
    """Whether ``layer`` is a depth-wise conv (one group per input channel, more than one), as
    the Linen rules define it."""
    if not isinstance(layer, nnx.Conv):
        return False
    return layer.feature_group_count == layer.in_features > 1


class _Quantized(nnx.Module):
    """Mode and settings shared by the quantized NNX modules."""

    def _init_quantized(self, path: str) -> None:
        self.quant_path = path
        self.quant_mode = UNCALIBRATED
        self.quant_settings = (True, "kernel_mean", True, True)
        self.freeze_threshold = QuantControl(jnp.zeros((), jnp.float32))
        self.osc_momentum = QuantControl(jnp.asarray(oscillation.EMA_MOMENTUM, jnp.float32))

    def _context(self) -> QuantContext:
        if self.quant_mode == UNCALIBRATED:
            raise ValueError(
                f"Layer {self.quant_path} was quantized but not calibrated, so its scales are "
                "placeholders; run calibrate(model, batches) on a few batches of training "
                "data first (or set_mode(model, 'float') to run the float model)."
            )
        return QuantContext(
            freeze_threshold=self.freeze_threshold[...],
            osc_momentum=self.osc_momentum[...],
            mode=_CONTEXT_MODES[self.quant_mode],
            **dict(zip(SETTINGS, self.quant_settings, strict=True)),
        )


class QuantizedActivation(_Quantized):
    """An :class:`ActQuant` hook whose value is fake-quantized (quantizer ``output``:
    ``output_scale`` and ``output_signed``; per tensor; input dtype out)."""

    def __init__(self, spec: QuantizerSpec, *, path: str, plan: SitePlan | None = None):
        self._init_quantized(path)
        self.spec = spec
        self.site = plan or SitePlan(output=spec, kind="hook")
        quantizer.quantize_activation(
            _Store(self, creating=True),
            "output",
            jnp.zeros((1,), jnp.float32),
            spec,
            QuantContext.create("eval"),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = quantizer.quantize_activation(_Store(self), "output", x, self.spec, self._context())
        return y.astype(x.dtype)


def _check_unstacked(layer: nnx.Module, path: str) -> None:
    """Raises for a layer whose kernel holds several layers' kernels on a leading axis (made
    by ``nnx.vmap`` for ``nnx.scan``): one scale and one tracking state per stacked layer
    would need every quantizer variable stacked the same way."""
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        return
    if isinstance(layer, nnx.Conv):
        expected = len(layer.kernel_size) + 2
    else:
        expected = 2
    if kernel.ndim != expected:
        raise ValueError(
            f"Layer {path} ({type(layer).__name__}) holds {kernel.shape[0]} stacked kernels "
            f"(shape {tuple(kernel.shape)}, as nnx.vmap makes them for nnx.scan), which "
            "quantize_nnx cannot give one quantizer each; keep the layers unstacked (an nnx.List "
            "iterated in a Python loop), or write the model in Linen with nn.scan, which "
            "quantize_model supports."
        )


class QuantizedLayer(_Quantized):
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

    def __init__(
        self, layer: nnx.Module, quant_spec: LayerQuant, *, path: str, depthwise_impl="auto"
    ):
        if quant_spec.track_oscillations and not quant_spec.weight.enabled:
            raise ValueError(
                f"Layer {path} has track_oscillations=True but its weight is not quantized; "
                "set weight bits or turn tracking off."
            )
        _check_unstacked(layer, path)
        names = tuple(n for n in vars(layer) if not n.startswith("_"))
        for name in names:
            setattr(self, name, getattr(layer, name))
        self.float_type = type(layer)
        self.float_attributes = names
        # Quantized depth-wise convs convolve as the Linen path's (oscqat_jax.nn.depthwise).
        depthwise.resolve_impl(depthwise_impl)  # one sentence for a bad value
        self.depthwise_impl = depthwise_impl if is_depthwise(layer) else None
        self.quant = quant_spec
        self._init_quantized(path)
        store, ctx = _Store(self, creating=True), QuantContext.create("eval")
        if quant_spec.weight.enabled:
            w = jnp.asarray(self.kernel[...], jnp.float32)
            mask = getattr(self, "mask", None)
            self._quantize_kernel(store, w if mask is None else w * mask, ctx)
        quantizer.quantize_activation(
            store, "input", jnp.zeros((1,), jnp.float32), quant_spec.input, ctx
        )

    def _quantize_kernel(self, store: _Store, w: jax.Array, ctx: QuantContext, repeat=False):
        return quantizer.quantize_weight(
            store,
            w,
            self.quant.weight,
            ctx,
            track=self.quant.track_oscillations,
            dampen=self.quant.dampen,
            repeat=repeat,
        )

    def _is_repeat(self, kernel: jax.Array, ctx: QuantContext) -> bool:
        """Whether a ``train`` call sees the kernel value this layer already tracked: a tied
        or looped layer called again in the same forward (the same array, or the same tracer
        under ``nnx.jit``), whose tracking must not advance twice. An optimizer update, or a
        new trace, gives the kernel a new value."""
        if ctx.mode != "train":
            return False
        seen = _TRACKED_KERNELS.get(self)
        if seen is not None and seen() is kernel:
            return True
        _TRACKED_KERNELS[self] = weakref.ref(kernel)
        return False

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        """The float layer's output for the fake-quantized input and kernel (shape and dtype
        as the float layer's); arguments after ``x`` go to the float layer's ``__call__``."""
        ctx, store = self._context(), _Store(self)
        x = quantizer.quantize_activation(store, "input", x, self.quant.input, ctx)
        view = types.SimpleNamespace(**{n: getattr(self, n) for n in self.float_attributes})
        if ctx.quantize and self.depthwise_impl is not None and self.float_type is nnx.Conv:
            if depthwise.resolve_impl(self.depthwise_impl) == "shifted":
                view.conv_general_dilated = depthwise.conv_general_dilated_with(
                    "shifted", self.conv_general_dilated
                )
        if not self.quant.weight.enabled:
            return self.float_type.__call__(view, x, *args, **kwargs)
        repeat = self._is_repeat(self.kernel.get_value(), ctx)
        calls = []

        def promote(arrays, *promote_args, **promote_kwargs):
            inputs, kernel, *rest = arrays
            calls.append(kernel.shape)
            w_q = self._quantize_kernel(store, kernel, ctx, repeat)
            if not ctx.quantize:
                w_q = kernel
            return self.promote_dtype((inputs, w_q, *rest), *promote_args, **promote_kwargs)

        view.promote_dtype = promote
        y = self.float_type.__call__(view, x, *args, **kwargs)
        if len(calls) != 1:
            raise RuntimeError(
                f"Layer {self.quant_path} ({self.float_type.__name__}) passed its kernel "
                f"through promote_dtype {len(calls)} times instead of once; this layer "
                "cannot be quantized by quantize_nnx."
            )
        return y


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


def _site(path: tuple, module: nnx.Module) -> Site:
    if isinstance(module, ActQuant):
        return Site(_path_str(path), "hook")
    return Site(_path_str(path), "layer", is_depthwise(module))


def plan_nnx(model: nnx.Module, rules: Sequence[QuantRule]) -> dict[str, SitePlan]:
    """``{path: SitePlan}`` of every site of the float ``model`` that ``rules`` quantize
    (layers report ``weight`` / ``input``, :class:`ActQuant` hooks ``output``; with the
    depth-wise flag and the deciding rule), as :meth:`QuantizedModel.plan` in Linen. Does
    not check the rules' coverage, so it also serves to debug rules that
    :func:`quantize_nnx` refuses."""
    rules = check_rules(rules)
    plans = {}
    for path, module in _sites(model):
        plan = site_plan(rules, _site(path, module))
        if plan.quantized:
            plans[_path_str(path)] = plan
    return plans


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(parent, key)
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def quantize_nnx(
    model: nnx.Module, rules: Sequence[QuantRule], *, depthwise_impl: str = "auto"
) -> nnx.Module:
    """Replaces, in place, each ``nnx.Conv`` / ``nnx.Linear`` / :class:`ActQuant` of ``model``
    that a rule quantizes.

    Args:
      model: an NNX model; its layers are found by ``nnx.iter_modules`` and named by their
        ``'/'``-joined attribute path (``nnx.List`` / ``nnx.Sequential`` items by index,
        e.g. ``"blocks/0/conv"``).
      rules: :class:`~oscqat_jax.nn.rules.QuantRule` objects; the first rule whose
        ``module_path`` regex fully matches a site's path (and whose ``depthwise`` filter
        agrees) decides how it is quantized; sites that no rule matches stay float.
      depthwise_impl: how quantized depth-wise ``nnx.Conv`` layers convolve (``auto``:
        shifted slices on CPU, where XLA's grouped convolution is slow; ``shifted``;
        ``lax``), as in Linen (:mod:`oscqat_jax.nn.depthwise`); exports always trace ``lax``.

    Returns:
      ``model`` itself, its matched layers now :class:`QuantizedLayer` (hooks
      :class:`QuantizedActivation`) in mode ``"eval"``: weights quantized with the kernel's
      min-max range and activations with unit scales until :func:`calibrate_nnx` runs.

    Raises when the rules do not fit the model (a rule matching no site, a rule meant for
    one layer matching several, nothing quantized: see ``QuantRule.sites``).
    """
    if quantized_modules(model):
        raise ValueError(
            "quantize_nnx was given a model that already has quantized layers "
            f"({', '.join(quantized_modules(model))}); quantize the float model once."
        )
    rules = check_rules(rules)
    check_coverage(rules, [_site(path, module) for path, module in _sites(model)])
    plan = plan_nnx(model, rules)
    for path, module in list(_sites(model)):
        name = _path_str(path)
        if name not in plan:
            continue
        if isinstance(module, ActQuant):
            new = QuantizedActivation(plan[name].output, path=name, plan=plan[name])
        else:
            new = QuantizedLayer(module, plan[name], path=name, depthwise_impl=depthwise_impl)
        _replace(model, path, new)
    return model


@nnx.jit
def _recorded_forward(model: nnx.Module, x: jax.Array) -> dict:
    token = _EXPORT_RECORDS.set({})
    try:
        model(x)
        return _EXPORT_RECORDS.get()
    finally:
        _EXPORT_RECORDS.reset(token)


def quantized_weight_records(model: nnx.Module, x: jax.Array) -> dict[str, dict]:
    """``{layer path: {"int_weight", "scale", "n_bits"[, "zero_point"]}}``: the integers
    each quantized kernel has in an ``eval`` forward of ``x`` (frozen values applied), as
    the Linen layers sow them for the export. Leaves the model in eval (BatchNorm too)."""
    modules = _quantized_or_error(model)
    set_mode(model, "eval")
    model.eval()
    records = _recorded_forward(model, x)
    return {path: records[path] for path in modules if path in records}


def site_plan_of(module: QuantizedLayer | QuantizedActivation) -> SitePlan:
    """The :class:`~oscqat_jax.nn.rules.SitePlan` a quantized module was built from."""
    return module.site if isinstance(module, QuantizedActivation) else module.quant


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
    for layer in _quantized_or_error(model).values():
        if freeze_threshold is not None:
            layer.freeze_threshold[...] = jnp.asarray(freeze_threshold, jnp.float32)
        if osc_momentum is not None:
            layer.osc_momentum[...] = jnp.asarray(osc_momentum, jnp.float32)


def _uncalibrated(module: QuantizedLayer | QuantizedActivation) -> list[str]:
    """Names of the module's quantizers whose range estimator has seen no batch."""
    names = []
    for name in ("weight", "input", "output"):
        stats = getattr(module, f"{name}_range", None)
        if stats is not None and int(stats.get_value()["num_batches"]) == 0:
            names.append(name)
    return names


def set_mode(
    model: nnx.Module,
    mode: str,
    *,
    freeze_threshold=None,
    osc_momentum=None,
    **settings,
) -> None:
    """Sets the quantizers' mode (one of :data:`NNX_MODES`) and optionally their settings.

    Call it outside jitted code: the mode and ``settings`` are static (each combination
    compiles once). ``settings`` are the static :class:`~oscqat_jax.nn.config.QuantContext`
    fields named in :data:`SETTINGS` (``use_ema_freeze``, ``dampening_aggregation``,
    ``track_oscillations``, ``dampen``); those not given keep their values.
    ``freeze_threshold`` and ``osc_momentum`` are as in :func:`set_schedule`. BatchNorm and
    Dropout are left alone; use ``model.train()`` / ``model.eval()`` for those.

    Raises when ``mode`` is ``train`` or ``eval`` and a quantizer has not been calibrated
    (its scale would be a placeholder).
    """
    if mode not in NNX_MODES:
        raise ValueError(f"mode must be one of {', '.join(NNX_MODES)}, got {mode!r}.")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"set_mode got unknown settings {unknown}; the settings are {', '.join(SETTINGS)}."
        )
    modules = _quantized_or_error(model)
    if mode in ("train", "eval"):
        check_scales(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        for path, module in modules.items():
            missing = _uncalibrated(module)
            if missing:
                raise ValueError(
                    f"The {missing[0]} quantizer of layer {path} has not been calibrated, so "
                    f"its scale is a placeholder and '{mode}' would quantize with it; run "
                    "calibrate(model, batches) on a few batches of training data first."
                )
    for module in modules.values():
        current = dict(zip(SETTINGS, module.quant_settings, strict=True))
        current.update(settings)
        # Validated as the Linen path validates them.
        QuantContext.create(_CONTEXT_MODES[mode], **current)
        module.quant_mode = mode
        module.quant_settings = tuple(current[k] for k in SETTINGS)
    set_schedule(model, freeze_threshold=freeze_threshold, osc_momentum=osc_momentum)


def dampening_term(model: nnx.Module) -> jax.Array:
    """Sum over dampened kernels of their dampening terms from the last forward pass
    (float32 scalar; each reduced as ``set_mode``'s ``dampening_aggregation`` says,
    docs/method.md §7).

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
    if count == 0:
        raise ValueError("calibrate_nnx needs at least one batch; batches was empty.")
    set_mode(model, "eval")
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
    "dampening_term",
    "is_depthwise",
    "plan_nnx",
    "quantize_nnx",
    "quantized_modules",
    "set_mode",
    "set_schedule",
]
