"""ONNX lowering rules for JAX primitives with run-time inputs (see ``_lowering``).

A rule takes the lowering, the equation of the batch-N trace, its twin of the batch-(N+1)
trace and the input values; it returns the output value (or a list of them). Equations whose
inputs are all constants never reach a rule: they are evaluated at export.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from onnx import helper

from oscqat_jax.export.onnx import _layer_rules
from oscqat_jax.export.onnx._layer_rules import out as _out
from oscqat_jax.export.onnx._values import Affine, dyn_of, is_const

_INT64_MAX = np.iinfo(np.int64).max


def _int64(lo, values) -> str:
    return lo.graph.constant(np.asarray(values, np.int64), "shape")


def _shape_input(lo, shape, dyn) -> str:
    """A Reshape target: the batch-following dimension (at most one) becomes -1."""
    if sum(dyn) > 1:
        raise ValueError(
            f"A reshape to {tuple(shape)} has {sum(dyn)} dimensions that follow the batch; the "
            "ONNX export supports at most one."
        )
    return _int64(lo, [-1 if d else n for n, d in zip(shape, dyn, strict=True)])


# ---- element-wise --------------------------------------------------------------------------


def _channel_values(c, shape, axis: int) -> np.ndarray | None:
    """The per-channel vector of constant ``c`` when it broadcasts against ``shape`` along
    ``axis`` only (a scalar, ``(C,)``, ``(1, 1, 1, C)``...); None otherwise."""
    value = np.asarray(c.value, np.float64)
    if value.ndim > len(shape) or any(c.dyn):
        return None
    value = value.reshape((1,) * (len(shape) - value.ndim) + value.shape)
    if any(n != 1 for i, n in enumerate(value.shape) if i != axis):
        return None
    if value.shape[axis] not in (1, shape[axis]):
        return None
    return np.broadcast_to(value.reshape(-1), (shape[axis],))


def _fold_into_affine(prim: str, invals) -> Affine | None:
    """``layer(x) (+-*/) c`` for a constant ``c`` per output channel, as a new multiplier and
    offset of the layer (BatchNorm, biases, constant scaling); None when it does not apply."""
    y, c = invals
    if prim in ("add", "mul") and isinstance(c, Affine) and is_const(y):
        y, c = c, y
    if not (isinstance(y, Affine) and is_const(c)) or y.clamp is not None:
        return None
    vec = _channel_values(c, y.shape, y.axis)
    if vec is None:
        return None
    channels = y.shape[y.axis]
    mul = np.ones(channels) if y.mul is None else y.mul
    add = np.zeros(channels) if y.add is None else y.add
    if prim == "add":
        add = add + vec
    elif prim == "sub":
        add = add - vec
    elif prim == "mul":
        mul, add = mul * vec, add * vec
    else:
        mul, add = mul / vec, add / vec
    return dataclasses.replace(y, mul=mul, add=add)


def _scalar(c) -> float | None:
    """The value of a constant scalar (any shape of one element), else None."""
    if not is_const(c) or np.size(c.value) != 1:
        return None
    return float(np.asarray(c.value).reshape(()))


def _clip_affine(y: Affine, low: float, high: float) -> Affine:
    """``clip(y, low, high)`` after ``y``'s own clip (``max``/``min`` compose on the bounds)."""
    old_low, old_high = y.clamp or (-np.inf, np.inf)
    return dataclasses.replace(
        y, clamp=(min(max(old_low, low), high), max(min(old_high, high), low))
    )


def _clamp_integer_layer(prim: str, invals) -> Affine | None:
    """``max(y, c)`` / ``min(y, c)`` (ReLU, ReLU6) of an integer layer (int8 containers) as a
    clip it carries to the quantizer it feeds; None when it does not apply."""
    y, c = invals
    if isinstance(c, Affine):
        y, c = c, y
    value = _scalar(c)
    if not (isinstance(y, Affine) and y.qx is not None) or value is None:
        return None
    return _clip_affine(y, value, np.inf) if prim == "max" else _clip_affine(y, -np.inf, value)


def _binary(op: str, negate: bool = False):
    def rule(lo, ea, eb, invals):
        prim = ea.primitive.name
        if prim in ("add", "sub", "mul", "div"):
            folded = _fold_into_affine(prim, invals)
            if folded is not None:
                return folded
        if prim in ("max", "min"):
            clipped = _clamp_integer_layer(prim, invals)
            if clipped is not None:
                return clipped
        name = lo.graph.node(op, [lo.name(v) for v in invals])
        if negate:
            name = lo.graph.node("Not", [name])
        return _out(lo, name, ea, eb)

    return rule


