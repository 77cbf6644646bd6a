"""The Linen adapter of the quantizer state machine: a module's scope as a variable store.

:class:`LinenStore` implements :class:`oscqat_jax.nn.quantizer.VariableStore` over one
``flax.linen`` module, so the quantizer's variables live in that module's scope
(``params/<layer>/weight_scale``, ``quant_stats/<layer>/input_signed``,
``oscillation/<layer>/prev_int``...). The package's layers and the rules interceptor call
:func:`quantize_weight` and :func:`quantize_activation` below with the layer being run.

A ``train`` call sows each dampened weight's term into the ``dampening`` collection (a 1-tuple
per layer, read with :func:`oscqat_jax.nn.collect.dampening_total`); that collection is an
output only. Train calls fail loudly rather than silently: a tracked weight needs
``oscillation`` mutable and a dampened one ``dampening`` mutable, unless the context switches
that off (``QuantContext.track_oscillations`` / ``QuantContext.dampen``). ``init`` only
creates variables; range accumulators (``quant_stats/<q>_range``) appear with the first
calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from oscqat_jax.nn import quantizer
from oscqat_jax.nn.config import QuantContext, QuantizerSpec
from oscqat_jax.nn.quantizer import DAMPENING, PARAMS, QUANTIZED_WEIGHTS


class LinenStore:
    """A bound Linen module's variables, as the state machine reads and writes them.

    ``require_calibration``: raise when a quantizer is used in ``train``/``eval`` before any
    calibration (the rules path asks for it; the package's layers are also run uncalibrated
    by their unit tests and the float-to-QAT hand-over, which calibrates separately).
    """

    def __init__(self, module: nn.Module, *, require_calibration: bool = False):
        self.module = module
        self.path = "/".join(module.scope.path) or "<top>"
        self.creating = module.is_initializing()
        self.require_calibration = require_calibration

    def get(self, collection: str, name: str) -> Any | None:
        return self.module.get_variable(collection, name)

    def declare(self, collection: str, name: str, init: Callable[[], Any]) -> Any:
        if collection == PARAMS:
            return self.module.param(name, lambda _key: init())
        return self.module.variable(collection, name, init).value

    def put(self, collection: str, name: str, value: Any) -> None:
        self.module.put_variable(collection, name, value)

    def writable(self, collection: str) -> bool:
        return self.module.is_mutable_collection(collection)

    def declare_range(self, name: str, template: Callable[[], dict | None]) -> None:
        del name, template  # created by the first calibration (see the module docstring)

    def dampening(self, term: jax.Array | None) -> None:
        if term is None:
            return
        self._check_dampening_collection()
        self.module.sow(DAMPENING, "kernel", term)

    def export_record(self, record: dict) -> None:
        if self.writable(QUANTIZED_WEIGHTS):
            self.module.sow(QUANTIZED_WEIGHTS, "kernel", record)

    def _check_dampening_collection(self) -> None:
        """Raises unless this train call can sow a fresh dampening term.

        ``sow`` appends to what the collection already holds, so a ``dampening`` collection
        fed back from an earlier call (``{**variables, **mutated}``) would double the term
        each step; an immutable one would drop it silently.
        """
        if self.module.has_variable(DAMPENING, "kernel"):
            raise ValueError(
                f"Layer {self.path} already holds a '{DAMPENING}' term before its train call: "
                f"the variables passed to apply contain the '{DAMPENING}' collection of an "
                "earlier call, which sow would add to; drop it from the variables you keep "
                "(term, rest = oscqat_jax.nn.strip_dampening(mutated))."
            )
        if not self.writable(DAMPENING):
            raise ValueError(
                f"Layer {self.path} dampens its weight in train mode, but '{DAMPENING}' is "
                "not mutable, so its term would silently be 0; pass "
                f"mutable=[..., '{DAMPENING}'] and add oscqat_jax.nn.strip_dampening(mutated)[0] "
                "(weighted) to the loss, or train without dampening: "
                "QuantContext.create('train', dampen=False)."
            )


def quantize_activation(
    module: nn.Module,
    name: str,
    x: jax.Array,
    spec: QuantizerSpec,
    ctx: QuantContext,
    *,
    require_calibration: bool = False,
) -> jax.Array:
    """:func:`oscqat_jax.nn.quantizer.quantize_activation` in ``module``'s scope."""
    store = LinenStore(module, require_calibration=require_calibration)
    return quantizer.quantize_activation(store, name, x, spec, ctx)


def quantize_weight(
    module: nn.Module,
    w: jax.Array,
    spec: QuantizerSpec,
    ctx: QuantContext,
    *,
    track: bool,
    dampen: bool,
    repeat: bool = False,
    require_calibration: bool = False,
) -> jax.Array:
    """:func:`oscqat_jax.nn.quantizer.quantize_weight` in ``module``'s scope."""
    store = LinenStore(module, require_calibration=require_calibration)
    return quantizer.quantize_weight(store, w, spec, ctx, track=track, dampen=dampen, repeat=repeat)


__all__ = ["LinenStore", "quantize_activation", "quantize_weight"]
