"""The rules interceptor: what :func:`~oscqat_jax.nn.intercept.quantize_model` does at each
module call (the sites and their handling are described in :mod:`oscqat_jax.nn.intercept`).

:func:`interceptor` builds the ``flax.linen.intercept_methods`` interceptor of one model call:
for each site (a conv/dense layer, a :class:`~oscqat_jax.nn.convbn.ConvBN`, an
:class:`ActQuant` hook) it finds the first matching rule and runs the package's quantizers in
the site's scope; :mod:`oscqat_jax.nn.kernel_hooks` reaches the kernel inside the layer call
and :mod:`oscqat_jax.nn.convbn` handles conv + BatchNorm sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable

import flax.linen as nn
import jax

from oscqat_jax.nn import convbn
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.kernel_hooks import depthwise_fast_path, quantized_kernel
from oscqat_jax.nn.linen_store import quantize_activation
from oscqat_jax.nn.quantizer import OSCILLATION
from oscqat_jax.nn.rules import QuantRule, Site, SitePlan, site_plan

LAYER_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral, nn.Einsum)
"""Flax layers whose input and kernel the rules can quantize."""


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


def interceptor(
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


__all__ = ["LAYER_TYPES", "SITE_TYPES", "ActQuant", "interceptor"]
