"""Export of a quantized model to an ONNX graph in QuantizeLinear/DequantizeLinear form.

:func:`export_onnx` traces ``fn`` (images -> logits, a model in ``eval`` mode with its
variables closed over) with ``jax.make_jaxpr`` and lowers the jaxpr equation by equation.
Everything computed from the variables alone is evaluated at export (constant folding):
weight quantization with its frozen integers, BN multipliers, learnt signedness. The
quantizers are found by the ``jax.named_scope`` that :func:`oscqat_jax.quant.to_int_with`
and :func:`~oscqat_jax.quant.dequantize_with` open, so any model whose quantizers call those
two functions exports, the package's own models and models quantized by rules alike.

What the graph holds:

- **Weights**: the integers of the eval forward (frozen entries at ``frozen_int``) as an
  integer initializer at the quantizer's bit width: int4 for grids of 2-4 bits (a 3-bit grid
  [-4, 3] uses part of int4's range), int8 for 5-8 bits, int16 above; then a
  DequantizeLinear with the scale (per tensor, or per output channel on axis 0 of the OIHW
  Conv kernel / axis 1 of the ``(in, out)`` MatMul kernel) and the zero point.
- **Activations**: ``QuantizeLinear -> DequantizeLinear`` with the learnt scale and zero point,
  into the integer type that holds the grid (unsigned when signedness learnt at calibration
  said unsigned). Where the grid is narrower than that type (3 bits in int4, 7-bit grids in
  int8...) a clip (Max and Min) to ``s * (int_min - zp), s * (int_max - zp)`` comes first:
  those end points round to exactly ``int_min``/``int_max``, so ONNX clips where training
  clipped.
  QuantizeLinear rounds half to even, as ``jnp.round``.
- **BatchNorm (eval, running statistics) folded into the preceding conv**: BN after a quantized
  conv computes ``(conv(x, s * W_int) - mean) * mul + beta`` with ``mul = gamma /
  sqrt(var + eps)`` per output channel. In exact arithmetic this is
  ``conv(x, (s * mul) * W_int) + (beta - mean * mul)``: the integers stay those the model was
  evaluated with and ``mul`` moves into the per-channel dequantization scale (a per-tensor
  weight scale becomes per-channel), the rest into the conv bias. Folding therefore does not
  re-quantize the weight on a new grid (which would change the integers and the model); it
  exports the trained, evaluated numerics. ONNX scales must be positive, so a channel whose
  multiplier is zero or negative keeps its scale and gets its multiplier from a Mul after the
  conv. Biases of convs and dense layers, and constant per-channel arithmetic after them, fold
  the same way. Models built with ``fold_bn=True`` quantize the folded kernel themselves;
  their export holds those integers and the offset as the bias.
- Everything else (activations, residual adds, pooling, squeeze-excite, reshapes) as the
  corresponding float ONNX operators. Convolutions are exported NCHW between Transposes, which
  ONNX Runtime's optimizer cancels.

Numerics: the ONNX model computes the same integers and scales as the JAX eval forward; only
the floating-point summation order of convolutions and matmuls differs (and BN folding moves
a rounding), by a few float32 ulps. A value lying within such an ulp of a rounding threshold
may then land on the other integer, one step of that activation's grid. That is rare, except
at exact ties, where a quantized tensor is re-quantized with no affine layer in between and
``x / s`` is exactly a half-integer: XLA on the CPU was seen to land an ulp off it (as a
multiplication by the reciprocal would) where ONNX Runtime and numpy divide exactly, so ties
can round apart.
They are systematic in two places: pooled features averaged over an even number of positions
and re-quantized on their own grid (the pooled features of the output-quantizing setups), and
residual sums whose quantizer range is the min-max of one batch (a sum at half the maximum is
1.5 steps). Ranges estimated by MSE or running min-max over several batches, as in training,
make the second accidental.

Run the graph with :func:`inference_session` (or :func:`run_onnx`): its settings keep ONNX
Runtime's optimizations from changing the arithmetic (:data:`SESSION_CONFIG`,
:data:`DISABLED_OPTIMIZERS`).

The batch dimension of the exported input is dynamic: ``fn`` is traced at batch sizes N and
N + 1 and dimensions that differ between the two traces follow the batch.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper

from oscqat_jax.deploy._graph import Graph
from oscqat_jax.deploy._lowering import Lowering
from oscqat_jax.deploy._values import Const, Tensor

MIN_OPSET = 21
"""ONNX opset with int4/uint4 tensors in QuantizeLinear/DequantizeLinear."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(fn, example, path=None, *, opset: int = MIN_OPSET, name: str = "oscqat_jax"):
    """ONNX model computing ``fn`` (see the module docstring); written to ``path`` when given.

    Args:
      fn: ``images -> logits``, a quantized model in eval mode with its variables closed over.
      example: float32 array ``(N, H, W, C)`` (NHWC); only its shape is used. The exported
        batch dimension is dynamic.
      path: file to write (atomically: a temporary file in the same folder, then renamed).
      opset: ONNX opset of the default domain, at least 21.
      name: the graph's name.

    Returns:
      The ``onnx.ModelProto``, checked by ``onnx.checker`` (full check, with shape inference).
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (int4 Q/DQ), got {opset!r}.")
    shape = tuple(np.shape(example))
    if len(shape) != 4 or np.asarray(example).dtype != np.float32:
        raise ValueError(
            f"example must be a float32 NHWC array (N, H, W, C), got shape {shape} and dtype "
            f"{np.asarray(example).dtype}."
        )
    traced = [
        jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((n, *shape[1:]), jnp.float32))
        for n in (shape[0], shape[0] + 1)
    ]
    graph = Graph()
    lowering = Lowering(graph)
    image = Tensor(INPUT_NAME, shape, (True, False, False, False))
    consts = [Const(np.asarray(c)) for c in traced[0].consts]
    outputs = lowering.run(traced[0].jaxpr, traced[1].jaxpr, consts, [image])
    graph_outputs = []
    for i, (value, var) in enumerate(zip(outputs, traced[0].jaxpr.outvars, strict=True)):
        out_name = OUTPUT_NAME if len(outputs) == 1 else f"{OUTPUT_NAME}_{i}"
        graph.nodes.append(helper.make_node("Identity", [lowering.name(value)], [out_name]))
        dims = ["N" if d else n for n, d in zip(var.aval.shape, _out_dyn(value, var), strict=True)]
        graph_outputs.append(
            helper.make_tensor_value_info(
                out_name, helper.np_dtype_to_tensor_dtype(var.aval.dtype), dims
            )
        )
    graph_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *shape[1:]])
    model = helper.make_model(
        helper.make_graph(graph.nodes, name, [graph_input], graph_outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="oscqat_jax",
    )
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        _write_atomically(model, os.fspath(path))
    return model


def _out_dyn(value, var) -> tuple[bool, ...]:
    dyn = getattr(value, "dyn", ())
    return tuple(dyn) if len(dyn) == len(var.aval.shape) else (False,) * len(var.aval.shape)


def _write_atomically(model: onnx.ModelProto, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onnx-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_model_onnx(model, variables, path=None, *, input_shape=(224, 224, 3), **kw):
    """:func:`export_onnx` of one of the package's models (``oscqat_jax.models.create_model``)
    applied in eval mode to ``variables``; ``input_shape`` is one image ``(H, W, C)`` and
    ``kw`` goes to :func:`export_onnx` (``opset``, ``name``). Depth-wise convolutions are
    exported as grouped convolutions (``depthwise_impl="lax"``)."""
    from oscqat_jax.nn.config import QuantContext

    if hasattr(model, "depthwise_impl"):
        model = model.clone(depthwise_impl="lax")
    ctx = QuantContext.create("eval")

    def fn(x):
        return model.apply(variables, x, ctx)

    example = np.zeros((1, *input_shape), np.float32)
    return export_onnx(fn, example, path, **kw)


SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""ONNX Runtime session settings of :func:`inference_session`. ONNX Runtime fuses
DequantizeLinear -> MatMul with int4/int8 weights into MatMulNBits, whose default accuracy
level 4 quantizes the activations to int8 on the fly (logits move by ~1e-3); level 1
computes in float32, as the exported graph says."""
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer", "WeightBiasQuantization")
"""ONNX Runtime graph transformers :func:`inference_session` turns off.
``WeightBiasQuantization`` rounds the float bias of a Conv between DequantizeLinear and
QuantizeLinear to an int32 grid of step ``input scale * weight scale``; the folded BN offsets
are not on that grid, so it moves the outputs by up to half a step (logits by whole steps in
3-4-bit models). ``QDQPropagationTransformer`` moves a DequantizeLinear past a MaxPool (exact),
but ONNX Runtime 1.32 has no int4/uint4 MaxPool and then refuses the model (ResNet's max-pool
after a 3-4-bit activation quantizer)."""


def inference_session(model_or_path):
    """An ONNX Runtime CPU session of an exported model (a ``ModelProto`` or a file), with
    :data:`SESSION_CONFIG`."""
    import onnxruntime as ort

    source = model_or_path
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    else:
        source = os.fspath(source)
    options = ort.SessionOptions()
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        source,
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def run_onnx(model_or_path, images: np.ndarray) -> np.ndarray:
    """Runs an exported model (a ``ModelProto`` or a file) in ONNX Runtime on the CPU:
    float32 NHWC ``images`` ``(N, H, W, C)`` in, the first output (logits) out."""
    session = inference_session(model_or_path)
    feed = {session.get_inputs()[0].name: np.asarray(images, np.float32)}
    return session.run(None, feed)[0]
