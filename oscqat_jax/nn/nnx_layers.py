"""The quantized NNX layers: the NNX adapter of the quantizer state machine
(:mod:`oscqat_jax.nn.quantizer`) and the modules that :func:`oscqat_jax.nn.nnx_quant.quantize_nnx`
puts in place of ``nnx.Conv`` / ``nnx.Linear`` layers and :class:`ActQuant` hooks.

A quantized layer keeps the user's ``kernel`` and ``bias`` ``nnx.Param`` objects and the float
layer's own ``__call__``, run on the fake-quantized input and kernel; the quantizers keep their
variables as its attributes, named as in Linen: ``nnx.Param`` scales and zero points,
:class:`QuantStats` (grid signedness, range accumulators, created zeroed at quantization since a
jitted call cannot add variables), :class:`Oscillation` (so ``nnx.state(model, Oscillation)`` is
exactly the tracking and freezing state) and a :class:`Dampening` term overwritten at every call
(0 outside ``"train"``, so it never accumulates). The mode and the static settings are static
attributes, the freezing threshold and the EMA momentum :class:`QuantControl` variables (see
:mod:`oscqat_jax.nn.nnx_quant`).
"""

from __future__ import annotations

import contextvars
import types
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax import oscillation
from oscqat_jax.nn import depthwise, quantizer
from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.quantizer import OSCILLATION, PARAMS, QUANT_STATS
from oscqat_jax.nn.rules import (
    SitePlan,
)

NNX_MODES = ("float", "calibrate", "train", "eval")
"""Modes of a quantized NNX layer (see the module docstring)."""

UNCALIBRATED = "uncalibrated"
"""The mode of a quantized layer between :func:`quantize_nnx` and calibration: calls raise."""

CONTEXT_MODES = {"float": "float_eval", "calibrate": "calibrate", "train": "train", "eval": "eval"}

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

EXPORT_RECORDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
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
        records = EXPORT_RECORDS.get()
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
            mode=CONTEXT_MODES[self.quant_mode],
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
