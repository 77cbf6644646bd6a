"""The native export of the package's own models (``oscqat_jax.models``): the model a
manifest names, the tensors its file holds, and BatchNorm folded into the stored per-channel
scales and biases on the way out (format version 4) and unfolded on the way back.

The file layout is :mod:`oscqat_jax.export.native`'s; the arrays common to every kind of
model are :mod:`oscqat_jax.export.tensors`'.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax.export import fileformat, tensors
from oscqat_jax.models import create_model, quant_plan
from oscqat_jax.nn import batchnorm, collect
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS
from oscqat_jax.nn.setups import QuantSetup


def export_package_model(
    path,
    variables: Mapping,
    model_name: str,
    num_classes: int,
    quant_setup,
    input_shape,
    model_kwargs: dict,
) -> dict:
    """Writes the export of one of the package's models (built by ``create_model`` from
    ``model_name``, ``num_classes``, ``quant_setup`` and ``model_kwargs``); returns its
    manifest."""
    path = tensors.check_suffix(path)
    input_shape = fileformat.check_input_shape(input_shape)
    fileformat.check_variables(variables)
    quant_setup = QuantSetup(name=quant_setup) if isinstance(quant_setup, str) else quant_setup
    model = create_model(
        model_name, num_classes=num_classes, quant_setup=quant_setup, **model_kwargs
    )
    plan = fileformat.fitting(input_shape, lambda: quant_plan(model, (1, *input_shape)))
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    tensors.check_calibrated(plan, params, quant_stats)

    image = np.zeros((1, *input_shape), np.float32)
    weights = collect.quantized_weights(model, variables, image, QuantContext.create("eval"))
    oscillation_state = traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/")
    batch_stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    folds = _bn_folds(model, weights, params, batch_stats)
    arrays, weight_entries = tensors.weight_arrays(weights, plan, oscillation_state, folds)
    float_arrays, activation_entries = tensors.param_arrays(params, set(weights), plan, quant_stats)
    dropped = {key for layer in folds for key in _folded_keys(layer)}
    arrays.update({k: v for k, v in float_arrays.items() if k not in dropped})
    for key, value in batch_stats.items():
        if f"batch_stats/{key}" not in dropped:
            arrays[f"batch_stats/{key}"] = np.asarray(value, np.float32)

    manifest = {
        "format": fileformat.FORMAT,
        "format_version": fileformat.FORMAT_VERSION,
        "model": {
            "name": model_name,
            "num_classes": num_classes,
            "options": {k: fileformat.to_json(k, v) for k, v in model_kwargs.items()},
        },
        "quant_setup": fileformat.to_json("quant_setup", dataclasses.asdict(quant_setup)),
        "input_shape": list(input_shape),
        "weights": weight_entries,
        "activations": activation_entries,
    }
    return tensors.write(path, arrays, manifest)


def load_package_model(path: pathlib.Path, arrays: Mapping, manifest: dict):
    """``(model, variables)`` of a (digest-checked) export of one of the package's models,
    after checking every tensor's shape and each kernel's bit width against the model its
    manifest describes."""
    arrays, packed_layers = fileformat.unpacked_kernels(path, arrays, manifest)
    model = _manifest_model(path, manifest)
    shapes, setup_bits = _model_tensors(model, manifest)
    fileformat.check_tensors(path, arrays, _stored_shapes(path, model, shapes, manifest))
    fileformat.check_bits(path, manifest["weights"], setup_bits, arrays)
    fileformat.check_packing(path, manifest, packed_layers)
    params, collections = tensors.stored_collections(arrays)
    _unfold_bn(model, manifest["weights"], shapes, params, collections["batch_stats"])
    return model, tensors.nested(
        tensors.with_kernels(path, model, manifest, arrays, params, collections)
    )


def _manifest_model(path: pathlib.Path, manifest: dict) -> nn.Module:
    """The model a (checked) manifest describes; one sentence if this code builds none."""
    try:
        options = {k: fileformat.from_json(k, v) for k, v in manifest["model"]["options"].items()}
        return create_model(
            manifest["model"]["name"],
            num_classes=manifest["model"]["num_classes"],
            quant_setup=QuantSetup(**manifest["quant_setup"]),
            **options,
        )
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{path}: its manifest describes no model this code builds ({err})."
        ) from None


def _model_tensors(model: nn.Module, manifest: dict) -> tuple[dict[str, tuple], dict[str, int]]:
    """``({file key: shape}, {layer: n_bits})``: every tensor an export of ``model`` holds and
    the bit width of each quantized kernel, from one abstract trace each (nothing compiled)."""
    input_shape = (1, *(int(d) for d in manifest["input_shape"]))
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, QuantContext.create("eval"))
    shapes = {}
    for collection in ("params", "batch_stats", QUANT_STATS):
        for key, leaf in traverse_util.flatten_dict(abstract.get(collection, {}), sep="/").items():
            layer, name = tensors.split_key(key)
            if collection == "params" and name == "kernel" and layer in manifest["weights"]:
                key = tensors.join(layer, fileformat.KERNEL_INT)
            if collection != QUANT_STATS or name.endswith("_signed"):
                shapes[f"{collection}/{key}"] = tuple(leaf.shape)
    plan = quant_plan(model, input_shape)
    bits = {layer: lq.weight.n_bits for layer, (_, lq) in plan.items() if lq.weight.enabled}
    return shapes, bits


def _folded_keys(layer: str) -> tuple[str, ...]:
    """The file keys a BN-folded layer does not store (its BN and its own bias)."""
    return (
        f"params/{layer}/bn/scale",
        f"params/{layer}/bn/bias",
        f"params/{layer}/bias",
        f"batch_stats/{layer}/bn/mean",
        f"batch_stats/{layer}/bn/var",
    )


def _bn_folds(
    model, weights: Mapping, params: Mapping, batch_stats: Mapping
) -> dict[str, tensors.Fold]:
    """``{layer: fold}`` for every quantized layer followed by its own BN (``<layer>/bn``),
    computed as the eval forward computes them (:func:`oscqat_jax.nn.batchnorm.fold`)."""
    layers = [layer for layer in weights if f"{layer}/bn/scale" in params]
    if not layers:
        return {}
    inputs = {
        layer: batchnorm.BNStatistics(
            batch_stats[f"{layer}/bn/mean"],
            batch_stats[f"{layer}/bn/var"],
            params[f"{layer}/bn/scale"],
            params[f"{layer}/bn/bias"],
        )
        for layer in layers
    }
    biases = {
        layer: params.get(f"{layer}/bias", np.zeros(np.shape(inputs[layer].mean), np.float32))
        for layer in layers
    }
    epsilon = model.bn_epsilon
    folded = jax.jit(
        lambda stats, biases: {
            layer: batchnorm.fold(stats[layer], epsilon, biases[layer]) for layer in stats
        }
    )(inputs, biases)
    into = "kernel" if getattr(model, "fold_bn", False) else "scale"
    return {
        layer: tensors.Fold(np.asarray(mul, np.float32), np.asarray(offset, np.float32), into)
        for layer, (mul, offset) in folded.items()
    }


def _stored_shapes(
    path: pathlib.Path, model: nn.Module, shapes: Mapping[str, tuple], manifest: dict
) -> dict:
    """The tensors a file of the manifest's version holds for ``model`` (variable shapes
    ``shapes``): those of the model, except that a BN-folded layer has ``weight_scale``
    ``(out,)`` (``"bn": "scale"``) and ``folded_bias`` ``(out,)`` instead of its BN and bias."""
    stored = dict(shapes)
    expected = "kernel" if getattr(model, "fold_bn", False) else "scale"
    for layer, entry in manifest["weights"].items():
        into = entry.get("bn") if isinstance(entry, dict) else None
        if into is None:
            continue
        bn_key = f"params/{layer}/bn/scale"
        if manifest["format_version"] < fileformat.FOLDED_SINCE or into != expected:
            raise ValueError(
                f"{path}: its manifest folds the BN of {layer} into the {into!r}, but a format "
                f"version {manifest['format_version']} export of its model folds "
                + (
                    "none"
                    if manifest["format_version"] < fileformat.FOLDED_SINCE
                    else f"into the {expected!r}"
                )
                + "; export the model again."
            )
        if bn_key not in shapes:
            raise ValueError(
                f"{path}: its manifest folds the BN of {layer}, which has no BN in the model of "
                "its manifest; export the model again."
            )
        out = shapes[bn_key]
        for key in _folded_keys(layer):
            stored.pop(key, None)
        stored[f"params/{layer}/{fileformat.FOLDED_BIAS}"] = out
        if into == "scale":
            stored[f"params/{layer}/weight_scale"] = out
    return stored


def _one_plus_epsilon_is_one(epsilon: float) -> np.float32:
    """The float32 ``v`` closest to ``1 - epsilon`` with ``v + epsilon == 1`` in float32, so a
    BN with variance ``v`` multiplies by exactly ``gamma``."""
    eps = np.float32(epsilon)
    v = np.float32(1) - eps
    for _ in range(8):
        total = v + eps
        if total == np.float32(1):
            return v
        v = np.nextafter(v, np.float32(0 if total > 1 else 2), dtype=np.float32)
    raise ValueError(f"No float32 variance makes var + {epsilon} exactly 1.")


def _unfold_bn(
    model: nn.Module,
    weight_entries: Mapping[str, dict],
    shapes: Mapping[str, tuple],
    params: dict,
    batch_stats: dict,
) -> None:
    """Turns the folded layers of a (checked) file back into the model's variables, in place.

    BN becomes ``y * gamma + beta`` (mean 0, a variance ``v`` with ``v + eps == 1`` exactly)
    with ``beta = folded_bias``. ``"bn": "scale"``: the folded scale ``s`` is split into a
    positive quantizer scale and ``gamma``: per channel ``|s|`` and ``sign(s)`` for a
    per-channel quantizer, ``max |s|`` and ``s / max |s|`` for a per-tensor one, so the
    quantizer rounds the kernel back to the stored integers and the layer computes the folded
    product (to float rounding). ``"bn": "kernel"`` (``fold_bn``): ``gamma = 1``, so the model
    multiplies the kernel by exactly 1 and quantizes it back to the stored integers.
    """
    var_one = _one_plus_epsilon_is_one(model.bn_epsilon)
    for layer, entry in weight_entries.items():
        into = entry.get("bn")
        if into is None:
            continue
        offset = params.pop(f"{layer}/{fileformat.FOLDED_BIAS}")
        channels = offset.shape
        gamma = np.ones(channels, np.float32)
        if into == "scale":
            folded = params[f"{layer}/weight_scale"].astype(np.float64)
            scale_shape = shapes[f"params/{layer}/weight_scale"]
            if int(np.prod(scale_shape)) > 1:
                scale = np.where(folded != 0, np.abs(folded), 1.0)
                gamma = np.sign(folded)
            else:
                peak = float(np.abs(folded).max(initial=0.0)) or 1.0
                scale = np.asarray(peak)
                gamma = folded / peak
            params[f"{layer}/weight_scale"] = scale.astype(np.float32).reshape(scale_shape)
            gamma = gamma.astype(np.float32)
        params[f"{layer}/bn/scale"] = gamma
        params[f"{layer}/bn/bias"] = offset
        if f"params/{layer}/bias" in shapes:
            params[f"{layer}/bias"] = np.zeros(channels, np.float32)
        batch_stats[f"{layer}/bn/mean"] = np.zeros(channels, np.float32)
        batch_stats[f"{layer}/bn/var"] = np.full(channels, var_one, np.float32)
