"""Export of a quantized model to an ONNX graph in QuantizeLinear/DequantizeLinear form.

:func:`export_onnx` traces ``fn`` (images -> logits, a model in ``eval`` mode with its
variables closed over) with ``jax.make_jaxpr`` and lowers the jaxpr equation by equation.
Everything computed from the variables alone is evaluated at export (constant folding):
weight quantization with its frozen integers, BN multipliers, learnt signedness. The
quantizers are found by the ``jax.named_scope`` that :func:`oscqat_jax.quant.to_int_with`
and :func:`~oscqat_jax.quant.dequantize_with` open, so any model whose quantizers call those
two functions exports: models quantized by rules (the package's families among them), NNX
models, any function.

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
  conv computes ``(conv(x, s * W_int) - mean) * mul + beta`` with
  ``mul = gamma / sqrt(var + eps)`` per output channel. In exact arithmetic this is
  ``conv(x, (s * mul) * W_int) + (beta - mean * mul)``: the integers stay those the model was
  evaluated with and ``mul`` moves into the per-channel dequantization scale (a per-tensor
  weight scale becomes per-channel), the rest into the conv bias. Folding therefore does not
  re-quantize the weight on a new grid (which would change the integers and the model); it
  exports the trained, evaluated numerics. ONNX scales must be positive, so a channel whose
  multiplier is zero or negative keeps its scale and gets its multiplier from a Mul after the
  conv. Biases of convs and dense layers, and constant per-channel arithmetic after them, fold
  the same way. Models built with ``fold_bn=True`` quantize the folded kernel themselves;
  their export holds those integers and the offset as the bias (a rule's ``fold_bn``).
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

**Int8 containers** (``container="int8"``; the above is ``"int4"``, the portable, exactly
specified form). ONNX Runtime has no int4 convolution on the CPU, so the int4 graph
dequantizes every weight in every run and convolves in float. With ``int8`` the same trained
integers are stored in 8-bit types and the layers that read quantized activations run on its
integer kernels (:mod:`._integer`):

- Activations: every grid ``[lo, hi]`` is stored as ``q - lo`` in uint8 (QuantizeLinear with
  zero point ``zp - lo``, which saturates at 0, then a uint8 Clip at ``hi - lo``: the clip of
  the trained grid); a signed 4-bit grid [-8, 7] becomes [0, 15] with zero point ``zp + 8``.
- A conv whose input is quantized and whose output, after BN (folded into per-channel scales
  and an offset) and ReLU/ReLU6, goes into an activation quantizer becomes one
  ``QLinearConv``: uint8 input with its zero point, int8 kernel with per-output-channel
  scales (axis 0, zero point 0; depth-wise convs as groups), int32 bias, output requantized
  straight onto the next quantizer's grid; ReLU/ReLU6 and the grid's clip become one uint8
  Clip (``round`` is monotone, so clipping before or after rounding is the same).
- Any other conv or matmul with a quantized input (a residual branch, the head before
  pooling) stays a float Conv of the dequantized input and int8 kernel, which
  :func:`inference_session` dequantizes once at load (``session.disable_quant_qdq``, so
  ONNX Runtime folds the kernel's DequantizeLinear; its ConvInteger is several times slower
  than its float Conv); the classifier becomes ``MatMulInteger`` (exact int32 sums), then
  ``* s_x * s_w + offset`` per class in float32.
- Kernels are the trained integers, negated in channels whose BN multiplier is negative
  (ONNX scales stay positive), zero where it is zero, and multiplied per output channel by a
  whole factor that keeps them in int8, with the scale divided by it (the same weights on a
  finer accumulator grid, see below). A layer whose ``2 * x_max * |w|_max`` exceeds int16
  (8-bit activations times 8-bit weights: x86 kernels without VNNI would saturate) gets
  uint8 kernels with zero point 128. Layers whose input is not quantized (the stem under
  ``LSQ_paper``) stay float convolutions of int8 weights.

What differs from the JAX model: the float convs and MatMulInteger agree to float rounding
(tested: with every QLinearConv replaced by a float Conv and QuantizeLinear, the default
run's export agrees on 360 of 360 images, largest logit difference 3e-6). A QLinearConv, however, computes ``round((acc + bias) * m) + zp``
with ``bias = round(offset / (s_x * s_w))`` and ``m = s_x * s_w / s_y``, while JAX rounds
``(conv * mul + offset) / s_y``: the float BN offset is rounded to the int32 accumulator
grid. The per-channel factor above is chosen to put the offset as close to that grid as it
allows (a few thousandths of a trained accumulator step on average), but an activation
that close to a rounding threshold still lands one step away, and a 3-4-bit network spreads
each such step through the layers after it. Measured on the default run (W3A3 MobileNetV2
on digits): the first flips are about 2 in 10,000 activations of one layer, each within
1e-4 of a step from its rounding threshold, and after their spread the top-1 class agrees
with JAX on 341 of 360 validation images (94.7 %; accuracy 90.3 % against 93.3 %). The int4
form above is the one that computes the JAX numerics; the int8 form trades that for ONNX
Runtime's integer kernels.

The batch dimension of the exported input is dynamic: ``fn`` is traced at batch sizes N and
N + 1 and dimensions that differ between the two traces follow the batch.

Depth-wise convolutions: ``fn`` is traced inside :func:`oscqat_jax.nn.depthwise.exporting`,
so every depth-wise conv, whatever ``depthwise_impl`` its model was built or quantized with
(the CPU default is shifted slices), is traced as one grouped convolution and exported as one
Conv with ``group`` equal to its channels, its kernel between DequantizeLinear and the integers
like any other quantized conv. A function jitted and traced before keeps its first trace; if
that holds the shifted form, the export says so instead of writing slices.

:func:`export_model_onnx` exports a model and its variables: a Linen model quantized by rules
(``oscqat_jax.nn.quantize_model``; the package's families: ``oscqat_jax.models.quantize``;
run in ``eval`` mode) or an NNX model (quantized by ``quantize_nnx`` or not; a copy in ``eval()`` with its quantizers in
``"eval"`` is traced, the model itself is left as it is).
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper

from oscqat_jax.export import fileformat
from oscqat_jax.export.onnx._graph import Graph
from oscqat_jax.export.onnx._lowering import CONTAINERS, Lowering
from oscqat_jax.export.onnx._values import Const, Tensor
from oscqat_jax.nn import depthwise

MIN_OPSET = 21
"""ONNX opset with int4/uint4 tensors in QuantizeLinear/DequantizeLinear."""
CONTAINER_KEY = "oscqat_jax.container"
"""The model metadata entry naming the container (``int4``/``int8``) a graph was exported in."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(
    fn,
    example,
    path=None,
    *,
    opset: int = MIN_OPSET,
    name: str = "oscqat_jax",
    container: str = "int4",
):
    """ONNX model computing ``fn`` (see the module docstring); written to ``path`` when given.

    Args:
      fn: ``images -> logits``, a quantized model in eval mode with its variables closed over.
      example: float32 array ``(N, H, W, C)`` (NHWC); only its shape is used. The exported
        batch dimension is dynamic.
      path: file to write (atomically: a temporary file in the same folder, then renamed).
      opset: ONNX opset of the default domain, at least 21.
      name: the graph's name.
      container: ``int4`` (the portable QDQ form) or ``int8`` (integer layers for ONNX
        Runtime's integer kernels); see the module docstring.

    Returns:
      The ``onnx.ModelProto``, checked by ``onnx.checker`` (full check, with shape inference).
    """
    if path is not None:
        path = fileformat.check_output_path(path, (".onnx",))
    if not callable(fn):
        raise ValueError(f"fn must be a function images -> logits, got {type(fn).__name__}.")
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {', '.join(CONTAINERS)}, got {container!r}.")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (int4 Q/DQ), got {opset!r}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string (the graph's name), got {name!r}.")
    shape = tuple(np.shape(example))
    if len(shape) != 4 or np.asarray(example).dtype != np.float32 or min(shape) < 1:
        raise ValueError(
            f"example must be a float32 NHWC array (N, H, W, C) of positive dimensions, got "
            f"shape {shape} and dtype {np.asarray(example).dtype}."
        )
    with depthwise.exporting():
        traced = [
            jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((n, *shape[1:]), jnp.float32))
            for n in (shape[0], shape[0] + 1)
        ]
    if _holds_shifted_depthwise(traced[0].jaxpr):
        raise ValueError(
            "fn computes a depth-wise conv as shifted slices, traced by jax.jit before the "
            "export; pass the function without jax.jit, so that the export traces it with "
            "grouped convolutions."
        )
    graph = Graph()
    lowering = Lowering(graph, container)
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
    helper.set_model_props(model, {CONTAINER_KEY: container})
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        _write_atomically(model, os.fspath(path))
    return model


