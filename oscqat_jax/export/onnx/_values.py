"""The values a jaxpr variable is bound to while lowering to ONNX (see ``_lowering``)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How a constant came out of ``dequantize_with``: ``scale * (ints - zero_point)``."""

    ints: np.ndarray  # integer-valued floats, the shape of the weight
    scale: np.ndarray  # broadcasts against the weight
    zero_point: np.ndarray | None
    bounds: tuple[float, float]  # the integer grid


@dataclasses.dataclass(eq=False)
class Const:
    """An array known at export: the closed-over variables and what is computed from them alone."""

    value: np.ndarray
    dyn: tuple[bool, ...] = ()  # dimensions that follow the batch (the value repeats along them)
    bounds: tuple[float, float] | None = None  # integer grid of integer-valued constants
    weight: WeightQuant | None = None


@dataclasses.dataclass(eq=False)
class Tensor:
    """An ONNX tensor computed at run time; ``shape`` is that of the batch-N trace."""

    name: str
    shape: tuple[int, ...]
    dyn: tuple[bool, ...]  # dimensions that follow the batch


@dataclasses.dataclass(eq=False)
class QInt(Tensor):
    """The integers of an activation quantizer (a QuantizeLinear output of ``int_dtype``), with
    the scale and zero point (float32 arrays, integer-valued zero point) that dequantize them.

    ``offset``: the stored integers are the quantizer's minus ``offset`` (int8 containers store
    every grid ``[lo, hi]`` as ``[0, hi - lo]`` in uint8, ``offset = lo``; 0 otherwise), so
    their DequantizeLinear takes the zero point ``zero_point - offset``; ``grid_max``: the
    largest stored integer (``hi - lo``)."""

    scale: np.ndarray = None
    zero_point: np.ndarray = None
    int_dtype: type = None
    offset: float = 0.0
    grid_max: float = 255.0


@dataclasses.dataclass(eq=False)
class Dequantized:
    """``scale * (ints - zero_point)`` of an activation quantizer's integers, emitted as a
    DequantizeLinear only when a float operator reads it (int8 containers: a convolution or
    matmul with an integer kernel reads the integers themselves)."""

    ints: QInt
    shape: tuple[int, ...]
    dyn: tuple[bool, ...]


@dataclasses.dataclass(eq=False)
class Affine:
    """``layer(x) * mul + add`` on ``axis`` (the output-channel axis) of a layer with a constant kernel."""

    kind: str  # "conv" or "matmul"
    x: str  # the input, already in the layer's layout (NCHW for convs)
    kernel: Const  # in the jaxpr's layout (HWIO for the package's convs)
    kernel_perm: tuple[int, ...]  # to ONNX's layout: OIHW for Conv, (in, out) for MatMul
    attrs: dict
    out_perm: tuple[int, ...] | None  # NCHW -> the jaxpr's output layout (convs)
    shape: tuple[int, ...]
    dyn: tuple[bool, ...]
    axis: int
    mul: np.ndarray | None = None  # float64 (C,)
    add: np.ndarray | None = None
    # int8 containers: the layer reads the integers of this activation quantizer (``x`` is
    # then the uint8 integers, in the layer's layout) ...
    qx: QInt | None = None
    # ... and its output is clipped to [low, high] after the multiplier and offset
    # (ReLU/ReLU6 between the layer and the next quantizer).
    clamp: tuple[float, float] | None = None
    # The layer call this value derives from: shared by every Affine that folding or clipping
    # makes of it (``dataclasses.replace`` copies it), so the layer is emitted once.
    origin: object = dataclasses.field(default_factory=object, repr=False)


def is_const(v) -> bool:
    return isinstance(v, Const)


def dyn_of(var_a, var_b) -> tuple[bool, ...]:
    return tuple(a != b for a, b in zip(var_a.aval.shape, var_b.aval.shape, strict=True))


def unbatched(c: Const) -> np.ndarray:
    """``c``'s value with its batch-following dimensions cut to 1 (it must repeat along them)."""
    value = c.value
    for axis, dyn in enumerate(c.dyn):
        if dyn:
            first = np.take(value, [0], axis=axis)
            if not np.array_equal(np.broadcast_to(first, value.shape), value):
                raise ValueError(
                    "A constant of the exported model differs along the batch dimension; the "
                    "ONNX export needs a forward that treats every image of the batch alike."
                )
            value = first
    return value
