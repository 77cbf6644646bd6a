"""Deployment of trained quantized models: ONNX export, either in QuantizeLinear/
DequantizeLinear form with integer weights at their bit width (``container="int4"``, the
JAX numerics) or with the integers in 8-bit types for ONNX Runtime's integer kernels
(``container="int8"``, faster on the CPU), and running it in ONNX Runtime.

``export_onnx``, ``export_model_onnx``, ``run_onnx`` and ``inference_session`` (the exporter of
:mod:`oscqat_jax.export.onnx`) are loaded on first use, so importing this package does not need
``onnx``. ``python -m oscqat_jax.deploy check`` compares an exported file with the checkpoint it
came from (:mod:`.check`, which reads checkpoints through the training program: this package
sits above it).
"""

from __future__ import annotations

import importlib

_LAZY = {"export_onnx", "export_model_onnx", "inference_session", "run_onnx"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module("oscqat_jax.export.onnx.exporter"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
