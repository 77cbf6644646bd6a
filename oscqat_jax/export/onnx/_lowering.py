"""Lowering of a traced eval-mode forward (a jaxpr) to ONNX nodes; see :mod:`.exporter`.

Every jaxpr variable is bound to one of four kinds of value:

- :class:`Const`: a numpy array known at export (the closed-over variables and everything
  computed from them alone: weight quantization, frozen integers, BN multipliers). It may
  carry the integer grid it lies on (``bounds``) and, for a dequantized weight, its integers
  and scale (``weight``).
- :class:`Tensor`: a float (or bool) ONNX tensor computed at run time.
- :class:`QInt`: the integer output of an activation quantizer, an ONNX integer tensor from
  QuantizeLinear, with the scale and zero point its DequantizeLinear needs.
- :class:`Affine`: a convolution or matmul with a constant kernel, times a per-output-channel
  multiplier plus an offset, emitted only when something reads it; the BN, bias and constant
  arithmetic following the layer accumulate into the multiplier and offset until then.

With ``container="int8"`` two more kinds appear: :class:`Dequantized`, an activation
quantizer's integers read as float (a DequantizeLinear emitted only when a float operator
reads it), and an :class:`Affine` that reads the integers (``qx``) and may carry a clip
(ReLU/ReLU6); see :mod:`._integer`.

The forward is traced twice, at batch sizes N and N + 1, and the two jaxprs are walked
together: a dimension that differs between them follows the batch and is exported dynamic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.extend.core import Literal
from onnx import TensorProto

from oscqat_jax import quant
from oscqat_jax.export.onnx import _integer
from oscqat_jax.export.onnx._graph import Graph, int_type_for
from oscqat_jax.export.onnx._quantizers import QuantizerLowering, scalar_of
from oscqat_jax.export.onnx._rules import RULES
from oscqat_jax.export.onnx._values import (
    Affine,
    Const,
    Dequantized,
    QInt,
    Tensor,
    dyn_of,
    is_const,
    unbatched,
)

_INLINED = (
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "remat",
)


CONTAINERS = ("int4", "int8")
"""How integers are stored: ``int4`` in the narrowest ONNX type of their grid (float
operators between QuantizeLinear/DequantizeLinear), ``int8`` in 8-bit types read by ONNX
Runtime's integer kernels (see :mod:`.exporter`)."""


