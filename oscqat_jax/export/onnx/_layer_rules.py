"""ONNX lowering rules of the layers: convolutions (depth-wise ones as grouped Convs), matrix
products and max pooling, in float between DequantizeLinear nodes or, with int8 containers, on
ONNX Runtime's integer kernels (:mod:`._integer`). The rule table is :mod:`._rules`'.
"""

from __future__ import annotations

import numpy as np

from oscqat_jax.export.onnx._values import Affine, Dequantized, QInt, Tensor, is_const


def out(lo, name: str, ea, eb) -> Tensor:
    """The Tensor of ONNX value ``name``, the output of equation ``ea`` (its batch-(N+1) twin
    ``eb``)."""
    return lo.tensor(name, ea.outvars[0], eb.outvars[0])


def _perm_to(spec) -> list[int]:
    return [int(a) for a in spec]


def _integer_input(lo, invals) -> QInt | None:
    """The activation integers a layer reads when it can run on integer kernels (int8
    containers, a per-tensor activation quantizer, a kernel from a weight quantizer)."""
    x, kernel = invals
    if not (lo.integer_layers and isinstance(x, Dequantized) and is_const(kernel)):
        return None
    if kernel.weight is None or x.ints.scale.size != 1 or np.size(x.ints.zero_point) != 1:
        return None
    return x.ints


def conv(lo, ea, eb, invals):
    """``lax.conv_general_dilated`` as a Conv between two Transposes (the layouts of its
    dimension numbers to NCHW/OIHW and back); a constant kernel stays lazy (:class:`Affine`)."""
    p = ea.params
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError(
            "The ONNX export lowers convolutions without input dilation or batch groups."
        )
    if any(low < 0 or high < 0 for low, high in p["padding"]):
        raise NotImplementedError("The ONNX export lowers convolutions with non-negative padding.")
    dn = p["dimension_numbers"]
    lhs_perm, rhs_perm = _perm_to(dn.lhs_spec), _perm_to(dn.rhs_spec)
    out_perm = tuple(int(a) for a in np.argsort(dn.out_spec))
    qx = _integer_input(lo, invals)
    x = lo.name(invals[0]) if qx is None else qx.name
    if lhs_perm != sorted(lhs_perm):
        x = lo.graph.node("Transpose", [x], perm=lhs_perm)
    kernel_shape = [int(ea.invars[1].aval.shape[a]) for a in rhs_perm[2:]]
    attrs = dict(
        kernel_shape=kernel_shape,
        strides=[int(s) for s in p["window_strides"]],
        pads=[int(lw) for lw, _ in p["padding"]] + [int(h) for _, h in p["padding"]],
        dilations=[int(d) for d in p["rhs_dilation"]],
        group=int(p["feature_group_count"]),
    )
    out = lo.tensor("", ea.outvars[0], eb.outvars[0])
    if is_const(invals[1]):
        return Affine(
            "conv",
            x,
            invals[1],
            tuple(rhs_perm),
            attrs,
            out_perm,
            out.shape,
            out.dyn,
            int(dn.out_spec[1]),
            qx=qx,
        )
    kernel = lo.graph.node("Transpose", [lo.name(invals[1])], perm=rhs_perm)
    y = lo.graph.node("Conv", [x, kernel], **attrs)
    if out_perm != tuple(range(len(out_perm))):
        y = lo.graph.node("Transpose", [y], perm=list(out_perm))
    return out(lo, y, ea, eb)


def dot_general(lo, ea, eb, invals):
    """``x @ W`` contracting the last axis of ``x`` with one axis of a 2-D ``W``."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = ea.params["dimension_numbers"]
    x_rank, w_shape = len(ea.invars[0].aval.shape), ea.invars[1].aval.shape
    if lhs_b or rhs_b or tuple(lhs_c) != (x_rank - 1,) or len(w_shape) != 2 or len(rhs_c) != 1:
        raise NotImplementedError(
            "The ONNX export lowers dot_general as x @ W: no batch dimensions, the last axis of "
            f"x contracted with one axis of a 2-D W; got dimension numbers "
            f"{ea.params['dimension_numbers']} for shapes {ea.invars[0].aval.shape} x {w_shape}."
        )
    perm = (0, 1) if rhs_c[0] == 0 else (1, 0)
    out = lo.tensor("", ea.outvars[0], eb.outvars[0])
    if is_const(invals[1]):
        qx = _integer_input(lo, invals)
        x = lo.name(invals[0]) if qx is None else qx.name
        return Affine("matmul", x, invals[1], perm, {}, None, out.shape, out.dyn, x_rank - 1, qx=qx)
    w = lo.name(invals[1])
    if perm != (0, 1):
        w = lo.graph.node("Transpose", [w], perm=[1, 0])
    return out(lo, lo.graph.node("MatMul", [lo.name(invals[0]), w]), ea, eb)


def max_pool(lo, ea, eb, invals):
    """``reduce_window_max`` over the spatial axes of a rank-4 channels-last (or -first) tensor."""
    p = ea.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    trivial = [
        i
        for i in range(len(window))
        if window[i] == 1 and strides[i] == 1 and tuple(padding[i]) == (0, 0)
    ]
    if len(window) != 4 or any(d != 1 for d in p["base_dilation"]):
        raise NotImplementedError("The ONNX export lowers max pooling of rank-4 tensors only.")
    if {0, 3} <= set(trivial):
        perm, spatial = [0, 3, 1, 2], [1, 2]
    elif {0, 1} <= set(trivial):
        perm, spatial = None, [2, 3]
    else:
        raise NotImplementedError("The ONNX export lowers max pooling over two spatial axes only.")
    x = lo.name(invals[0])
    if perm:
        x = lo.graph.node("Transpose", [x], perm=perm)
    y = lo.graph.node(
        "MaxPool",
        [x],
        kernel_shape=[int(window[a]) for a in spatial],
        strides=[int(strides[a]) for a in spatial],
        pads=[int(padding[a][0]) for a in spatial] + [int(padding[a][1]) for a in spatial],
        dilations=[int(p["window_dilation"][a]) for a in spatial],
    )
    if perm:
        y = lo.graph.node("Transpose", [y], perm=[0, 2, 3, 1])
    return out(lo, y, ea, eb)
