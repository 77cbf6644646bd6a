"""The native integer export of an NNX model quantized by rules: what it takes from the model
and what it puts back.

The file is the one :mod:`oscqat_jax.export` writes for a Linen model quantized by rules
(manifest ``"kind": "nnx"``): the quantized layers' variables have the Linen names, so the
model's ``nnx.Param``, ``nnx.BatchStat``, ``QuantStats`` and ``Oscillation`` state, flattened
to ``/``-joined paths (``nnx.List`` items by index), are the collections ``params``,
``batch_stats``, ``quant_stats`` and ``oscillation``. The integers are those of an ``eval``
forward, recorded by the shared quantizer state machine (frozen values applied). Loading
writes the stored values back into a model quantized by the same rules; its range
accumulators stay empty but count as calibrated (a later calibration starts them afresh).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oscqat_jax import export_manifest
from oscqat_jax.nn import collect, nnx_quant

NNX_KIND = "nnx"
"""Manifest model kind of an NNX model quantized by rules."""

LOADED = -1
"""``num_batches`` of a loaded model's range accumulators: calibrated, accumulator empty."""


def _flat(tree: Mapping) -> dict[str, tuple[tuple, Any]]:
    """``{"a/0/b": (key path, leaf)}`` of a pure dict (int keys of ``nnx.List`` items kept
    in the key path, written as digits in the string)."""
    out = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, (*path, key))
        else:
            out["/".join(str(k) for k in path)] = (path, node)

    walk(tree, ())
    return out


def _state(model: nnx.Module, kind) -> dict[str, tuple[tuple, Any]]:
    return _flat(nnx.to_pure_dict(nnx.state(model, kind)))


def check_model(model, what: str) -> dict:
    """The quantized modules of ``model``; one sentence when it is not a quantized NNX model."""
    if not isinstance(model, nnx.Module) or not nnx_quant.quantized_modules(model):
        raise ValueError(
            f"{what} takes model=<an NNX model quantized with oscqat_jax.nn.quantize_model>, "
            f"got {type(model).__name__} without quantized layers."
        )
    return nnx_quant.quantized_modules(model)


def rules_json(model: nnx.Module) -> list:
    """The distinct rules that decided the model's sites, in the order they first decide."""
    seen = []
    for plan in map(nnx_quant.site_plan_of, nnx_quant.quantized_modules(model).values()):
        entry = export_manifest.to_json("rules", dataclasses.asdict(plan.rule))
        if entry not in seen:
            seen.append(entry)
    return seen


def export_pieces(model: nnx.Module, input_shape: tuple) -> dict:
    """What :func:`oscqat_jax.export.export_model` writes for ``model``: its plan, flat
    ``params``/``quant_stats``/``oscillation``/``batch_stats`` and the quantized weights of an
    eval forward on one zero image of ``input_shape``. Refuses an uncalibrated model."""
    modules = check_model(model, "export_model")
    for path, module in modules.items():
        missing = nnx_quant._uncalibrated(module)  # noqa: SLF001 - the adapter's own check
        if missing:
            raise ValueError(
                f"The {missing[0]} quantizer of layer {path} has not been calibrated; export "
                "the model after calibrate(model, batches) and training."
            )
    image = jnp.zeros((1, *input_shape), jnp.float32)
    records = export_manifest.fitting(
        input_shape, lambda: nnx_quant.quantized_weight_records(model, image)
    )
    flat = {kind: {k: v for k, (_, v) in _state(model, t).items()} for kind, t in _KINDS.items()}
    return {
        "plan": {
            path: (NNX_KIND, nnx_quant.site_plan_of(module)) for path, module in modules.items()
        },
        "weights": {path: collect.quantized_weight(r) for path, r in records.items()},
        **flat,
    }


_KINDS = {
    "params": nnx.Param,
    "batch_stats": nnx.BatchStat,
    "quant_stats": nnx_quant.QuantStats,
    "oscillation": nnx_quant.Oscillation,
}


def stored_shapes(model: nnx.Module, weights: Mapping[str, dict], kernel_key: str) -> dict:
    """``{file key: shape}`` of what a file of ``model`` holds (quantized kernels as their
    integer arrays ``<layer>/<kernel_key>``, quant_stats only the signedness)."""
    shapes = {}
    for collection in ("params", "batch_stats", "quant_stats"):
        for key, (_, leaf) in _state(model, _KINDS[collection]).items():
            layer, _, name = key.rpartition("/")
            if collection == "params" and name == "kernel" and layer in weights:
                key = f"{layer}/{kernel_key}"
            if collection != "quant_stats" or name.endswith("_signed"):
                shapes[f"{collection}/{key}"] = tuple(np.shape(leaf))
    return shapes


def load_into(model: nnx.Module, variables: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes flat loaded ``variables`` (``params``, ``batch_stats``, ``quant_stats``
    signedness, fresh ``oscillation`` states) into ``model``'s variables; marks every range
    accumulator as loaded and leaves the model in eval."""
    collection_of = {kind: collection for collection, kind in _KINDS.items()}
    for path, module in nnx.iter_modules(model):
        prefix = "/".join(str(p) for p in path)
        for name, variable in vars(module).items():
            collection = collection_of.get(type(variable))
            if collection is None:
                continue
            key = f"{prefix}/{name}" if prefix else name
            value = variable.get_value()
            if collection == "quant_stats" and isinstance(value, Mapping):
                variable.set_value({**value, "num_batches": jnp.asarray(LOADED, jnp.int32)})
            elif key in variables.get(collection, {}):
                dtype = jnp.asarray(value).dtype
                variable.set_value(jnp.asarray(variables[collection][key], dtype))
    nnx_quant.set_mode(model, "eval")
    model.eval()


__all__ = ["LOADED", "NNX_KIND", "check_model", "export_pieces", "load_into", "rules_json"]
