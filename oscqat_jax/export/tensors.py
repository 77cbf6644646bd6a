"""The arrays of a native export common to every kind of model: quantized kernels as
integers with their effective scales and zero points, activation quantizers with their
signedness, the other parameters as float32; and, on loading, the float kernels that the
stored integers give back. Keys are ``/``-joined variable paths (:mod:`oscqat_jax.export.native`).
"""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax import oscillation, quant, weight_files
from oscqat_jax.export import fileformat
from oscqat_jax.nn import collect
from oscqat_jax.nn.config import QuantizerSpec
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS, split_quantizer_param


def join(layer: str, name: str) -> str:
    return f"{layer}/{name}" if layer else name


def split_key(key: str) -> tuple[str, str]:
    """``"a/b/name" -> ("a/b", "name")``."""
    layer, _, name = key.rpartition("/")
    return layer, name


def check_suffix(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path if its suffix names a supported format; one sentence otherwise."""
    return fileformat.check_output_path(path, fileformat.SUFFIXES)


def write(path: pathlib.Path, arrays: Mapping, manifest: dict) -> dict:
    """Writes ``arrays`` with ``manifest`` (its digest added) into ``path``; returns the
    manifest."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    manifest[fileformat.DIGEST_KEY] = fileformat.digest(arrays, manifest)
    weight_files.write(path, arrays, metadata_key=fileformat.MANIFEST_KEY, metadata=manifest)
    return manifest


class Fold(NamedTuple):
    """A quantized conv's BN as ``y * mul + offset`` (float32 ``(out,)`` each), and where the
    export puts ``mul``: ``"scale"`` (the per-channel weight scale) or ``"kernel"`` (a rule's
    ``fold_bn`` has quantized the folded kernel already)."""

    mul: np.ndarray
    offset: np.ndarray
    into: str


class Unfolded(NamedTuple):
    """A folded BN given back as variables (float32): the quantizer's ``weight_scale`` in the
    model's shape and the BN's ``gamma``, ``beta``, running ``mean`` and ``var`` ``(out,)``."""

    weight_scale: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def unfolded_bn(
    folded_bias: np.ndarray, stored_scale: np.ndarray, into: str, scale_shape: tuple, epsilon
) -> Unfolded:
    """The variables of a layer whose file folds its BN (:class:`Fold`), so that the eval
    forward computes the folded layer with the stored integers.

    BN becomes ``y * gamma + beta`` (mean 0, a variance ``v`` with ``v + epsilon == 1``
    exactly in float32) with ``beta = folded_bias``. ``into == "scale"``: the stored scale
    ``s`` (``(out,)``, weight scale times the BN multiplier) is split into a positive
    quantizer scale and ``gamma``: per channel ``|s|`` and ``sign(s)`` for a per-channel
    quantizer (``scale_shape`` with more than one element), ``max |s|`` and ``s / max |s|``
    for a per-tensor one, so the quantizer rounds the kernel back to the stored integers and
    the layer computes the folded product (to float rounding). ``into == "kernel"`` (the
    model quantizes the folded kernel): ``gamma = 1``, so the multiplier is exactly 1 and the
    stored scale stays.
    """
    beta = np.asarray(folded_bias, np.float32)
    gamma = np.ones(beta.shape, np.float32)
    scale = np.asarray(stored_scale, np.float32)
    if into == "scale":
        folded = scale.astype(np.float64).reshape(-1)
        if int(np.prod(scale_shape)) > 1:
            scale = np.where(folded != 0, np.abs(folded), 1.0)
            gamma = np.sign(folded)
        else:
            peak = float(np.abs(folded).max(initial=0.0)) or 1.0
            scale = np.asarray(peak)
            gamma = folded / peak
        scale, gamma = scale.astype(np.float32), gamma.astype(np.float32)
    return Unfolded(
        scale.reshape(scale_shape),
        gamma,
        beta,
        np.zeros(beta.shape, np.float32),
        np.full(beta.shape, _one_minus_epsilon(epsilon), np.float32),
    )


def _one_minus_epsilon(epsilon: float) -> np.float32:
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


def stored_collections(arrays: Mapping) -> tuple[dict, dict]:
    """``(params, {"batch_stats": ..., "quant_stats": ...})`` of a file's arrays, flat and
    ``/``-keyed, the packed integer kernels left out."""
    params, collections = {}, {"batch_stats": {}, QUANT_STATS: {}}
    for key, value in arrays.items():
        collection, rest = key.split("/", 1)
        if collection == "params" and not rest.endswith(f"/{fileformat.KERNEL_INT}"):
            params[rest] = np.asarray(value, np.float32)
        elif collection in collections:
            collections[collection][rest] = value
    return params, collections


def with_kernels(
    path,
    manifest: dict,
    arrays: Mapping,
    params: dict,
    collections: dict,
    *,
    kernel_keys: Mapping[str, str] | None = None,
):
    """Flat loaded variables: ``params`` with the float kernels the stored integers give
    (at ``<layer>/kernel``, or at ``kernel_keys[layer]``: a ConvBN site's conv), the other
    ``collections``, and a fresh oscillation state for the tracked layers."""
    w_ints = {
        layer: fileformat.checked_int(
            path, layer, arrays[f"params/{layer}/{fileformat.KERNEL_INT}"], entry["n_bits"]
        )
        for layer, entry in manifest["weights"].items()
    }
    # One compiled program: eager ops would compile a kernel per layer shape.
    kernels, states = jax.jit(functools.partial(_inference_weights, manifest["weights"]))(
        w_ints, params
    )
    kernel_keys = kernel_keys or {}
    params.update(
        {kernel_keys.get(layer, f"{layer}/kernel"): kernel for layer, kernel in kernels.items()}
    )
    return {"params": params, **collections, OSCILLATION: states}


def nested(variables: Mapping[str, dict], *, keep_empty: bool = True) -> dict:
    """Flat ``/``-keyed collections as nested dicts of arrays (an empty ``oscillation``
    collection dropped unless ``keep_empty``)."""
    return {
        name: jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(tree, sep="/"))
        for name, tree in variables.items()
        if tree or keep_empty or name != OSCILLATION
    }