class Lowering(QuantizerLowering):
    """Walks a pair of jaxprs (batch N and N + 1) and appends the ONNX nodes to ``graph``."""

    def __init__(self, graph: Graph, container: str = "int4"):
        if container not in CONTAINERS:
            raise ValueError(
                f"container must be one of {', '.join(CONTAINERS)}, got {container!r}."
            )
        self.graph = graph
        self.container = container
        self._materialized: dict[int, tuple] = {}
        # id(Affine.origin) -> (origin, name, multiplier, offset) of the layer's first output.
        self._layer_outputs: dict[int, tuple] = {}

    @property
    def integer_layers(self) -> bool:
        """Whether layers reading quantized activations run on integer kernels (int8)."""
        return self.container == "int8"

    # ---- values ---------------------------------------------------------------------------

    def name(self, v) -> str:
        """The ONNX name of ``v`` as a float (or bool) tensor, emitting what it needs."""
        key = id(v)
        if key in self._materialized:
            return self._materialized[key][1]
        if isinstance(v, QInt):
            name = self.graph.node("Cast", [v.name], to=TensorProto.FLOAT, hint="int_as_float")
            if v.offset:
                offset = self.graph.constant(np.asarray(v.offset, np.float32))
                name = self.graph.node("Add", [name, offset])
        elif isinstance(v, Tensor):
            return v.name
        elif isinstance(v, Const):
            name = self.graph.constant(unbatched(v), "const")
        elif isinstance(v, Affine):
            name = self._emit_affine(v)
        elif isinstance(v, Dequantized):
            name = self._emit_dequantize(v.ints)
        else:  # pragma: no cover - every value is one of the five kinds
            raise TypeError(type(v))
        # The value is kept alive with its name, so its id is never reused by another value.
        self._materialized[key] = (v, name)
        return name

    def tensor(self, name: str, outvar_a, outvar_b) -> Tensor:
        return Tensor(name, tuple(outvar_a.aval.shape), dyn_of(outvar_a, outvar_b))

    # ---- the walk -------------------------------------------------------------------------

    def run(self, jaxpr_a, jaxpr_b, consts: Sequence, args: Sequence) -> list:
        """Lowers ``jaxpr_a`` (its twin ``jaxpr_b`` gives the batch dimensions) applied to
        values ``args`` with constants ``consts``; returns its output values."""
        env: dict = {}
        for var, value in zip(jaxpr_a.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr_a.invars, args, strict=True):
            env[var] = value
        eqns = list(zip(jaxpr_a.eqns, jaxpr_b.eqns, strict=True))
        i = 0
        while i < len(eqns):
            scope = _scope(eqns[i][0])
            if scope is None:
                self._eqn(*eqns[i], env)
                i += 1
                continue
            j = i + 1
            while (
                j < len(eqns) and _scope(eqns[j][0]) == scope and eqns[j][0].primitive.name != "div"
            ):
                j += 1
            later = [e for e, _ in eqns[j:]]
            self._quantizer(scope, eqns[i:j], env, later, jaxpr_a.outvars)
            i = j
        return [self.read(env, v) for v in jaxpr_a.outvars]

    def read(self, env, var):
        if isinstance(var, Literal):
            return Const(np.asarray(var.val, dtype=var.aval.dtype))
        return env[var]

    def _eqn(self, ea, eb, env) -> None:
        prim = ea.primitive.name
        invals = [self.read(env, v) for v in ea.invars]
        if prim in _INLINED:
            outs = self._inline(ea, eb, invals)
        elif all(is_const(v) for v in invals):
            outs = self._fold(ea, eb, invals)
        else:
            rule = RULES.get(prim)
            if rule is None:
                raise NotImplementedError(
                    f"The ONNX export has no lowering for the JAX primitive {prim!r} "
                    f"(equation: {ea}); supported primitives are {', '.join(sorted(RULES))}, "
                    "plus any primitive whose inputs are all constants."
                )
            outs = rule(self, ea, eb, invals)
            if not isinstance(outs, list):
                outs = [outs]
        for var, value in zip(ea.outvars, outs, strict=True):
            env[var] = value

    def _inline(self, ea, eb, invals) -> list:
        key = "jaxpr" if "jaxpr" in ea.params else "call_jaxpr"
        closed_a, closed_b = ea.params[key], eb.params[key]
        jaxpr_a = getattr(closed_a, "jaxpr", closed_a)
        jaxpr_b = getattr(closed_b, "jaxpr", closed_b)
        consts = [Const(np.asarray(c)) for c in getattr(closed_a, "consts", ())]
        return self.run(jaxpr_a, jaxpr_b, consts, invals)

    def _fold(self, ea, eb, invals: list[Const]) -> list[Const]:
        """Evaluates an equation of constants (numpy for exact IEEE operations, else JAX)."""
        values = [c.value for c in invals]
        fast = _NUMPY.get(ea.primitive.name)
        outs = None if fast is None else fast(values, ea.params)
        if outs is not None:
            outs = [outs]
        else:
            with jax.default_device(jax.devices("cpu")[0]):
                result = ea.primitive.bind(*values, **ea.params)
            outs = result if ea.primitive.multiple_results else [result]
        consts = []
        for var_a, var_b, out in zip(ea.outvars, eb.outvars, outs, strict=True):
            out = np.asarray(out, dtype=var_a.aval.dtype).reshape(var_a.aval.shape)
            consts.append(Const(out, dyn_of(var_a, var_b)))
        if ea.primitive.name in ("select_n", "convert_element_type", "reshape", "copy"):
            # Frozen integers replace some of a quantizer's integers: the grid carries over.
            grids = {c.bounds for c in invals if c.bounds is not None}
            if len(grids) == 1:
                lo, hi = grids.pop()
                if np.all((consts[0].value >= lo) & (consts[0].value <= hi)):
                    consts[0].bounds = (lo, hi)
        return consts

    # ---- layers with constant kernels --------------------------------------------------------

    def _emit_affine(self, a: Affine) -> str:
        y = self._layer_output(a)
        if a.clamp is not None:
            low, high = (np.asarray(c, np.float32) for c in a.clamp)
            if np.isfinite(low):
                y = self.graph.node("Max", [y, self.graph.constant(low)])
            if np.isfinite(high):
                y = self.graph.node("Min", [y, self.graph.constant(high)])
        return y

    def _layer_output(self, a: Affine) -> str:
        """``layer(x) * mul + add`` of ``a`` before its clip. A layer read with two offsets
        and one multiplier runs once: hard-swish reads ``y`` and ``y + 3`` (folded into a
        second Affine of the same layer), and the second read adds the difference of the
        offsets to the first one's output instead of emitting the convolution again."""
        channels = a.shape[a.axis]
        mul = np.ones(channels) if a.mul is None else np.asarray(a.mul)
        add = np.zeros(channels) if a.add is None else np.asarray(a.add)
        first = self._layer_outputs.get(id(a.origin))
        if first is not None and np.array_equal(first[2], mul):
            _, y, _, first_add = first
            shift = add - first_add
            if not shift.any():
                return y
            shape = [1] * len(a.shape)
            shape[a.axis] = channels
            offset = self.graph.constant(shift.astype(np.float32).reshape(shape), "bias")
            return self.graph.node("Add", [y, offset])
        if a.qx is not None:
            y = self._emit_affine_integer(a)
        else:
            y = self._emit_affine_float(a)
        if first is None:  # the origin is kept alive with it, so its id is never reused
            self._layer_outputs[id(a.origin)] = (a.origin, y, mul, add)
        return y

    def _emit_affine_integer(self, a: Affine) -> str:
        """A layer on quantized activations whose output is read as float: ``MatMulInteger``
        then the float scale and offset for a matmul; for a conv (and a kernel that does not
        fit an 8-bit container) a float Conv of the dequantized input and kernel, since ONNX
        Runtime's ``ConvInteger`` is several times slower than its float Conv (measured: 35
        of 44 ms of a ResNet-18 run in 11 ConvIntegers)."""
        kernel = None
        if a.kind == "matmul":
            kernel = _integer.integer_kernel(a, a.qx.grid_max, scalar_of(a.qx.scale))
        if kernel is None:
            x = self._emit_dequantize(dataclasses.replace(a.qx, name=a.x, shape=(), dyn=()))
            return self._emit_affine_float(dataclasses.replace(a, x=x, qx=None, clamp=None))
        return _integer.emit_matmul_integer(self.graph, a, kernel)

    def _emit_affine_float(self, a: Affine) -> str:
        g = self.graph
        kernel_name, post_mul = self._kernel(a)
        inputs = [a.x, kernel_name]
        bias = None if a.add is None else a.add.astype(np.float32)
        if a.kind == "conv":
            if bias is not None and post_mul is None:
                inputs.append(g.constant(bias, "bias"))
                bias = None
            y = g.node("Conv", inputs, hint="conv", **a.attrs)
            channel_shape = (-1, 1, 1)
        else:
            y = g.node("MatMul", inputs, hint="matmul")
            channel_shape = (-1,)
        if post_mul is not None:
            y = g.node("Mul", [y, g.constant(post_mul.reshape(channel_shape), "bn_mul")])
        if bias is not None:
            y = g.node("Add", [y, g.constant(bias.reshape(channel_shape), "bias")])
        if a.out_perm is not None and a.out_perm != tuple(range(len(a.out_perm))):
            y = g.node("Transpose", [y], perm=list(a.out_perm))
        return y

    def _kernel(self, a: Affine) -> tuple[str, np.ndarray | None]:
        """The kernel input of the layer (integers + DequantizeLinear when it was quantized) with
        the positive part of the multiplier folded in; returns it and the multiplier left over
        (None when every channel's multiplier was positive)."""
        g = self.graph
        out_axis = 0 if a.kind == "conv" else 1
        channels = a.kernel.value.shape[a.kernel_perm[out_axis]]
        mul = a.mul
        wq = a.kernel.weight
        if wq is None:
            kernel = np.transpose(a.kernel.value, a.kernel_perm).astype(np.float64)
            if mul is not None:
                shape = [1] * kernel.ndim
                shape[out_axis] = channels
                kernel = kernel * mul.reshape(shape)
            return g.constant(kernel.astype(np.float32), "kernel"), None
        ints = np.transpose(wq.ints, a.kernel_perm)
        scale = _channel_vector(wq.scale, a.kernel_perm, out_axis, "weight scale")
        zp = wq.zero_point
        zp = (
            np.zeros((), np.float32)
            if zp is None
            else _channel_vector(zp, a.kernel_perm, out_axis, "weight zero point")
        )
        post_mul = None
        if mul is not None and not np.all(mul == 1):
            positive = mul > 0
            scale = np.broadcast_to(scale, (channels,)) * np.where(positive, mul, 1.0)
            if not positive.all():
                post_mul = np.where(positive, 1.0, mul).astype(np.float32)
        if scale.size > 1:
            zp = np.broadcast_to(zp, scale.shape)
        _, _, dtype, _, _ = int_type_for(*wq.bounds)
        if self.integer_layers and dtype in (ml_dtypes.int4, ml_dtypes.uint4):
            dtype = np.int8 if wq.bounds[0] < 0 else np.uint8
        attrs = {"axis": out_axis} if scale.size > 1 else {}
        name = g.node(
            "DequantizeLinear",
            [
                g.integers(ints, dtype, "weight_int"),
                g.constant(np.asarray(scale, np.float32), "weight_scale"),
                g.integers(np.asarray(zp), dtype, "weight_zero_point"),
            ],
            hint="weight",
            **attrs,
        )
        return name, post_mul


