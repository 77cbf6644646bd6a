"""One verb per job for a quantized model, whichever way it was written.

The same functions serve a ``flax.linen`` model quantized by rules (a
:class:`~oscqat_jax.nn.intercept.QuantizedModel`), a ``flax.nnx`` model quantized in place,
and, where it applies, the package's own models (layers taking a
:class:`~oscqat_jax.nn.config.QuantContext`):

=====================  ===========================================  ==========================
job                    Linen (rules)                                NNX (in place)
=====================  ===========================================  ==========================
quantize               ``qm = quantize_model(model, rules)``        ``quantize_model(m, rules)``
calibrate              ``variables = calibrate(qm, variables, b)``  ``calibrate(m, b)``
inspect                ``plan(qm, x)``                              ``plan(m)``
run                    ``qm.apply(variables, x, mode=...)``         ``set_mode(m, mode); m(x)``
dampening term         ``dampening_term(aux)``                      ``dampening_term(m)``
BN re-estimation       ``variables = reestimate_bn(qm, variables, b)``  ``reestimate_bn(m, b)``
=====================  ===========================================  ==========================

The modes are the same four words everywhere: ``float`` (quantizers off), ``calibrate``
(range estimation, through :func:`calibrate`), ``train`` (QAT: tracking, freezing and the
dampening term) and ``eval`` (quantized inference). :class:`ActQuant` marks an activation to
quantize in either kind of model.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.module import _context

from oscqat_jax.nn import bn, collect, intercept, nnx_quant
from oscqat_jax.nn.rules import QuantRule, SitePlan

MODES = ("float", "calibrate", "train", "eval")
"""The modes of a quantized model (see the module docstring)."""


class ActQuant(abc.ABC):  # noqa: B024 - a virtual base: both hooks are registered below
    """Marks an activation for quantization: an identity ``(...) -> (...)`` that a rule's
    ``output_bits`` turn into a fake quantizer (per tensor; input dtype out). Place it after
    BN and the activation, after a residual add, or on the logits.

    ``ActQuant()`` built inside a Linen module (its ``setup`` or a ``compact`` method) is a
    ``flax.linen`` module, anywhere else (an NNX model's ``__init__``) an ``nnx.Module``;
    ``isinstance(m, ActQuant)`` holds for both.
    """

    def __new__(cls, *args, **kwargs):
        if _context.module_stack[-1] is not None:
            return intercept.ActQuant(*args, **kwargs)
        return nnx_quant.ActQuant(*args, **kwargs)


ActQuant.register(intercept.ActQuant)
ActQuant.register(nnx_quant.ActQuant)


def _kind(model) -> str:
    if isinstance(model, intercept.QuantizedModel):
        return "rules"
    if isinstance(model, nnx.Module):
        return "nnx"
    if isinstance(model, nn.Module):
        return "linen"
    raise ValueError(
        f"Expected a QuantizedModel (from quantize_model on a Linen model), an NNX model or "
        f"a Linen model, got {type(model).__name__}."
    )


def quantize_model(model, rules: Sequence[QuantRule], *, depthwise_impl: str = "auto"):
    """Quantizes ``model`` by ``rules`` (:class:`~oscqat_jax.nn.rules.QuantRule`, e.g. from
    :func:`~oscqat_jax.nn.rules.paper_rules`): the first rule matching a site's
    ``/``-joined path decides how it is quantized; sites no rule matches stay float.

    ``depthwise_impl`` is how quantized depth-wise convs convolve (``auto``: shifted slices on
    CPU, where XLA's grouped convolution is slow; ``shifted``; ``lax``; see
    :mod:`oscqat_jax.nn.depthwise`; exports always trace ``lax``). A ``flax.linen`` model is
    left unchanged and wrapped: the result is a
    :class:`~oscqat_jax.nn.intercept.QuantizedModel` (``init``, ``apply``). An ``nnx.Module`` is changed in place and
    returned: its matched ``nnx.Conv`` / ``nnx.Linear`` / :class:`ActQuant` modules become
    quantized ones (:mod:`oscqat_jax.nn.nnx_quant`). Either way, rules that do not fit the
    model are refused in one sentence (``QuantRule.sites``) and quantizers must be
    calibrated (:func:`calibrate`) before ``train`` or ``eval``.
    """
    if isinstance(model, nnx.Module):
        return nnx_quant.quantize_nnx(model, rules, depthwise_impl=depthwise_impl)
    return intercept.quantize_model(model, rules, depthwise_impl=depthwise_impl)


def calibrate(model, *args, **kwargs):
    """Sets every quantizer's range from data (docs/method.md §3).

    - ``calibrate(qm, variables, batches, **model_kwargs) -> variables`` for a Linen model
      quantized by rules (pass the model's inference arguments, e.g. ``train=False``);
    - ``calibrate(model, batches, **call_kwargs) -> model`` for an NNX model (in place; its
      quantizers are left in ``eval``).

    A Linen model not yet quantized has nothing to calibrate: it is refused in one sentence.

    ``batches`` yields the model's positional input: an array, or a tuple of arguments.
    Each batch is checked before it is used: non-empty numeric arrays with finite values,
    which fit the model (for a model quantized by rules or an NNX model: traced abstractly
    once per input shape); a bad one is refused in one sentence naming its index.
    """
    kind = _kind(model)
    if kind == "linen":
        raise ValueError(
            f"calibrate got the Linen model {type(model).__name__}, which has no quantizers; "
            "quantize it first (quantize_model(model, rules)) and calibrate the result."
        )
    position = 0 if kind == "nnx" else 1
    if kind != "nnx":
        _check_variables(args[0] if args else kwargs.get("variables"))
    if len(args) > position:
        fits = {"rules": _fits_rules, "nnx": _fits_nnx}.get(kind)
        checked = _checked_batches(args[position], model, args[:position], kwargs, fits)
        args = (*args[:position], checked, *args[position + 1 :])
    if kind == "rules":
        return model.calibrate(*args, **kwargs)
    return nnx_quant.calibrate_nnx(model, *args, **kwargs)


def _check_variables(variables) -> None:
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise ValueError(
            "variables must be the model's variables from init (a dict with a 'params' "
            f"collection), got {type(variables).__name__}"
            + ("" if not isinstance(variables, Mapping) else f" with keys {sorted(variables)}")
            + "."
        )


def _describe(args: tuple) -> str:
    return ", ".join(f"{np.asarray(a).dtype} {tuple(np.shape(a))}" for a in args)


def _checked_batches(batches, model, variables: tuple, kwargs: dict, fits) -> Iterator:
    """``batches``, each checked as it is drawn (see :func:`calibrate`)."""
    if isinstance(batches, (str, bytes, Mapping, np.ndarray, jax.Array)) or not isinstance(
        batches, Iterable
    ):
        raise ValueError(
            "batches must be an iterable of batches (e.g. a list of arrays, [x[:32], x[32:]]), "
            f"got {type(batches).__name__}."
        )
    seen = set()
    for index, batch in enumerate(batches):
        args = batch if isinstance(batch, tuple) else (batch,)
        for arg in args:
            kind = getattr(np.asarray(arg) if not hasattr(arg, "dtype") else arg, "dtype", None)
            if (
                not hasattr(arg, "shape")
                or kind is None
                or not (jnp.issubdtype(kind, jnp.number) or kind == jnp.bool_)
            ):
                raise ValueError(
                    f"batch {index} must be an array of numbers (or a tuple of them, the "
                    f"model's positional inputs), got {type(arg).__name__}"
                    + (f" of dtype {kind}" if kind is not None else "")
                    + "."
                )
            if np.size(arg) == 0:
                raise ValueError(
                    f"batch {index} has shape {tuple(np.shape(arg))}, which holds no values; "
                    "calibrate on batches of at least one input."
                )
            if jnp.issubdtype(kind, jnp.inexact) and not bool(jnp.isfinite(arg).all()):
                raise ValueError(
                    f"batch {index} holds NaN or infinite values; calibrate on finite inputs."
                )
        signature = tuple((tuple(np.shape(a)), str(a.dtype)) for a in args)
        if fits is not None and signature not in seen:
            try:
                fits(model, variables, args, kwargs)
            except Exception as err:  # noqa: BLE001 -- whatever the model raises for this input
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ValueError(
                    f"batch {index} ({_describe(args)}) does not fit the model with the "
                    f"keyword arguments given ({reason.rstrip('.')}); pass batches of the "
                    "inputs the model was initialised with."
                ) from None
            seen.add(signature)
        yield batch


def _fits_rules(qmodel, variables: tuple, args: tuple, kwargs: dict) -> None:
    """Traces the float model on ``args`` (abstractly; raises what the model raises)."""
    jax.eval_shape(lambda v, *a: qmodel.model.apply(v, *a, **kwargs), variables[0], *args)


def _fits_nnx(model, variables: tuple, args: tuple, kwargs: dict) -> None:
    """Traces a copy of the NNX model, in calibration mode, on ``args`` (abstractly)."""
    copy = nnx.clone(model)
    copy.eval()
    if nnx_quant.quantized_modules(copy):
        nnx_quant.set_mode(copy, "calibrate")
    nnx.eval_shape(lambda m, *a: m(*a, **kwargs), copy, *args)


def plan(model, *args, rules: Sequence[QuantRule] | None = None, **kwargs) -> dict[str, SitePlan]:
    """``{site path: SitePlan}`` of every quantized site: its quantizers, whether it is a
    depth-wise conv, and the rule that decided.

    - ``plan(qm, *example_inputs, **model_kwargs)`` for a Linen model quantized by rules
      (inputs may be ``jax.ShapeDtypeStruct``; nothing is computed);
    - ``plan(model)`` for a quantized NNX model, ``plan(model, rules=rules)`` for a float
      one (what ``quantize_model(model, rules)`` would do).

    Unlike :func:`quantize_model` and ``init``, it does not refuse rules that miss, so it
    serves to debug them.
    """
    kind = _kind(model)
    if kind == "rules":
        if rules is not None:
            raise ValueError("A QuantizedModel has its rules already; call plan(qm, x).")
        return model.plan(*args, **kwargs)
    if kind != "nnx":
        raise ValueError("plan needs a QuantizedModel or an NNX model.")
    if rules is not None:
        return nnx_quant.plan_nnx(model, rules)
    modules = nnx_quant.quantized_modules(model)
    if not modules:
        raise ValueError(
            "The NNX model has no quantized layers; pass rules=... to see what they would "
            "quantize, or quantize it first."
        )
    return {path: nnx_quant.site_plan_of(module) for path, module in modules.items()}


def set_mode(model: nnx.Module, mode: str, **settings) -> None:
    """Sets an NNX model's quantizers to ``mode`` (:data:`MODES`, but ``calibrate`` is what
    :func:`calibrate` does) with the static settings and schedules of
    :func:`oscqat_jax.nn.nnx_quant.set_mode`. A Linen model takes ``mode`` per
    ``QuantizedModel.apply`` call instead."""
    if not isinstance(model, nnx.Module):
        raise ValueError(
            "set_mode is for NNX models; a Linen QuantizedModel takes the mode per call: "
            "qm.apply(variables, x, mode='train')."
        )
    nnx_quant.set_mode(model, mode, **settings)


def set_schedule(model: nnx.Module, *, freeze_threshold=None, osc_momentum=None) -> None:
    """Sets an NNX model's freezing threshold and EMA momentum (traced values too; never
    recompiles). A Linen model takes them per ``QuantizedModel.apply`` call."""
    if not isinstance(model, nnx.Module):
        raise ValueError(
            "set_schedule is for NNX models; pass freeze_threshold and osc_momentum to "
            "QuantizedModel.apply."
        )
    nnx_quant.set_schedule(model, freeze_threshold=freeze_threshold, osc_momentum=osc_momentum)


def dampening_term(source) -> jax.Array:
    """The dampening term of the last ``train`` forward pass (docs/method.md §7): a float32
    scalar, the sum over dampened kernels, each counted once however often its layer ran.

    ``source`` is the ``QuantAux`` of a Linen ``QuantizedModel.apply(..., mode="train")``,
    an NNX model after its forward pass (call it inside the loss function, after the
    forward), or the mutated collections of a package model's train call. Weight it and add
    it to the loss.
    """
    if isinstance(source, intercept.QuantAux):
        return source.dampening
    if isinstance(source, nnx.Module):
        return nnx_quant.dampening_term(source)
    if isinstance(source, Mapping):
        return collect.dampening_total(source)
    raise ValueError(
        f"dampening_term needs a QuantAux, an NNX model or the mutated collections of a train "
        f"call, got {type(source).__name__}."
    )


def reestimate_bn(model, *args, **kwargs):
    """Re-estimates BatchNorm's running statistics on the model's weights as they are now
    (docs/method.md §8): the plain averages of up to ``max_batches`` (50) per-batch means
    and unbiased variances, without gradients or tracking.

    - ``reestimate_bn(qm_or_linen_model, variables, batches, **model_kwargs) -> variables``
      (only ``batch_stats`` changes; ``flax.linen.BatchNorm`` and the package's BatchNorm);
    - ``reestimate_bn(nnx_model, batches, **call_kwargs) -> model`` (in place,
      ``nnx.BatchNorm``).
    """
    if isinstance(model, nnx.Module):
        return bn.reestimate_bn_nnx(model, *args, **kwargs)
    return bn.reestimate_bn(model, *args, **kwargs)


def oscillation_summary(source, level: float | None = None) -> dict:
    """``{"overall": summary, "per_layer": {path: summary}}``: fractions of tracked weights
    oscillating and frozen, mean frequency, count (docs/method.md §5-6). ``source`` is an NNX
    model, a Linen model's variables, or their ``oscillation`` collection."""
    if isinstance(source, nnx.Module):
        source = nnx.state(source, nnx_quant.Oscillation)
    elif isinstance(source, Mapping) and "oscillation" in source:
        source = source["oscillation"]
    kwargs = {} if level is None else {"level": level}
    return collect.oscillation_summary(source, **kwargs)


__all__ = [
    "MODES",
    "ActQuant",
    "calibrate",
    "dampening_term",
    "oscillation_summary",
    "plan",
    "quantize_model",
    "reestimate_bn",
    "set_mode",
    "set_schedule",
]
