"""ONNX export of a quantized model (needs the ``deploy`` extra: ``onnx``, ``onnxruntime``).

Two forms, chosen by ``container``: QuantizeLinear/DequantizeLinear with the integers at their
bit width (``"int4"``, the JAX numerics exactly), or the integers in 8-bit types laid out for
ONNX Runtime's integer kernels (``"int8"``, faster on the CPU). :mod:`.exporter` traces the
model's eval forward and lowers its jaxpr (:mod:`._lowering`, :mod:`._rules`,
:mod:`._layer_rules`, :mod:`._integer`); :func:`inference_session` and :func:`run_onnx` run a
file in ONNX Runtime with the settings its container needs. Users usually reach these through
``oscqat_jax.deploy``, which loads them on first use.
"""

from oscqat_jax.export.onnx.exporter import (
    CONTAINER_KEY,
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    export_model_onnx,
    export_onnx,
    inference_session,
    run_onnx,
)

__all__ = [
    "CONTAINER_KEY",
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "export_model_onnx",
    "export_onnx",
    "inference_session",
    "run_onnx",
]
