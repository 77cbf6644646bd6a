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

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax.nn.api import check_scales
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.nnx_layers import (
    CONTEXT_MODES,
    EXPORT_RECORDS,
    NNX_MODES,
    QUANTIZABLE_TYPES,
    QUANTIZED_TYPES,
    SETTINGS,
    ActQuant,
    Dampening,
    Oscillation,
    QuantControl,
    QuantizedActivation,
    QuantizedLayer,
    QuantStats,
    is_depthwise,
)
from oscqat_jax.nn.rules import (
    QuantRule,
    Site,
    SitePlan,
    check_coverage,
    check_rules,
    site_plan,
)

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
    token = EXPORT_RECORDS.set({})
    try:
        model(x)
        return EXPORT_RECORDS.get()
    finally:
        EXPORT_RECORDS.reset(token)


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
        QuantContext.create(CONTEXT_MODES[mode], **current)
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
