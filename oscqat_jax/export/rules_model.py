"""The native export of a Linen model quantized by rules (``oscqat_jax.nn.quantize_model``):
every site the rules quantize stored as :mod:`oscqat_jax.export.tensors` stores it, BatchNorm
left unfolded (it is the user's layer, wherever the model applies it), and the manifest's
``"kind": "rules"`` with the rules and the model's keyword arguments of the traced call, so
that loading can check a file against the model it is given (:mod:`oscqat_jax.export.native`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.export import fileformat, tensors
from oscqat_jax.nn import collect
from oscqat_jax.nn.intercept import QuantizedModel
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS


def _rules_json(qmodel: QuantizedModel) -> list:
    return [fileformat.to_json("rules", dataclasses.asdict(rule)) for rule in qmodel.rules]


def _check_rules_model(model, what: str) -> None:
    if not isinstance(model, QuantizedModel):
        raise ValueError(
            f"{what} takes model=<a QuantizedModel from oscqat_jax.nn.quantize_model>, got "
            f"{type(model).__name__}."
        )


def export_rules_model(
    path, qmodel: QuantizedModel, variables: Mapping, input_shape, call_kwargs: dict
) -> dict:
    """:func:`export_model` of a model quantized by rules (module docstring)."""
    _check_rules_model(qmodel, "export_model")
    path = tensors.check_suffix(path)
    input_shape = fileformat.check_input_shape(input_shape)
    fileformat.check_variables(variables)
    image = np.zeros((1, *input_shape), np.float32)
    x = jax.ShapeDtypeStruct(image.shape, jnp.float32)
    fileformat.fitting(
        input_shape,
        lambda: jax.eval_shape(lambda v, x: qmodel.model.apply(v, x, **call_kwargs), variables, x),
    )
    plan = {
        site: (fileformat.RULES_KIND, lq) for site, lq in qmodel.plan(image, **call_kwargs).items()
    }
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    tensors.check_calibrated(plan, params, quant_stats)
    weights = collect.quantized_weights(qmodel, variables, image, **call_kwargs)
    return write_by_rules(
        path,
        {"kind": fileformat.RULES_KIND, "name": type(qmodel.model).__name__},
        _rules_json(qmodel),
        {k: fileformat.to_json(k, v) for k, v in call_kwargs.items()},
        input_shape,
        plan,
        params,
        quant_stats,
        weights,
        traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/"),
        traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/"),
    )


def write_by_rules(
    path,
    model_entry: dict,
    rules_json: list,
    call_kwargs: dict,
    input_shape,
    plan: Mapping,
    params: Mapping,
    quant_stats: Mapping,
    weights: Mapping,
    oscillation_state: Mapping,
    batch_stats: Mapping,
) -> dict:
    """Writes the file of a model quantized by rules (Linen or NNX; flat ``/``-keyed
    collections, ``plan`` as ``{site: (kind, SitePlan)}``); returns its manifest."""
    arrays, weight_entries = tensors.weight_arrays(weights, plan, oscillation_state, {})
    float_arrays, activation_entries = tensors.param_arrays(params, set(weights), plan, quant_stats)
    arrays.update(float_arrays)
    for key, value in batch_stats.items():
        arrays[f"batch_stats/{key}"] = np.asarray(value, np.float32)
    manifest = {
        "format": fileformat.FORMAT,
        "format_version": fileformat.FORMAT_VERSION,
        "model": {**model_entry, "num_classes": None, "options": {}},
        "rules": rules_json,
        "call_kwargs": call_kwargs,
        "quant_setup": None,
        "input_shape": list(input_shape),
        "weights": weight_entries,
        "activations": activation_entries,
    }
    return tensors.write(path, arrays, manifest)


def load_rules_model(path: pathlib.Path, qmodel, arrays: Mapping, manifest: dict) -> dict:
    """The variables of a (digest-checked) rules export for ``qmodel``, after checking that
    the file is one of ``qmodel``: its kind, rules, tensors and bit widths."""
    name = manifest["model"].get("name")
    if manifest["model"].get("kind") != fileformat.RULES_KIND:
        raise ValueError(
            f"{path} holds the package's model {name}, not a model quantized by rules; call "
            "load_export(path) without model."
        )
    if qmodel is None:
        raise ValueError(
            f"{path} holds the model {name} quantized by rules; pass that QuantizedModel: "
            "load_export(path, model=qmodel)."
        )
    _check_rules_model(qmodel, "load_export")
    if manifest.get("rules") != _rules_json(qmodel):
        raise ValueError(
            f"{path} was exported with other quantization rules than the QuantizedModel given; "
            "pass the model it was exported from."
        )
    call_kwargs = {
        k: fileformat.from_json(k, v) for k, v in manifest.get("call_kwargs", {}).items()
    }
    arrays, packed_layers = fileformat.unpacked_kernels(path, arrays, manifest)
    x = jax.ShapeDtypeStruct((1, *(int(d) for d in manifest["input_shape"])), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, **call_kwargs), jax.random.key(0), x)
    shapes = {}
    for collection in ("params", "batch_stats", QUANT_STATS):
        for key, leaf in traverse_util.flatten_dict(abstract.get(collection, {}), sep="/").items():
            layer, leaf_name = tensors.split_key(key)
            if collection == "params" and leaf_name == "kernel" and layer in manifest["weights"]:
                key = tensors.join(layer, fileformat.KERNEL_INT)
            if collection != QUANT_STATS or leaf_name.endswith("_signed"):
                shapes[f"{collection}/{key}"] = tuple(leaf.shape)
    fileformat.check_tensors(path, arrays, shapes)
    plan = qmodel.plan(x, **call_kwargs)
    bits = {site: lq.weight.n_bits for site, lq in plan.items() if lq.weight.enabled}
    fileformat.check_bits(path, manifest["weights"], bits, arrays)
    fileformat.check_packing(path, manifest, packed_layers)
    params, collections = tensors.stored_collections(arrays)
    variables = tensors.with_kernels(path, qmodel, manifest, arrays, params, collections)
    # The file holds trained scales, not range accumulators: mark every quantizer as
    # calibrated (a counter without an accumulator, which a later calibration restarts).
    for site, lq in plan.items():
        for q in ("weight", "input", "output"):
            if getattr(lq, q).enabled:
                variables[QUANT_STATS][f"{site}/{q}_range"] = {"num_batches": np.int32(1)}
    return tensors.nested(variables, keep_empty=False)
