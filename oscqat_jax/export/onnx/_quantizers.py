"""The quantizers of the ONNX lowering (:mod:`._lowering`): a ``to_int_with`` /
``dequantize_with`` scope of the traced forward whose input is known at export is evaluated
(a weight: its integers and scale annotate the constant); one that reads a run-time tensor
becomes QuantizeLinear (with a clip where the grid is narrower than its integer type) and,
where a float operator reads the integers, DequantizeLinear. With int8 containers the integers
may instead feed an integer layer directly (:mod:`._integer`).
"""

from __future__ import annotations

import numpy as np
from jax.extend.core import Literal

from oscqat_jax import quant
from oscqat_jax.export.onnx import _integer
from oscqat_jax.export.onnx._graph import int_type_for
from oscqat_jax.export.onnx._values import (
    Affine,
    Dequantized,
    QInt,
    WeightQuant,
    dyn_of,
    is_const,
)


class QuantizerLowering:
    """The quantizer part of :class:`~._lowering.Lowering` (which provides ``graph``,
    ``read``, ``name`` and ``_eqn``)."""

    def _quantizer(self, scope: str, group, env, later, outvars) -> None:
        eqns = [ea for ea, _ in group]
        inner = {v for e in eqns for v in e.outvars}
        out = eqns[-1].outvars[0]
        leaked = [
            v
            for e in later
            for v in e.invars
            if not isinstance(v, Literal) and v in inner and v is not out
        ]
        leaked += [v for v in outvars if not isinstance(v, Literal) and v in inner and v is not out]
        if leaked:
            raise ValueError(
                f"A {scope} scope exposes intermediate values; the ONNX export expects "
                "oscqat_jax.quant.to_int_with / dequantize_with to return their only result."
            )
        outside = [v for e in eqns for v in e.invars if isinstance(v, Literal) or v not in inner]
        if all(is_const(self.read(env, v)) for v in outside):
            for ea, eb in group:
                self._eqn(ea, eb, env)
            self._annotate(scope, eqns, env)
            return
        if scope == quant.TO_INT_SCOPE:
            env[out] = self._quantize_activation(eqns, env, group[-1][1].outvars[0])
        else:
            env[out] = self._dequantize_activation(eqns, env, group)

    def _grid_parts(self, eqns, env) -> dict:
        """Scale, zero point and grid bounds of a ``to_int_with`` scope, read off its equations."""
        by_prim: dict = {}
        for e in eqns:
            by_prim.setdefault(e.primitive.name, []).append(e)
        try:
            (div,) = by_prim["div"]
            (ge,) = by_prim["ge"]
            (le,) = by_prim["le"]
        except (KeyError, ValueError):
            raise ValueError(
                "The ONNX export did not recognise a quantizer: the to_int_with scope should "
                f"hold one div, ge and le, found {[e.primitive.name for e in eqns]}."
            ) from None
        adds = by_prim.get("add", [])
        return dict(
            x=self.read(env, div.invars[0]),
            scale=self.read(env, div.invars[1]),
            zero_point=self.read(env, adds[0].invars[1]) if adds else None,
            lo=self.read(env, ge.invars[1]),
            hi=self.read(env, le.invars[1]),
        )

    def _annotate(self, scope: str, eqns, env) -> None:
        """Records the grid of a folded ``to_int_with`` or the integers of a folded
        ``dequantize_with`` on the constant it produced."""
        out = env[eqns[-1].outvars[0]]
        if scope == quant.TO_INT_SCOPE:
            parts = self._grid_parts(eqns, env)
            lo, hi = parts["lo"].value, parts["hi"].value
            if lo.size == 1 and hi.size == 1:
                out.bounds = (float(lo.reshape(())), float(hi.reshape(())))
            return
        sub = [e for e in eqns if e.primitive.name == "sub"]
        mul = [e for e in eqns if e.primitive.name == "mul"]
        if len(mul) != 1 or len(sub) > 1:
            return
        scale = self.read(env, mul[0].invars[0])
        ints = self.read(env, sub[0].invars[0] if sub else mul[0].invars[1])
        zero_point = self.read(env, sub[0].invars[1]).value if sub else None
        values = ints.value
        bounds = ints.bounds or (float(values.min(initial=0)), float(values.max(initial=0)))
        out.weight = WeightQuant(values, scale.value, zero_point, bounds)

    def _quantize_activation(self, eqns, env, out_b) -> QInt:
        """Max and Min (when the grid is narrower than its integer type), then QuantizeLinear."""
        parts = self._grid_parts(eqns, env)
        x = parts["x"]
        for key in ("scale", "zero_point", "lo", "hi"):
            if parts[key] is not None and not is_const(parts[key]):
                raise ValueError(
                    f"An activation quantizer's {key} is computed at run time; the ONNX export "
                    "needs quantizer parameters that are constants of the exported model."
                )
        lo, hi = (float(np.asarray(parts[k].value).reshape(())) for k in ("lo", "hi"))
        scale = parts["scale"].value.astype(np.float32)
        zp = np.zeros((), np.float32) if parts["zero_point"] is None else parts["zero_point"].value
        if self.integer_layers:
            return self._quantize_activation_uint8(x, scale, zp, lo, hi, eqns, out_b)
        scale_1d, zp_1d, axis = _per_axis(scale, zp, len(eqns[-1].outvars[0].aval.shape))
        type_name, _, dtype, t_min, t_max = int_type_for(lo, hi)
        x_name = self.name(x)
        if (lo, hi) != (t_min, t_max):
            # Clipping x to the grid's end points (s * (bound - zp), computed as the
            # dequantization computes them) rounds to exactly those bounds.
            low = (np.float32(lo) - zp.astype(np.float32)) * scale
            high = (np.float32(hi) - zp.astype(np.float32)) * scale
            # Max and Min rather than Clip: ONNX Runtime 1.32's Clip+QuantizeLinear fusion
            # rejects int4/uint4 zero points and fails to load the model.
            x_name = self.graph.node("Max", [x_name, self.graph.constant(_low_high(low, axis))])
            x_name = self.graph.node("Min", [x_name, self.graph.constant(_low_high(high, axis))])
        scale_name = self.graph.constant(scale_1d, "act_scale")
        zp_name = self.graph.integers(zp_1d, dtype, "act_zero_point")
        attrs = {} if axis is None else {"axis": axis}
        q = self.graph.node(
            "QuantizeLinear", [x_name, scale_name, zp_name], hint=f"q_{type_name}", **attrs
        )
        shape = tuple(eqns[-1].outvars[0].aval.shape)
        return QInt(
            q,
            shape,
            dyn_of(eqns[-1].outvars[0], out_b),
            scale=scale,
            zero_point=zp,
            int_dtype=dtype,
        )

    def _quantize_activation_uint8(self, x, scale, zp, lo, hi, eqns, out_b) -> QInt:
        """int8 containers: the grid ``[lo, hi]`` stored as ``q - lo`` in uint8, by
        QuantizeLinear (zero point ``zp - lo``, saturating at 0) and a Clip at ``hi - lo``;
        from the layer's ``QLinearConv`` directly when ``x`` is a convolution of quantized
        activations (after BN and ReLU/ReLU6)."""
        g = self.graph
        outvar = eqns[-1].outvars[0]
        shape, dyn = tuple(outvar.aval.shape), dyn_of(outvar, out_b)
        top = hi - lo
        if top > 255 or lo > zp.min() or zp.max() > hi:
            raise ValueError(
                f"An activation grid [{lo:g}, {hi:g}] with zero point {zp} does not fit a uint8 "
                "container; export it with container='int4'."
            )
        fused = None
        if (
            isinstance(x, Affine)
            and x.qx is not None
            and x.kind == "conv"
            and scale.size == 1
            and zp.size == 1
        ):
            fused = self._qlinear_conv(x, float(scale.reshape(())), float(zp.reshape(())), lo, top)
        if fused is not None:
            name, low, high = fused
        else:
            scale_1d, zp_1d, axis = _per_axis(scale, zp - np.float32(lo), len(shape))
            attrs = {} if axis is None else {"axis": axis}
            name = g.node(
                "QuantizeLinear",
                [
                    self.name(x),
                    g.constant(scale_1d, "act_scale"),
                    g.integers(zp_1d, np.uint8, "act_zero_point"),
                ],
                hint="q_uint8",
                **attrs,
            )
            low, high = 0, int(top)
        if (low, high) != (0, 255):
            name = g.node(
                "Clip",
                [
                    name,
                    g.integers(np.asarray(low), np.uint8, "clip_low"),
                    g.integers(np.asarray(high), np.uint8, "clip_high"),
                ],
                hint="grid_clip",
            )
        return QInt(
            name,
            shape,
            dyn,
            scale=scale,
            zero_point=zp,
            int_dtype=np.uint8,
            offset=lo,
            grid_max=top,
        )

    def _qlinear_conv(self, a: Affine, scale: float, zp: float, lo: float, top: float):
        """``(NHWC uint8 name, clip low, clip high)`` of ``a`` as a QLinearConv onto the grid of
        the quantizer it feeds; None when its kernel or bias does not fit."""
        kernel = _integer.integer_kernel(a, a.qx.grid_max, scalar_of(a.qx.scale))
        if kernel is None:
            return None
        name = _integer.emit_qlinear_conv(self.graph, a, kernel, scale, zp - lo)
        if name is None:
            return None
        if a.out_perm is not None and a.out_perm != tuple(range(len(a.out_perm))):
            name = self.graph.node("Transpose", [name], perm=list(a.out_perm))
        low, high = _integer.clip_bounds(a.clamp, scale, zp, lo, top)
        return name, low, high

    def _emit_dequantize(self, ints: QInt) -> str:
        scale_1d, zp_1d, axis = _per_axis(
            ints.scale,
            np.asarray(ints.zero_point, np.float32) - np.float32(ints.offset),
            len(ints.shape),
        )
        attrs = {} if axis is None else {"axis": axis}
        return self.graph.node(
            "DequantizeLinear",
            [
                ints.name,
                self.graph.constant(scale_1d, "act_scale"),
                self.graph.integers(zp_1d, ints.int_dtype, "act_zero_point"),
            ],
            hint="dq",
            **attrs,
        )

    def _dequantize_activation(self, eqns, env, group):
        """DequantizeLinear of a quantizer's integers; plain arithmetic for anything else."""
        sub = [e for e in eqns if e.primitive.name == "sub"]
        mul = [e for e in eqns if e.primitive.name == "mul"]
        if len(mul) == 1 and len(sub) <= 1:
            ints = self.read(env, sub[0].invars[0] if sub else mul[0].invars[1])
            scale = self.read(env, mul[0].invars[0])
            zp = self.read(env, sub[0].invars[1]) if sub else None
            zp_value = np.zeros((), np.float32) if zp is None else getattr(zp, "value", None)
            if (
                isinstance(ints, QInt)
                and is_const(scale)
                and zp_value is not None
                and np.array_equal(scale.value, ints.scale)
                and np.array_equal(zp_value, ints.zero_point)
            ):
                if self.integer_layers:
                    out_a, out_b = eqns[-1].outvars[0], group[-1][1].outvars[0]
                    return Dequantized(ints, tuple(out_a.aval.shape), dyn_of(out_a, out_b))
                scale_1d, zp_1d, axis = _per_axis(ints.scale, ints.zero_point, len(ints.shape))
                attrs = {} if axis is None else {"axis": axis}
                name = self.graph.node(
                    "DequantizeLinear",
                    [
                        ints.name,
                        self.graph.constant(scale_1d, "act_scale"),
                        self.graph.integers(zp_1d, ints.int_dtype, "act_zero_point"),
                    ],
                    hint="dq",
                    **attrs,
                )
                return self.tensor(name, eqns[-1].outvars[0], group[-1][1].outvars[0])
        for ea, eb in group:
            self._eqn(ea, eb, env)
        return env[eqns[-1].outvars[0]]


def scalar_of(value) -> float:
    return float(np.asarray(value).reshape(()))


def _per_axis(scale, zp, rank: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A quantizer's scale and zero point as ONNX wants them: scalars, or 1-D along one axis."""
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp)
    if scale.size == 1 and zp.size == 1:
        return scale.reshape(()), zp.reshape(()), None
    full = np.broadcast_shapes(scale.shape, zp.shape)
    axes = [i for i, n in enumerate(full) if n > 1]
    if len(axes) != 1:
        raise ValueError(
            f"A quantizer scale of shape {scale.shape} varies along more than one axis."
        )
    axis = axes[0] + rank - len(full)
    return np.broadcast_to(scale, full).reshape(-1), np.broadcast_to(zp, full).reshape(-1), axis


def _low_high(bound: np.ndarray, axis: int | None) -> np.ndarray:
    """A grid end point for Max/Min against the activation: scalar, or along ``axis``."""
    bound = np.asarray(bound, np.float32)
    return bound.reshape(()) if axis is None else bound
