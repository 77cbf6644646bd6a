"""Quantize a plain ``flax.linen`` model by rules, without editing it.

:func:`quantize_model` wraps a model written with ordinary Flax layers. While the wrapper runs
the model, a method interceptor (``flax.linen.intercept_methods``, Flax's public hook) sees
every module call; for each quantization site whose path a :class:`~oscqat_jax.nn.rules.QuantRule`
matches it runs the package's quantizers (:mod:`oscqat_jax.nn.quantizer`) in that module's
scope, so the variables land where the package's own layers keep them:
``params/<layer>/{weight_scale, input_scale}``, ``quant_stats/<layer>/input_signed``,
``oscillation/<layer>/{prev_int, ..., frozen_int}``.

Sites:

- ``nn.Conv``, ``nn.ConvTranspose``, ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``:
  the input (the first argument) is fake-quantized before the layer runs, and the kernel is
  fake-quantized (tracked, frozen, dampened) as the layer hands it to ``promote_dtype``, the
  one function each of these layers passes its kernel through right before the convolution
  or contraction (after ``Conv``'s mask). The wrapper swaps that field on the bound layer for
  the duration of the call. Per-channel weight scales need the output channels on the
  kernel's last axis: true for ``Conv``, ``Dense``, ``ConvTranspose`` (unless
  ``transpose_kernel``) and ``DenseGeneral`` with one feature axis; the others raise.
  ``nn.ConvLocal``, ``nn.Embed`` and attention layers are not sites.
- :class:`~oscqat_jax.nn.convbn.ConvBN` (a conv and the package's BatchNorm): quantized as a
  conv layer (its input and its conv's kernel), BN folded into the quantized kernel when the
  rule says ``fold_bn`` (see :mod:`oscqat_jax.nn.convbn`); its inner conv is not a site.
- :class:`ActQuant`: an identity module the user places where an activation should be
  quantized (after BN and the activation, after a residual add, on the logits); the
  quantizer is named ``output`` (``params/<hook>/output_scale``). This is the one extra hook:
  those values are not the input or output of any conv/dense call, so interception alone
  cannot find them (the ``LSQ_paper`` setup needs no hook at all).

Modes of :meth:`QuantizedModel.apply`: ``eval`` (quantized inference), ``train`` (QAT:
oscillation tracking, freezing and the dampening term) and ``float`` (quantizers off). The
model's own switches (BatchNorm's ``use_running_average``, dropout) stay the user's keyword
arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax.core import lift
from flax.core.scope import in_filter
from flax.errors import ScopeCollectionNotFound

from oscqat_jax import oscillation
from oscqat_jax.nn import depthwise
from oscqat_jax.nn.api import CALIBRATION_COLLECTIONS, check_scales
from oscqat_jax.nn.collect import dampening_total
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.interceptor import LAYER_TYPES, ActQuant, interceptor
from oscqat_jax.nn.quantizer import DAMPENING, OSCILLATION, QUANT_STATS, QUANTIZED_WEIGHTS
from oscqat_jax.nn.rules import QuantRule, SitePlan, check_coverage, check_rules

APPLY_MODES = {"eval": "eval", "train": "train", "float": "float_eval"}
"""``QuantizedModel.apply`` modes and the :class:`QuantContext` mode each one runs."""


class QuantAux(NamedTuple):
    """The side results of a ``train`` call.

    ``dampening`` is the float32 scalar sum of the dampening terms of every dampened kernel
    (docs/method.md §7, ``kernel_mean`` aggregation per layer); add ``weight * dampening`` to
    the loss. ``updates`` holds the collections the call changed: ``oscillation`` and those
    named in ``mutable`` (e.g. ``batch_stats``); merge it into the variables for the next
    step. The sown ``dampening`` collection is never returned, so it cannot be fed back.
    """

    dampening: jax.Array
    updates: dict[str, Any]


SCANNED_COLLECTIONS = (QUANT_STATS, OSCILLATION, DAMPENING, QUANTIZED_WEIGHTS)
"""The quantizers' collections other than ``params``: under ``nn.scan`` each iteration has
its own entries, stacked on the scanned axis like the parameters."""


def _covered(collection: str, *filters) -> bool:
    return any(f is not False and in_filter(f, collection) for f in filters)


@contextlib.contextmanager
def _scan_carries_quantizers():
    """Within the block, ``nn.scan`` (created in the block, as inside a ``compact`` method)
    scans the quantizers' collections on axis 0 unless its ``variable_axes``,
    ``variable_broadcast`` or ``variable_carry`` already name them, so a scanned block's
    quantizers need nothing from the user (per iteration: its own scales, tracking state and
    dampening term, as the scanned parameters)."""
    original = lift.scan

    @functools.wraps(original)
    def scan(
        fn,
        variable_axes=MappingProxyType({}),
        variable_broadcast=False,
        variable_carry=False,
        *args,
        **kwargs,
    ):
        axes = dict(variable_axes)
        for collection in SCANNED_COLLECTIONS:
            if not _covered(collection, *axes, variable_broadcast, variable_carry):
                axes[collection] = 0
        return original(fn, axes, variable_broadcast, variable_carry, *args, **kwargs)

    lift.scan = scan
    try:
        yield
    finally:
        lift.scan = original


def _concrete(tree) -> bool:
    """Whether every array leaf of ``tree`` is concrete (not a tracer inside ``jit``)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _as_mutable(mutable) -> list[str] | bool:
    if mutable is True:
        return True
    if mutable is False or mutable is None:
        return []
    if isinstance(mutable, str):
        return [mutable]
    return list(mutable)