def _scope(eqn) -> str | None:
    stack = str(eqn.source_info.name_stack)
    for scope in (quant.TO_INT_SCOPE, quant.DEQUANTIZE_SCOPE):
        if scope in stack:
            return scope
    return None


def _channel_vector(values, perm, out_axis: int, what: str) -> np.ndarray:
    """A per-tensor (scalar) or per-output-channel (1-D) view of ``values`` for a kernel in the
    ``perm`` layout."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    values = np.transpose(values.reshape(values.shape), perm)
    if any(n != 1 for i, n in enumerate(values.shape) if i != out_axis):
        raise ValueError(
            f"The {what} of shape {values.shape} varies along an axis other than the output "
            "channels; the ONNX export supports per-tensor and per-output-channel weights."
        )
    return values.reshape(-1)


# ---- numpy evaluation of exact operations on constants ---------------------------------------


def _np_binary(fn):
    return lambda v, p: fn(v[0], v[1])


_NUMPY: dict[str, Callable] = {
    "add": _np_binary(np.add),
    "sub": _np_binary(np.subtract),
    "mul": _np_binary(np.multiply),
    "div": _np_binary(np.divide),
    "max": _np_binary(np.maximum),
    "min": _np_binary(np.minimum),
    "ge": _np_binary(np.greater_equal),
    "gt": _np_binary(np.greater),
    "le": _np_binary(np.less_equal),
    "lt": _np_binary(np.less),
    "eq": _np_binary(np.equal),
    "ne": _np_binary(np.not_equal),
    "and": _np_binary(np.logical_and),
    "or": _np_binary(np.logical_or),
    "not": lambda v, p: np.logical_not(v[0]),
    "neg": lambda v, p: np.negative(v[0]),
    "abs": lambda v, p: np.abs(v[0]),
    "stop_gradient": lambda v, p: v[0],
    "copy": lambda v, p: v[0],
    "convert_element_type": lambda v, p: v[0].astype(p["new_dtype"]),
    "select_n": lambda v, p: np.choose(v[0].astype(np.int32), v[1:]),
    "reshape": lambda v, p: v[0].reshape(p["new_sizes"]),
    "squeeze": lambda v, p: np.squeeze(v[0], axis=tuple(p["dimensions"])),
    "transpose": lambda v, p: np.transpose(v[0], p["permutation"]),
    "broadcast_in_dim": lambda v, p: _np_broadcast(v[0], p["shape"], p["broadcast_dimensions"]),
}


def _np_broadcast(x, shape, dims):
    expanded = np.ones(len(shape), dtype=int)
    for operand_axis, out_axis in enumerate(dims):
        expanded[out_axis] = x.shape[operand_axis]
    return np.broadcast_to(x.reshape(expanded), shape).copy()


def _np_round(values, params):
    if params["rounding_method"] != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
        return None  # evaluated by JAX instead
    return np.round(values[0])


_NUMPY["round"] = _np_round