def _holds_shifted_depthwise(jaxpr) -> bool:
    """Whether ``jaxpr`` (or one nested in it) has an equation of the shifted depth-wise form."""
    for eqn in jaxpr.eqns:
        if depthwise.SHIFTED_SCOPE in str(eqn.source_info.name_stack):
            return True
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns") and _holds_shifted_depthwise(inner):
                return True
    return False


def _out_dyn(value, var) -> tuple[bool, ...]:
    dyn = getattr(value, "dyn", ())
    return tuple(dyn) if len(dyn) == len(var.aval.shape) else (False,) * len(var.aval.shape)


def _write_atomically(model: onnx.ModelProto, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)  # as the native export does
    fd, tmp = tempfile.mkstemp(prefix=".onnx-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_model_onnx(
    model,
    variables=None,
    path=None,
    *,
    input_shape=(224, 224, 3),
    opset: int = MIN_OPSET,
    name: str = "oscqat_jax",
    container: str = "int4",
    **model_kwargs,
):
    """:func:`export_onnx` of a model in eval mode (module docstring).

    Args:
      model: a ``QuantizedModel`` (``oscqat_jax.nn.quantize_model``; the package's families:
        ``oscqat_jax.models.quantize``) or a ``flax.nnx`` model.
      variables: the Linen model's variables; None for an NNX model, which holds its own.
      path: file to write (atomically), or None.
      input_shape: one image ``(H, W, C)``.
      opset, name, container: as for :func:`export_onnx`.
      **model_kwargs: the model's own keyword arguments for inference (e.g. ``train=False``).

    Returns:
      The ``onnx.ModelProto``.
    """
    if path is not None:
        path = fileformat.check_output_path(path, (".onnx",))
    input_shape = fileformat.check_input_shape(input_shape)
    fn = _inference_function(model, variables, model_kwargs)
    example = np.zeros((1, *input_shape), np.float32)
    with depthwise.exporting():  # the trace the export makes, so nothing else is cached
        fileformat.fitting(
            input_shape,
            lambda: jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(example.shape, jnp.float32)),
        )
    return export_onnx(fn, example, path, opset=opset, name=name, container=container)


