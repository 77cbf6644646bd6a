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
from oscqat_jax.nn import convbn, depthwise
from oscqat_jax.nn.api import CALIBRATION_COLLECTIONS, check_scales
from oscqat_jax.nn.collect import dampening_total
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.kernel_hooks import depthwise_fast_path, quantized_kernel
from oscqat_jax.nn.linen_store import quantize_activation
from oscqat_jax.nn.quantizer import DAMPENING, OSCILLATION, QUANT_STATS, QUANTIZED_WEIGHTS
from oscqat_jax.nn.rules import QuantRule, Site, SitePlan, check_coverage, check_rules, site_plan

LAYER_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)
"""Flax layers whose input and kernel the rules can quantize."""

APPLY_MODES = {"eval": "eval", "train": "train", "float": "float_eval"}
"""``QuantizedModel.apply`` modes and the :class:`QuantContext` mode each one runs."""


class ActQuant(nn.Module):
    """Marks an activation for quantization: identity ``(...) -> (...)`` in a model run
    without rules; under :func:`quantize_model` the first rule matching its path quantizes
    the value with the rule's ``output_bits`` (per tensor, float32 grid, input dtype out).

    Every call of a hook uses its one quantizer. ``update_range=False`` makes a call use it
    as it stands, without feeding its range estimator in calibration (the reference's tied
    quantizers: pooled features re-quantized with the scale of the activations pooled,
    docs/method.md §4); other modes never update a range.
    """

    @nn.compact
    def __call__(self, x: jax.Array, update_range: bool = True) -> jax.Array:
        del update_range  # read by the interceptor
        return x


SITE_TYPES = (*LAYER_TYPES, ConvBN, ActQuant)
"""Modules the interceptor treats as quantization sites."""


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


def _depthwise(module: nn.Module, x: jax.Array) -> bool:
    """Whether ``module`` is a depth-wise conv (one group per input channel, as the package's
    layers define it) for the input ``x``."""
    return isinstance(module, nn.Conv) and module.feature_group_count == x.shape[-1] > 1


def _check_per_channel(module: nn.Module, path: str) -> None:
    if isinstance(module, nn.Einsum):
        why = "an Einsum kernel has no fixed output-channel axis"
    elif isinstance(module, nn.ConvTranspose) and module.transpose_kernel:
        why = "with transpose_kernel=True its output channels are not the kernel's last axis"
    elif (
        isinstance(module, nn.DenseGeneral)
        and not isinstance(module.features, int)
        and len(module.features) != 1
    ):
        why = "its kernel has several output-feature axes"
    else:
        return
    raise ValueError(
        f"Layer {path} ({type(module).__name__}) cannot take per-channel weight scales: {why}; "
        "give it a rule with per_channel=False."
    )


def _check_tracking_state(module: nn.Module, quant: SitePlan, ctx: QuantContext, path: str):
    if (
        quant.track_oscillations
        and ctx.tracking
        and not module.is_initializing()
        and not module.has_variable(OSCILLATION, "prev_int")
    ):
        raise ValueError(
            f"Layer {path} tracks oscillations but the variables have no '{OSCILLATION}' "
            "collection; pass the variables from init/calibrate, updated with aux.updates."
        )


def _interceptor(
    rules: tuple[QuantRule, ...],
    ctx: QuantContext,
    record: dict[str, SitePlan] | None,
    depthwise_impl: str = "auto",
    sites: list[Site] | None = None,
) -> Callable:
    """A ``flax.linen.intercept_methods`` interceptor applying ``rules`` in context ``ctx``;
    it writes each quantized site's :class:`SitePlan` into ``record`` and every site it sees
    (quantized or not) into ``sites``, when given.

    One interceptor serves one call of the model, so it sees every call of each layer: a
    layer run again in the same call (a tied or looped layer) quantizes its input with the
    same quantizer (calibration sees every call) and its kernel with the same integers, but
    its tracking advances and its dampening term counts only on the first call.
    """
    seen: dict[str, weakref.ref] = {}

    def note(site: Site) -> SitePlan:
        plan = site_plan(rules, site)
        if sites is not None:
            sites.append(site)
        if record is not None and plan.quantized:
            record[site.path] = plan
        return plan

    def hook(module: ActQuant, path: str, next_fun, args, kwargs):
        spec = note(Site(path, "hook")).output
        y = next_fun(*args, **kwargs)
        if not spec.enabled:
            return y
        update_range = args[1] if len(args) > 1 else kwargs.get("update_range", True)
        hook_ctx = ctx
        if ctx.mode == "calibrate" and not update_range:
            hook_ctx = dataclasses.replace(ctx, mode="eval")
        return quantize_activation(
            module, "output", y, spec, hook_ctx, require_calibration=True
        ).astype(y.dtype)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, SITE_TYPES):
            return next_fun(*args, **kwargs)
        if isinstance(module.parent, ConvBN):  # quantized by its ConvBN site
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        if isinstance(module, ActQuant):
            return hook(module, path, next_fun, args, kwargs)
        args, kwargs = list(args), dict(kwargs)
        if isinstance(module, ConvBN):
            x = args[0] if args else kwargs["x"]
            quant = note(Site(path, "conv_bn", convbn.is_depthwise(module, x)))
            folds = quant.rule is not None and quant.rule.fold_bn
            if not (quant.quantized or folds):
                return next_fun(*args, **kwargs)
            _check_tracking_state(module, quant, ctx, path)
            return convbn.quantized_call(
                module, next_fun, args, kwargs, quant, ctx, seen=seen, depthwise_impl=depthwise_impl
            )
        x = args[0] if args else kwargs["inputs"]
        quant = note(Site(path, "layer", _depthwise(module, x)))
        if not quant.quantized:
            return next_fun(*args, **kwargs)
        if quant.weight.per_channel:
            _check_per_channel(module, path)
        _check_tracking_state(module, quant, ctx, path)
        x = quantize_activation(module, "input", x, quant.input, ctx, require_calibration=True)
        if args:
            args[0] = x
        else:
            kwargs["inputs"] = x
        if not quant.weight.enabled:
            return next_fun(*args, **kwargs)
        # Float mode runs the user's model untouched, its convolutions included.
        fast = None
        if ctx.quantize and _depthwise(module, x):
            fast = depthwise_fast_path(module, depthwise_impl)
        with (
            quantized_kernel(module, quant, ctx, path, seen=seen),
            fast or contextlib.nullcontext(),
        ):
            return next_fun(*args, **kwargs)

    return intercept


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
        interceptor = _interceptor(self.rules, ctx, record, self.depthwise_impl, sites)
        try:
            with nn.intercept_methods(interceptor), _scan_carries_quantizers():
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
        self, variables: Mapping[str, Any], batches: Iterable[Any], **kwargs
    ) -> dict[str, Any]:
        """Sets every quantizer's range from data (docs/method.md §3); returns the full variables.

        ``batches`` yields the model's positional input: an array, or a tuple of arguments.
        ``kwargs`` go to the model on every batch; pass those of inference (e.g.
        ``train=False``), as calibration must not move BatchNorm statistics. Each batch
        updates the range estimators, writes the scales they give and restarts the
        oscillation state from the newly rounded weights; quantizers downstream see the
        already-quantized network. Runs jitted: one compile for the first batch (it
        creates the range estimators) and one for the rest, per input shape.
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

        step = jax.jit(one_batch)
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
    convolve, as the package's own layers' option: ``auto`` takes shifted slices on CPU.
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