def _without_dampening(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in variables.items() if k != DAMPENING}


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """A Linen ``model`` run with its quantization ``rules`` (see :func:`quantize_model`)."""

    model: nn.Module
    rules: tuple[QuantRule, ...]
    depthwise_impl: str = "auto"  # quantized depth-wise convs: see oscqat_jax.nn.depthwise

    def _run(self, ctx: QuantContext, fn: Callable, *args, record=None, sites=None, **kwargs):
        intercept = interceptor(self.rules, ctx, record, self.depthwise_impl, sites)
        try:
            with nn.intercept_methods(intercept), _scan_carries_quantizers():
                return fn(*args, **kwargs)
        except ScopeCollectionNotFound as err:
            if not any(f'"{c}"' in str(err) for c in SCANNED_COLLECTIONS):
                raise
            raise ValueError(
                f"A quantized layer inside a lifted transform cannot reach the quantizers' "
                f"variables ({err.args[0].split(' (')[0]}); create the nn.scan / nn.vmap class "
                "inside the model's setup or compact method (quantize_model then scans the "
                "quantizers' collections with the parameters), or list "
                f"{list(SCANNED_COLLECTIONS)} in its variable_axes."
            ) from None

    def init(self, rngs, *args, **kwargs) -> dict[str, Any]:
        """``model.init`` plus every quantizer variable: ``weight_scale`` (kernel min-max),
        ``input_scale``/``output_scale`` (1.0), ``quant_stats/<q>_signed`` and the
        ``oscillation`` state, so later calls never change the variable structure (the range
        estimators' ``quant_stats/<q>_range`` appear with the first :meth:`calibrate`).

        Raises when the rules do not fit the model (a rule matching no site, a rule meant
        for one layer matching several, nothing quantized: see ``QuantRule.sites``)."""
        ctx, sites = QuantContext.create("eval"), []
        variables = self._run(ctx, self.model.init, rngs, *args, sites=sites, **kwargs)
        check_coverage(self.rules, sites)
        return variables

    def calibrate(
        self,
        variables: Mapping[str, Any],
        batches: Iterable[Any],
        *,
        compiler_options: Mapping[str, Any] | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """Sets every quantizer's range from data (docs/method.md §3); returns the full variables.

        ``batches`` yields the model's positional input: an array, or a tuple of arguments.
        ``kwargs`` go to the model on every batch; pass those of inference (e.g.
        ``train=False``), as calibration must not move BatchNorm statistics. Each batch
        updates the range estimators, writes the scales they give and restarts the
        oscillation state from the newly rounded weights; quantizers downstream see the
        already-quantized network. Runs jitted: one compile for the first batch (it
        creates the range estimators) and one for the rest, per input shape;
        ``compiler_options`` go to those compiles (``jax.jit``'s, e.g. the training
        program's ``train.fast_compile`` options).
        """
        ctx, sites = QuantContext.create("calibrate"), []

        def one_batch(variables, args):
            return self._run(
                ctx,
                self.model.apply,
                variables,
                *args,
                mutable=list(CALIBRATION_COLLECTIONS),
                sites=sites,
                **kwargs,
            )[1]

        options = None if compiler_options is None else dict(compiler_options)
        step = jax.jit(one_batch, compiler_options=options)
        variables = _without_dampening(variables)
        count = 0
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            variables = {**variables, **step(variables, args)}
            if count == 0:
                check_coverage(self.rules, sites)  # seen while tracing the first batch
            count += 1
        if count == 0:
            raise ValueError("calibrate needs at least one batch; batches was empty.")
        check_scales(variables["params"])
        return variables

    def apply(
        self,
        variables: Mapping[str, Any],
        *args,
        mode: str = "eval",
        freeze_threshold=0.0,
        osc_momentum=oscillation.EMA_MOMENTUM,
        use_ema_freeze: bool = True,
        dampening_aggregation: str = "kernel_mean",
        mutable=(),
        rngs=None,
        **kwargs,
    ):
        """Runs the quantized model.

        Args:
          variables: from :meth:`init` / :meth:`calibrate` (updated with ``QuantAux.updates``);
            a ``dampening`` entry, if any, is ignored.
          *args, **kwargs: the model's own arguments (e.g. images, ``train=True``).
          mode: ``eval`` -> output; ``train`` -> ``(output, QuantAux)``; ``float`` -> the
            output of the unquantized model. ``train`` and ``eval`` need calibrated
            quantizers (:meth:`calibrate`).
          freeze_threshold: f_th of docs/method.md §6 (freezing active while > 0); float or float32
            array, may be traced (changing it does not recompile).
          osc_momentum: EMA momentum of tracking and freezing; may be traced.
          use_ema_freeze: freeze a weight to its rounded EMA integer (True, the paper's
            recipes) or to its current integer (docs/method.md §6); static.
          dampening_aggregation: how each kernel's dampening term is reduced:
            ``kernel_mean`` (default), ``sum`` or ``mean`` (docs/method.md §7); static.
          mutable: the model's own collections to update, e.g. ``["batch_stats"]``. In
            ``train`` mode they are returned in ``QuantAux.updates``; in ``eval``/``float``
            mode a non-empty ``mutable`` returns ``(output, updated collections)`` as Flax does.
          rngs: the model's rngs (e.g. ``{"dropout": key}``).
        """
        if mode not in APPLY_MODES:
            raise ValueError(f"mode must be one of {', '.join(APPLY_MODES)}, got {mode!r}.")
        ctx = QuantContext.create(
            APPLY_MODES[mode],
            freeze_threshold=freeze_threshold,
            osc_momentum=osc_momentum,
            use_ema_freeze=use_ema_freeze,
            dampening_aggregation=dampening_aggregation,
        )
        variables = _without_dampening(variables)
        mutable = _as_mutable(mutable)
        if mode != "float" and _concrete(variables.get("params", {})):
            check_scales(variables["params"])
        if mode == "train":
            self._check_tracking_advances(variables)
        if mode != "train":
            return self._run(
                ctx,
                self.model.apply,
                variables,
                *args,
                mutable=mutable or False,
                rngs=rngs,
                **kwargs,
            )
        if mutable is not True:
            mutable = [*dict.fromkeys([*mutable, OSCILLATION, DAMPENING])]
        out, mutated = self._run(
            ctx, self.model.apply, variables, *args, mutable=mutable, rngs=rngs, **kwargs
        )
        return out, QuantAux(dampening_total(mutated), _without_dampening(mutated))

    def _check_tracking_advances(self, variables: Mapping[str, Any]) -> None:
        """Outside ``jit``: raises when a train call gets the very ``oscillation`` arrays the
        previous train call got, i.e. its ``QuantAux.updates`` were not merged and tracking
        and freezing silently stand still. (Inside ``jit`` the arrays are tracers and only
        the caller can see this; the package's training program merges them.)"""
        leaves = jax.tree_util.tree_leaves(variables.get(OSCILLATION, {}))
        if not leaves or not _concrete(leaves):
            return
        last = self.__dict__.get("_last_tracking")
        if last is not None and last() is leaves[0]:
            raise ValueError(
                "This train call got the same 'oscillation' state as the previous one, so "
                "oscillation tracking and freezing did not advance between the steps; merge "
                "each train call's QuantAux.updates into the variables of the next "
                "(variables = {**variables, **aux.updates, 'params': new_params})."
            )
        object.__setattr__(self, "_last_tracking", weakref.ref(leaves[0]))

    def plan(self, *args, **kwargs) -> dict[str, SitePlan]:
        """``{module path: SitePlan}`` of every site the rules quantize, for inputs like
        ``args`` (arrays or ``jax.ShapeDtypeStruct``; traced abstractly, nothing computed):
        its quantizers (layers report ``weight``/``input``, hooks ``output``), whether it is
        a depth-wise conv, and the rule that decided. Does not check the rules' coverage, so
        it also serves to debug rules that :meth:`init` refuses."""
        record: dict[str, SitePlan] = {}
        ctx = QuantContext.create("eval")
        init = lambda *a: self._run(ctx, self.model.init, *a, record=record, **kwargs)  # noqa: E731
        jax.eval_shape(init, jax.random.key(0), *args)
        return record


def quantize_model(
    model: nn.Module, rules: Sequence[QuantRule], *, depthwise_impl: str = "auto"
) -> QuantizedModel:
    """``model`` (any ``flax.linen.Module``, unchanged) with quantizers placed by ``rules``.

    The first rule matching a site's ``/``-joined module path decides how it is quantized;
    sites no rule matches stay float. See the module docstring for the sites and
    :func:`oscqat_jax.nn.rules.paper_rules` for the paper's setups. ``depthwise_impl``
    (``auto``, ``shifted`` or ``lax``) is how quantized depth-wise ``nn.Conv`` layers
    convolve (as :class:`~oscqat_jax.nn.convbn.ConvBN`'s option): ``auto`` takes shifted
    slices on CPU.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"quantize_model needs a flax.linen.Module, got {type(model).__name__}; "
            "for flax.nnx models use oscqat_jax.nn.nnx_quant.quantize_nnx."
        )
    if model.scope is not None:
        raise ValueError("quantize_model needs an unbound module (the model, not a bound copy).")
    depthwise.resolve_impl(depthwise_impl)  # one sentence for a bad value
    return QuantizedModel(model, check_rules(rules), depthwise_impl)


__all__ = [
    "APPLY_MODES",
    "LAYER_TYPES",
    "ActQuant",
    "QuantAux",
    "QuantizedModel",
    "quantize_model",
]