def weight_arrays(
    weights: Mapping[str, collect.QuantizedWeight],
    plan: Mapping,
    oscillation_state: Mapping,
    folds: Mapping[str, Fold],
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The integers, scales (with folded BN) and zero points of the quantized kernels, the
    folded offsets, and their manifest."""
    arrays, entries = {}, {}
    for layer, qw in weights.items():
        if fileformat.is_packed(qw.n_bits):
            arrays[f"params/{layer}/{fileformat.KERNEL_PACKED}"] = fileformat.pack_nibbles(
                qw.int_weight
            )
        else:
            arrays[f"params/{layer}/{fileformat.KERNEL_INT}"] = qw.int_weight
        arrays[f"params/{layer}/weight_scale"] = qw.scale
        fold = folds.get(layer)
        if fold is not None:
            arrays[f"params/{layer}/{fileformat.FOLDED_BIAS}"] = fold.offset
            if fold.into == "scale":
                scale = np.broadcast_to(
                    np.asarray(qw.scale, np.float32).reshape(-1), fold.mul.shape
                )
                arrays[f"params/{layer}/weight_scale"] = (scale * fold.mul).astype(np.float32)
        if qw.zero_point is not None:
            arrays[f"params/{layer}/weight_zero_point"] = qw.zero_point
        role, layer_quant = plan[layer]
        entries[layer] = {
            **_spec_entry(layer_quant.weight, signed=True),
            "per_channel": layer_quant.weight.per_channel,
            "role": role,
            "kernel_shape": list(qw.int_weight.shape),
            "tracked": layer_quant.track_oscillations,
            "frozen": int(np.sum(oscillation_state.get(f"{layer}/frozen", 0))),
        }
        if fold is not None:
            entries[layer]["bn"] = fold.into
    return arrays, entries


def param_arrays(
    params: Mapping, quantized: set[str], plan: Mapping, quant_stats: Mapping
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every ``params`` leaf but the quantized kernels and their quantizers: activation
    quantizers (effective values, with their signedness) and float parameters; and the
    activation quantizers' manifest."""
    arrays, entries = {}, {}
    for key, value in params.items():
        layer, name = split_key(key)
        q, kind = split_quantizer_param(name) or (None, None)
        if q is not None and (q == "residual" or layer not in plan):
            q = None  # a parameter of the model's own named like a quantizer's
        if q is None:
            if not (layer in quantized and name == "kernel"):
                arrays[f"params/{key}"] = np.asarray(value, np.float32)
        elif q != "weight" and kind == "scale":
            spec = _activation_spec(plan, layer, q)
            arrays.update(_activation_arrays(layer, q, spec, params, quant_stats))
            signed = bool(arrays[f"{QUANT_STATS}/{join(layer, q)}_signed"])
            entries[join(layer, q)] = _spec_entry(spec, signed=signed)
    return arrays, entries


def _quantizer_sites(plan: Mapping) -> list[tuple[str, str, QuantizerSpec]]:
    """``(site path, quantizer name, spec)`` of every enabled quantizer: layers hold
    ``weight`` and ``input``, activation hooks ``output``."""
    return [
        (path, q, getattr(layer_quant, q))
        for path, (_, layer_quant) in plan.items()
        for q in ("weight", "input", "output")
        if getattr(layer_quant, q).enabled
    ]


def _activation_spec(plan: Mapping, layer: str, q: str) -> QuantizerSpec:
    return getattr(plan[layer][1], q)


def _activation_arrays(
    layer: str, q: str, spec: QuantizerSpec, params: Mapping, quant_stats: Mapping
) -> dict[str, np.ndarray]:
    """The effective scale (zero point) and the signedness of activation quantizer ``q``."""
    signed = np.asarray(quant_stats[join(layer, f"{q}_signed")], np.bool_)
    scale = params[join(layer, f"{q}_scale")]
    p = quant.quant_params(
        scale,
        params.get(join(layer, f"{q}_zero_point")),
        x_shape=np.shape(scale),
        n_bits=spec.n_bits,
        signed=signed,
    )
    arrays = {
        f"params/{join(layer, q)}_scale": np.asarray(p.scale, np.float32),
        f"{QUANT_STATS}/{join(layer, q)}_signed": signed,
    }
    if p.zero_point is not None:
        arrays[f"params/{join(layer, q)}_zero_point"] = np.asarray(p.zero_point, np.int32)
    return arrays


def check_calibrated(plan: Mapping, params: Mapping, quant_stats: Mapping) -> None:
    """Every quantizer has its scale, and those with a stored estimator (``mse``,
    ``running_minmax``; ``current_minmax`` keeps none) have seen calibration."""
    estimators = {key.rpartition("/")[0] for key in quant_stats}  # <q>_range/<field> keys
    for layer, q, spec in _quantizer_sites(plan):
        if join(layer, f"{q}_scale") not in params:
            raise ValueError(
                f"The variables have no quantizer scale params/{join(layer, q)}_scale; export "
                "the variables of the quantized model after calibrating it."
            )
        if spec.range_method != "current_minmax" and join(layer, f"{q}_range") not in estimators:
            raise ValueError(
                f"The variables are not calibrated (quant_stats/{join(layer, q)}_range is "
                "missing); calibrate the model (oscqat_jax.nn.calibrate) before exporting."
            )


def _spec_entry(spec: QuantizerSpec, *, signed: bool) -> dict:
    return {"n_bits": spec.n_bits, "signed": signed, "symmetric": spec.symmetric}


def _inference_weights(
    weight_entries: Mapping[str, dict],
    w_ints: Mapping[str, jax.Array],
    params: Mapping[str, jax.Array],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``({layer: float kernel}, {"<layer>/<field>": fresh oscillation state})``: the kernel
    ``scale * (w_int - zero_point)``, whose fake quantization gives back ``w_ints[layer]``
    (a folded ConvBN site's BN multiplies it by exactly 1: :func:`unfolded_bn`)."""
    kernels, states = {}, {}
    for layer, entry in weight_entries.items():
        kernels[layer] = quant.dequantize(
            w_ints[layer],
            params[f"{layer}/weight_scale"],
            params.get(f"{layer}/weight_zero_point"),
            n_bits=entry["n_bits"],
            signed=True,
        )
        if entry["tracked"]:
            state = oscillation.init(w_ints[layer])
            states.update({f"{layer}/{f}": getattr(state, f) for f in state._fields})
    return kernels, states