def _unary(op: str):
    def rule(lo, ea, eb, invals):
        return _out(lo, lo.graph.node(op, [lo.name(invals[0])]), ea, eb)

    return rule


def _identity(lo, ea, eb, invals):
    return list(invals) if ea.primitive.multiple_results else invals[0]


def _square(lo, ea, eb, invals):
    x = lo.name(invals[0])
    return _out(lo, lo.graph.node("Mul", [x, x]), ea, eb)


def _integer_pow(lo, ea, eb, invals):
    x, y = lo.name(invals[0]), ea.params["y"]
    if y == 2:
        return _out(lo, lo.graph.node("Mul", [x, x]), ea, eb)
    exponent = lo.graph.constant(np.asarray(y, np.float32))
    return _out(lo, lo.graph.node("Pow", [x, exponent]), ea, eb)


def _rsqrt(lo, ea, eb, invals):
    root = lo.graph.node("Sqrt", [lo.name(invals[0])])
    one = lo.graph.constant(np.asarray(1.0, np.float32))
    return _out(lo, lo.graph.node("Div", [one, root]), ea, eb)


def _round(lo, ea, eb, invals):
    if ea.params["rounding_method"] != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
        raise NotImplementedError(
            "The ONNX export lowers only round-half-to-even (ONNX Round); this round uses "
            f"{ea.params['rounding_method']}."
        )
    return _out(lo, lo.graph.node("Round", [lo.name(invals[0])]), ea, eb)


def _convert(lo, ea, eb, invals):
    new = np.dtype(ea.params["new_dtype"])
    old = np.dtype(ea.invars[0].aval.dtype)
    if new == old:
        return invals[0]
    to = helper.np_dtype_to_tensor_dtype(new)
    return _out(lo, lo.graph.node("Cast", [lo.name(invals[0])], to=to), ea, eb)


def _select_n(lo, ea, eb, invals):
    if len(invals) != 3:
        raise NotImplementedError(
            f"The ONNX export lowers select_n with two cases (jnp.where), got {len(invals) - 1}."
        )
    pred, if_false, if_true = (lo.name(v) for v in invals)
    if np.dtype(ea.invars[0].aval.dtype) != np.bool_:
        pred = lo.graph.node("Cast", [pred], to=helper.np_dtype_to_tensor_dtype(np.dtype(bool)))
    return _out(lo, lo.graph.node("Where", [pred, if_true, if_false]), ea, eb)


def _clamp(lo, ea, eb, invals):
    low_value, high_value = _scalar(invals[0]), _scalar(invals[2])
    x = invals[1]
    if isinstance(x, Affine) and x.qx is not None and None not in (low_value, high_value):
        return _clip_affine(x, low_value, high_value)
    low, x, high = (lo.name(v) for v in invals)
    y = lo.graph.node("Max", [x, low])
    return _out(lo, lo.graph.node("Min", [y, high]), ea, eb)


# ---- shapes ----------------------------------------------------------------------------------


def _reshape(lo, ea, eb, invals):
    if ea.params.get("dimensions") is not None:
        raise NotImplementedError(
            "The ONNX export lowers reshape without a dimensions permutation."
        )
    out = ea.outvars[0]
    target = _shape_input(lo, out.aval.shape, dyn_of(out, eb.outvars[0]))
    return _out(lo, lo.graph.node("Reshape", [lo.name(invals[0]), target]), ea, eb)


def _broadcast_in_dim(lo, ea, eb, invals):
    x = invals[0]
    in_shape, in_dyn = ea.invars[0].aval.shape, dyn_of(ea.invars[0], eb.invars[0])
    out = lo.tensor("", ea.outvars[0], eb.outvars[0])
    expanded, expanded_dyn = [1] * len(out.shape), [False] * len(out.shape)
    for axis, out_axis in enumerate(ea.params["broadcast_dimensions"]):
        expanded[out_axis], expanded_dyn[out_axis] = in_shape[axis], in_dyn[axis]
    if expanded_dyn != list(out.dyn):
        raise NotImplementedError(
            "The ONNX export cannot broadcast a run-time tensor onto the batch dimension."
        )
    name = lo.name(x)
    if tuple(expanded) != tuple(in_shape):
        name = lo.graph.node("Reshape", [name, _shape_input(lo, expanded, expanded_dyn)])
    if tuple(expanded) != tuple(out.shape):
        target = [1 if d else n for n, d in zip(out.shape, out.dyn, strict=True)]
        name = lo.graph.node("Expand", [name, _int64(lo, target)])
    return _out(lo, name, ea, eb)


