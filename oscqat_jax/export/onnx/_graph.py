"""A small builder of ONNX graphs: unique names, initializers (integers at their bit width) and nodes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Integer types of ONNX, narrowest first, with the numpy dtype that numpy_helper packs them from.
INT_TYPES = (
    ("int4", TensorProto.INT4, ml_dtypes.int4, -8, 7),
    ("uint4", TensorProto.UINT4, ml_dtypes.uint4, 0, 15),
    ("int8", TensorProto.INT8, np.int8, -128, 127),
    ("uint8", TensorProto.UINT8, np.uint8, 0, 255),
    ("int16", TensorProto.INT16, np.int16, -(2**15), 2**15 - 1),
    ("uint16", TensorProto.UINT16, np.uint16, 0, 2**16 - 1),
)


def int_type_for(lo: float, hi: float) -> tuple[str, int, type, int, int]:
    """The narrowest ONNX integer type holding the grid ``[lo, hi]``: ``(name, TensorProto
    type, numpy dtype, type min, type max)``; unsigned when ``lo >= 0`` (a 3-bit grid [-4, 3]
    gives int4, [0, 7] uint4, an 8-bit [-128, 127] int8)."""
    for entry in INT_TYPES:
        _, _, _, t_min, t_max = entry
        if (lo >= 0) == (t_min == 0) and t_min <= lo and hi <= t_max:
            return entry
    raise ValueError(
        f"The integer grid [{lo:g}, {hi:g}] fits no ONNX integer type of at most 16 bits."
    )


class Graph:
    """Nodes and initializers of one ONNX graph under construction."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: np.ndarray, hint: str = "const") -> str:
        """A float/bool/int64 initializer holding ``value``; returns its name."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def integers(self, values: np.ndarray, dtype: type, hint: str) -> str:
        """An integer initializer of ``dtype`` (int4/uint4 stored two per byte) from integer-valued
        floats ``values``; returns its name."""
        ints = np.asarray(values)
        if not np.array_equal(ints, np.round(ints)):
            raise ValueError(f"{hint}: the values to store as {dtype} are not integers.")
        name = self.fresh(hint)
        stored = ints.astype(np.int64).astype(dtype)
        self.initializers.append(numpy_helper.from_array(stored, name))
        return name

    def node(self, op: str, inputs: list[str], *, outputs: int = 1, hint=None, **attrs):
        """Appends an ``op`` node; returns its output name (or names when ``outputs > 1``)."""
        names = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, **attrs))
        return names[0] if outputs == 1 else names
