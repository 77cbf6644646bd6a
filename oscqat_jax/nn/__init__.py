"""Flax glue over the functional core: quantization of any Flax model by rules, the package's
BatchNorm and ConvBN site, and the helpers a training loop needs.

The public names, importable as ``from oscqat_jax.nn import ...``:

- **any Flax model** (Linen or NNX; :mod:`~oscqat_jax.nn.verbs`): :class:`QuantRule` and
  :func:`paper_rules` (which layers, how; :mod:`~oscqat_jax.nn.rules`), :func:`setup_rules`
  and :class:`ModelSites` (a :class:`QuantSetup` as rules), :class:`ActQuant` (marks an
  activation), :class:`ConvBN` (a conv + BatchNorm site, BN foldable), :func:`quantize_model`,
  :func:`calibrate`, :func:`plan`, :func:`set_mode` and :func:`set_schedule` (NNX),
  :func:`dampening_term`, :func:`reestimate_bn`,
  :func:`oscillation_summary`, :func:`depthwise_layers`; the Linen wrapper
  :class:`QuantizedModel` and its train-call result :class:`QuantAux`; the NNX variable types
  :class:`Oscillation` and :class:`QuantStats`;
- **the training loop** (:mod:`~oscqat_jax.nn.api`): :func:`param_labels`,
  :func:`quant_optimizer`, :func:`min_scale`, :func:`check_scales`, :func:`strip_dampening`;
- **the package's building blocks**: :class:`BatchNorm` (PyTorch's running statistics),
  :class:`QuantizerSpec` and :class:`LayerQuant` (what a rule gives a site),
  :class:`QuantContext` (a call's mode) and :class:`QuantSetup` (the paper's setups, as rules
  through :func:`setup_rules`).

The names for any model load on first use, so importing this package does not import
``flax.nnx`` or the interceptor, and those modules may import this package's submodules.
"""

from __future__ import annotations

import importlib

from oscqat_jax.nn.api import (
    check_scales,
    min_scale,
    param_labels,
    quant_optimizer,
    strip_dampening,
)
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.setups import QuantSetup

_LAZY = {
    "QuantRule": "oscqat_jax.nn.rules",
    "paper_rules": "oscqat_jax.nn.rules",
    "ConvBN": "oscqat_jax.nn.convbn",
    "ModelSites": "oscqat_jax.nn.setup_rules",
    "setup_rules": "oscqat_jax.nn.setup_rules",
    "ActQuant": "oscqat_jax.nn.verbs",
    "quantize_model": "oscqat_jax.nn.verbs",
    "calibrate": "oscqat_jax.nn.verbs",
    "plan": "oscqat_jax.nn.verbs",
    "set_mode": "oscqat_jax.nn.verbs",
    "set_schedule": "oscqat_jax.nn.verbs",
    "dampening_term": "oscqat_jax.nn.verbs",
    "reestimate_bn": "oscqat_jax.nn.verbs",
    "oscillation_summary": "oscqat_jax.nn.verbs",
    "depthwise_layers": "oscqat_jax.nn.collect",
    "QuantizedModel": "oscqat_jax.nn.intercept",
    "QuantAux": "oscqat_jax.nn.intercept",
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
    "ConvBN",
    "LayerQuant",
    "ModelSites",
    "Oscillation",
    "QuantAux",
    "QuantContext",
    "QuantRule",
    "QuantSetup",
    "QuantStats",
    "QuantizedModel",
    "QuantizerSpec",
    "calibrate",
    "check_scales",
    "dampening_term",
    "depthwise_layers",
    "min_scale",
    "oscillation_summary",
    "param_labels",
    "paper_rules",
    "plan",
    "quant_optimizer",
    "quantize_model",
    "reestimate_bn",
    "set_mode",
    "set_schedule",
    "setup_rules",
    "strip_dampening",
]