def _squeeze(lo, ea, eb, invals):
    axes = _int64(lo, list(ea.params["dimensions"]))
    return _out(lo, lo.graph.node("Squeeze", [lo.name(invals[0]), axes]), ea, eb)


def _transpose(lo, ea, eb, invals):
    perm = [int(p) for p in ea.params["permutation"]]
    return _out(lo, lo.graph.node("Transpose", [lo.name(invals[0])], perm=perm), ea, eb)


def _concatenate(lo, ea, eb, invals):
    names = [lo.name(v) for v in invals]
    return _out(lo, lo.graph.node("Concat", names, axis=int(ea.params["dimension"])), ea, eb)


def _pad(lo, ea, eb, invals):
    config = ea.params["padding_config"]
    if any(interior != 0 or low < 0 or high < 0 for low, high, interior in config):
        raise NotImplementedError(
            "The ONNX export lowers lax.pad with non-negative edge padding and no interior padding."
        )
    pads = _int64(lo, [c[0] for c in config] + [c[1] for c in config])
    x, value = lo.name(invals[0]), lo.name(invals[1])
    return _out(lo, lo.graph.node("Pad", [x, pads, value], mode="constant"), ea, eb)


def _slice(lo, ea, eb, invals):
    p = ea.params
    shape, dyn = ea.invars[0].aval.shape, dyn_of(ea.invars[0], eb.invars[0])
    strides = p["strides"] or (1,) * len(shape)
    ends = []
    for axis, (start, limit) in enumerate(zip(p["start_indices"], p["limit_indices"], strict=True)):
        if dyn[axis] and (start, limit) != (0, shape[axis]):
            raise NotImplementedError("The ONNX export cannot slice the batch dimension.")
        ends.append(_INT64_MAX if dyn[axis] else limit)
    inputs = [
        lo.name(invals[0]),
        _int64(lo, p["start_indices"]),
        _int64(lo, ends),
        _int64(lo, list(range(len(shape)))),
        _int64(lo, strides),
    ]
    return _out(lo, lo.graph.node("Slice", inputs), ea, eb)


def _reduce(op: str):
    def rule(lo, ea, eb, invals):
        axes = _int64(lo, list(ea.params["axes"]))
        return _out(lo, lo.graph.node(op, [lo.name(invals[0]), axes], keepdims=0), ea, eb)

    return rule


RULES = {
    "add": _binary("Add"),
    "sub": _binary("Sub"),
    "mul": _binary("Mul"),
    "div": _binary("Div"),
    "max": _binary("Max"),
    "min": _binary("Min"),
    "pow": _binary("Pow"),
    "ge": _binary("GreaterOrEqual"),
    "gt": _binary("Greater"),
    "le": _binary("LessOrEqual"),
    "lt": _binary("Less"),
    "eq": _binary("Equal"),
    "ne": _binary("Equal", negate=True),
    "and": _binary("And"),
    "or": _binary("Or"),
    "not": _unary("Not"),
    "neg": _unary("Neg"),
    "abs": _unary("Abs"),
    "sign": _unary("Sign"),
    "floor": _unary("Floor"),
    "ceil": _unary("Ceil"),
    "exp": _unary("Exp"),
    "log": _unary("Log"),
    "tanh": _unary("Tanh"),
    "logistic": _unary("Sigmoid"),
    "sqrt": _unary("Sqrt"),
    "erf": _unary("Erf"),
    "rsqrt": _rsqrt,
    "square": _square,
    "integer_pow": _integer_pow,
    "round": _round,
    "clamp": _clamp,
    "select_n": _select_n,
    "convert_element_type": _convert,
    "stop_gradient": _identity,
    "copy": _identity,
    "copy_p": _identity,
    "optimization_barrier": _identity,
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "reduce_sum": _reduce("ReduceSum"),
    "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "conv_general_dilated": _layer_rules.conv,
    "dot_general": _layer_rules.dot_general,
    "reduce_window_max": _layer_rules.max_pool,
}
"""Primitive name -> lowering rule."""