def _inference_function(model, variables, model_kwargs: dict):
    """``images -> logits`` of ``model`` in eval mode, its variables closed over."""
    from flax import linen as nn
    from flax import nnx

    from oscqat_jax.nn.intercept import QuantizedModel

    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                "An NNX model holds its own variables; call export_model_onnx(model, "
                "path=...) without variables."
            )
        from oscqat_jax.nn.nnx_quant import quantized_modules, set_mode

        copy = nnx.clone(model)
        copy.eval()
        if quantized_modules(copy):
            set_mode(copy, "eval")
        graphdef, state = nnx.split(copy)
        return lambda x: nnx.merge(graphdef, state, copy=True)(x, **model_kwargs)
    if isinstance(model, nn.Module):
        raise ValueError(
            f"export_model_onnx takes a Linen model quantized by rules, got the plain "
            f"{type(model).__name__}; pass quantize_model(model, rules) (the package's "
            "families: oscqat_jax.models.quantize(model, setup)), or export a float "
            "function with export_onnx."
        )
    if not isinstance(model, QuantizedModel):
        raise ValueError(
            "export_model_onnx needs a QuantizedModel (oscqat_jax.nn.quantize_model) or a "
            f"flax.nnx Module, got {type(model).__name__}."
        )
    if variables is None:
        raise ValueError(
            f"export_model_onnx needs the variables of the {type(model).__name__} to export."
        )
    fileformat.check_variables(variables)
    return lambda x: model.apply(variables, x, mode="eval", **model_kwargs)


SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""ONNX Runtime session settings of :func:`inference_session`. ONNX Runtime fuses
DequantizeLinear -> MatMul with int4/int8 weights into MatMulNBits, whose default accuracy
level 4 quantizes the activations to int8 on the fly (logits move by ~1e-3); level 1
computes in float32, as the exported graph says."""
INT8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
"""Added for int8-container models: their integer layers are explicit (QLinearConv,
MatMulInteger), so ONNX Runtime's QDQ fusions have nothing to do, and switching them off lets
its constant folding dequantize the int8 kernels of the float convs once at load instead of
in every run."""
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer", "WeightBiasQuantization")
"""ONNX Runtime graph transformers :func:`inference_session` turns off.
``WeightBiasQuantization`` rounds the float bias of a Conv between DequantizeLinear and
QuantizeLinear to an int32 grid of step ``input scale * weight scale``; the folded BN offsets
are not on that grid, so it moves the outputs by up to half a step (logits by whole steps in
3-4-bit models). ``QDQPropagationTransformer`` moves a DequantizeLinear past a MaxPool (exact),
but ONNX Runtime 1.32 has no int4/uint4 MaxPool and then refuses the model (ResNet's max-pool
after a 3-4-bit activation quantizer)."""


def inference_session(model_or_path, *, threads: int = 0):
    """An ONNX Runtime CPU session of an exported model (a ``ModelProto`` or a file), with
    :data:`SESSION_CONFIG` (and :data:`INT8_SESSION_CONFIG` for an int8-container model);
    ``threads`` intra-op threads (0: ONNX Runtime's default)."""
    import onnxruntime as ort

    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model_or_path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    config = dict(SESSION_CONFIG)
    if {p.key: p.value for p in model.metadata_props}.get(CONTAINER_KEY) == "int8":
        config.update(INT8_SESSION_CONFIG)
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        model.SerializeToString(),
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
