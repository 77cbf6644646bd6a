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
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oscqat_jax.export import fileformat, rules_model, tensors
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
        entry = fileformat.to_json("rules", dataclasses.asdict(plan.rule))
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
    records = fileformat.fitting(
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


def export_nnx_model(path, model, variables, input_shape, model_kwargs: dict) -> dict:
    """:func:`export_model` of an NNX model quantized by rules (:mod:`oscqat_jax.export_nnx`)."""
    check_model(model, "export_model")
    if variables is not None or model_kwargs:
        raise ValueError(
            "export_model of an NNX model takes no variables or model arguments: the model "
            "holds its variables; call export_model(path, model=model, input_shape=...)."
        )
    path = tensors.check_suffix(path)
    input_shape = fileformat.check_input_shape(input_shape)
    pieces = export_pieces(model, input_shape)
    tensors.check_calibrated(pieces["plan"], pieces["params"], pieces["quant_stats"])
    return rules_model.write_by_rules(
        path,
        {"kind": NNX_KIND, "name": type(model).__name__},
        rules_json(model),
        {},
        input_shape,
        pieces["plan"],
        pieces["params"],
        pieces["quant_stats"],
        pieces["weights"],
        pieces["oscillation"],
        pieces["batch_stats"],
    )


def load_nnx_model(path: pathlib.Path, model, arrays: Mapping, manifest: dict):
    """Writes a (digest-checked) NNX export into ``model`` after checking that the file is
    one of it: its kind, rules, tensors and bit widths. Returns the model's state."""
    name = manifest["model"].get("name")
    if manifest["model"].get("kind") != NNX_KIND:
        raise ValueError(
            f"{path} holds the Linen model {name}, not an NNX model quantized by rules; pass "
            "the QuantizedModel it was exported from."
        )
    if model is None:
        raise ValueError(
            f"{path} holds the NNX model {name} quantized by rules; pass that model, "
            "quantized with the same rules: load_export(path, model=model)."
        )
    modules = check_model(model, "load_export")
    if manifest.get("rules") != rules_json(model):
        raise ValueError(
            f"{path} was exported with other quantization rules than the model given; pass "
            "a model quantized by the rules it was exported with."
        )
    arrays, packed_layers = fileformat.unpacked_kernels(path, arrays, manifest)
    shapes = stored_shapes(model, manifest["weights"], fileformat.KERNEL_INT)
    fileformat.check_tensors(path, arrays, shapes)
    bits = {
        site: plan.weight.n_bits
        for site, plan in map(
            lambda item: (item[0], nnx_quant.site_plan_of(item[1])), modules.items()
        )
        if plan.weight.enabled
    }
    fileformat.check_bits(path, manifest["weights"], bits, arrays)
    fileformat.check_packing(path, manifest, packed_layers)
    params, collections = tensors.stored_collections(arrays)
    variables = tensors.with_kernels(path, manifest, arrays, params, collections)
    load_into(model, variables)
    return nnx.state(model)
