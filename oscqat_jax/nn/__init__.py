"""Flax glue over the functional core: quantized layers, quant setups, contexts, the safe
training API, and quantization of a user's own Flax model by rules.

The public names, importable as ``from oscqat_jax.nn import ...``:

- layers: :class:`QuantConv`, :class:`QuantConvBN`, :class:`QuantDense`, :class:`BatchNorm`;
- settings: :class:`QuantContext` (per call), :class:`QuantizerSpec`, :class:`LayerQuant`,
  :class:`QuantSetup` (the paper's setups for the package's models);
- the training API (:mod:`oscqat_jax.nn.api`): :func:`param_labels`,
  :func:`quant_optimizer`, :func:`min_scale`, :func:`check_scales`,
  :func:`strip_dampening`, :func:`calibrate`, :func:`calibration_step`;
- rules for any Flax model: :class:`QuantRule`, :func:`paper_rules`
  (:mod:`~oscqat_jax.nn.rules`), :func:`quantize_model`, :class:`QuantizedModel`, :class:`QuantAux`, :class:`ActQuant` (Linen,
  :mod:`~oscqat_jax.nn.intercept`) and :func:`quantize_nnx`, :func:`calibrate_nnx`, :func:`set_mode`, :func:`set_schedule`,
  :func:`dampening_loss`, :func:`plan_nnx` and the variable types :class:`Oscillation` and
  :class:`QuantStats` (NNX, :mod:`~oscqat_jax.nn.nnx_quant`; its activation hook stays
  ``nnx_quant.ActQuant``, since ``ActQuant`` here is the Linen one).
  These load on first use, so importing this package does not import ``flax.nnx`` or the
  interceptor, and those modules may import this package's submodules freely.
"""

from __future__ import annotations

import importlib

from oscqat_jax.nn.api import (
    calibrate,
    calibration_step,
    check_scales,
    min_scale,
    param_labels,
    quant_optimizer,
    strip_dampening,
)
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.layers import QuantConv, QuantConvBN, QuantDense
from oscqat_jax.nn.setups import QuantSetup

_LAZY = {
    "QuantRule": "oscqat_jax.nn.rules",
    "paper_rules": "oscqat_jax.nn.rules",
    "quantize_model": "oscqat_jax.nn.intercept",
    "QuantizedModel": "oscqat_jax.nn.intercept",
    "QuantAux": "oscqat_jax.nn.intercept",
    "ActQuant": "oscqat_jax.nn.intercept",
    "quantize_nnx": "oscqat_jax.nn.nnx_quant",
    "calibrate_nnx": "oscqat_jax.nn.nnx_quant",
    "set_mode": "oscqat_jax.nn.nnx_quant",
    "set_schedule": "oscqat_jax.nn.nnx_quant",
    "dampening_loss": "oscqat_jax.nn.nnx_quant",
    "plan_nnx": "oscqat_jax.nn.nnx_quant",
    "Oscillation": "oscqat_jax.nn.nnx_quant",
    "QuantStats": "oscqat_jax.nn.nnx_quant",
}
"""Public names defined in modules loaded on first access (see the module docstring)."""


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oscqat_jax.nn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActQuant",
    "BatchNorm",
    "LayerQuant",
    "QuantContext",
    "QuantConv",
    "QuantConvBN",
    "QuantDense",
    "QuantRule",
    "Oscillation",
    "QuantAux",
    "QuantSetup",
    "QuantStats",
    "QuantizedModel",
    "QuantizerSpec",
    "calibrate",
    "calibrate_nnx",
    "calibration_step",
    "check_scales",
    "dampening_loss",
    "min_scale",
    "param_labels",
    "paper_rules",
    "plan_nnx",
    "quant_optimizer",
    "quantize_model",
    "quantize_nnx",
    "set_mode",
    "set_schedule",
    "strip_dampening",
]
