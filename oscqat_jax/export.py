"""Integer export of a quantized model, and loading it back as a model plus variables.

:func:`export_model` writes one file holding what quantized inference needs and nothing else
(no latent float weights, range accumulators or tracking state); :func:`load_export` rebuilds
the model from the file's manifest and variables whose quantized kernels are dequantized from
the stored integers, so the usual eval forward
``model.apply(variables, x, QuantContext.create("eval"))`` runs on the exported integers.

File layout (format version 4), ``.safetensors`` or ``.npz`` (compressed) by suffix; keys
follow the model's variable tree, ``<layer>`` being a ``/``-joined module path:

- ``params/<layer>/kernel_packed``: the kernel of a quantized layer of at most 4 bits as
  integers packed two per byte (:func:`oscqat_jax.export_manifest.pack_nibbles`: uint8
  ``(ceil(size / 2),)``, the C-order kernel in 4-bit two's complement, low nibble first);
  the manifest's ``kernel_shape`` gives its shape back.
- ``params/<layer>/kernel_int``: the kernel of a wider quantized layer as integers, int8
  (int16 above 8 bits). Kernels are HWIO ``(kh, kw, in // groups, out)`` or ``(in, out)``;
  frozen weights hold their frozen integer. With ``fold_bn`` these are the integers of the
  BN-folded kernel.
- ``params/<layer>/weight_scale``: float32, ``()`` or ``(1, ..., 1, out)`` per channel;
  ``params/<layer>/weight_zero_point``: int32 of the same shape (asymmetric weights only).
- BatchNorm of a quantized conv is folded (version 4): with ``mul = gamma / sqrt(var + eps)``
  per output channel, ``params/<layer>/weight_scale`` is float32 ``(out,)``, the weight scale
  times ``mul`` (of either sign), and ``params/<layer>/folded_bias`` float32 ``(out,)`` is
  ``beta + (bias - mean) * mul``; the layer computes
  ``conv(x, weight_scale * (kernel_int - zero_point)) + folded_bias`` per channel, with the
  trained integers. A model built with
  ``fold_bn`` already quantizes the folded kernel: its scale keeps the quantizer's shape and
  only ``folded_bias`` replaces BN. The manifest marks such layers (``"bn": "scale"`` or
  ``"bn": "kernel"``); the BN parameters, statistics and the conv's own bias are not stored.
- ``params/<site>/<q>_scale`` and ``<q>_zero_point`` (``q`` = ``input``, ``output`` or
  ``residual``): activation quantizers, float32 scale and int32 zero point (asymmetric only);
  ``quant_stats/<site>/<q>_signed``: bool, the grid's signedness learnt at calibration.
- every other ``params`` leaf as float32: float kernels, biases, the BatchNorm ``bn/scale``
  and ``bn/bias`` of float layers; ``batch_stats/<layer>/bn/{mean, var}``: their running
  statistics.

Scales and zero points are the effective ones the forward uses (``max(s, 1e-8)``; zero point
``clip(round(z), int_min, int_max)``), so ``scale * (kernel_int - zero_point)`` is the kernel
the fake-quantized forward convolves with.

The manifest is JSON, stored inside the file: the safetensors metadata entry
``oscqat_jax_export``, or the 0-d string array of that name in the ``.npz``. It holds the
format name and version, the model (registry name, ``num_classes`` and the other
``create_model`` options), the quant setup, the traced input shape ``(H, W, C)``, and

- ``weights``: per quantized layer its ``n_bits``, ``signed``, ``symmetric``, ``per_channel``,
  ``role`` (see ``oscqat_jax.nn.setups``), ``kernel_shape``, ``tracked`` (oscillation
  tracking) and ``frozen`` (how many of its weights are frozen);
- ``activations``: per activation quantizer ``<site>/<q>`` its ``n_bits``, ``signed`` and
  ``symmetric``;
- ``sha256``: the digest of the rest of the manifest and every tensor
  (:mod:`oscqat_jax.export_manifest`), which the loader verifies before it checks each
  tensor's shape and each kernel's bit width against the model the manifest describes.
  The digest is of the tensors as stored (packed), so a changed nibble is noticed too.

:func:`load_export` also reads version 3 (BN stored unfolded) and version 2 (version 3 with
every kernel as ``kernel_int``); other versions are refused with one sentence naming the
version.

**Models quantized by rules** (``oscqat_jax.nn.quantize_model``, a user's own Linen model):
``export_model(path, variables, model=qmodel, input_shape=..., **model_kwargs)`` writes the
same layout (format version 4) for every site the rules quantize: packed or int8 kernels with
their effective scales and zero points, activation quantizers with their signedness, every
other ``params`` leaf and the ``batch_stats`` as float32 (BatchNorm is not folded: it is the
user's layer, wherever the model applies it). The manifest's ``model`` entry has
``"kind": "rules"`` and the model class's name, ``rules`` lists the quantization rules and
``call_kwargs`` the model's keyword arguments of the traced call (e.g. ``train: false``).
``load_export(path, model=qmodel)`` checks the file against that model (the same rules, every
tensor of its variables at its shape, the bit widths of its plan) and returns the model and
variables whose ``eval`` forward computes what the exported one computed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from oscqat_jax import export_manifest, export_nnx, oscillation, quant, weight_files
from oscqat_jax.models import create_model, quant_plan
from oscqat_jax.nn import batchnorm, collect, nnx_quant
from oscqat_jax.nn.config import QuantContext, QuantizerSpec
from oscqat_jax.nn.intercept import QuantizedModel
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS, split_quantizer_param
from oscqat_jax.nn.setups import QuantSetup

FORMAT = "oscqat_jax.export"
RULES_KIND = "rules"  # manifest model kind of a model quantized by rules
# 2: the manifest holds the sha256 of the file's content; 3: packed kernels; 4: BN folded.
FORMAT_VERSION = 4
READ_VERSIONS = (2, 3, 4)  # 3 is 4 with BN unfolded, 2 is 3 without packing
FOLDED_SINCE = 4
FOLDED_BIAS = "folded_bias"
MANIFEST_KEY = "oscqat_jax_export"
SUFFIXES = (".safetensors", ".npz")
KERNEL_INT = export_manifest.KERNEL_INT
KERNEL_PACKED = export_manifest.KERNEL_PACKED
_RESIDUAL_ROLES = ("residual", "head_residual")


def export_model(
    path: str | os.PathLike,
    variables: Mapping[str, Any] | None = None,
    *,
    model: QuantizedModel | nnx.Module | None = None,
    model_name: str | None = None,
    num_classes: int | None = None,
    quant_setup: QuantSetup | str | None = None,
    input_shape: Sequence[int],
    **model_kwargs,
) -> dict:
    """Writes the integer export of a calibrated (and usually trained) quantized model.

    Args:
      path: the file to write, ending in ``.safetensors`` or ``.npz``.
      variables: the model's variables: ``params``, ``batch_stats``, ``quant_stats`` and
        ``oscillation`` (its frozen weights are exported at their frozen integers).
      model: a ``QuantizedModel`` (``oscqat_jax.nn.quantize_model``); then ``model_kwargs``
        are the model's own keyword arguments for inference (e.g. ``train=False``). Or an
        NNX model quantized by ``quantize_model`` (its variables are its own: pass none).
      model_name, num_classes, quant_setup, **model_kwargs: without ``model``, the
        arguments of :func:`oscqat_jax.models.create_model` that build one of the package's
        models (e.g. ``width_multiplier``, ``fold_bn``, ``block_setting``); they go into
        the manifest.
      input_shape: ``(H, W, C)`` of one image; one zero image of this shape is pushed through
        the eval forward to read the integers.

    Returns:
      The manifest written into the file.
    """
    if isinstance(model, nnx.Module):
        return _export_nnx_model(path, model, variables, input_shape, model_kwargs)
    if model is not None:
        return _export_rules_model(path, model, variables, input_shape, model_kwargs)
    if model_name is None or num_classes is None or quant_setup is None:
        raise ValueError(
            "export_model needs model=<a QuantizedModel>, or the model_name, num_classes and "
            "quant_setup of one of the package's models."
        )
    path = check_suffix(path)
    input_shape = export_manifest.check_input_shape(input_shape)
    export_manifest.check_variables(variables)
    quant_setup = QuantSetup(name=quant_setup) if isinstance(quant_setup, str) else quant_setup
    model = create_model(
        model_name, num_classes=num_classes, quant_setup=quant_setup, **model_kwargs
    )
    plan = export_manifest.fitting(input_shape, lambda: quant_plan(model, (1, *input_shape)))
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    _check_calibrated(plan, params, quant_stats)

    image = np.zeros((1, *input_shape), np.float32)
    weights = collect.quantized_weights(model, variables, image, QuantContext.create("eval"))
    oscillation_state = traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/")
    batch_stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
    folds = _bn_folds(model, weights, params, batch_stats)
    arrays, weight_entries = _weight_arrays(weights, plan, oscillation_state, folds)
    float_arrays, activation_entries = _param_arrays(params, set(weights), plan, quant_stats)
    dropped = {key for layer in folds for key in _folded_keys(layer)}
    arrays.update({k: v for k, v in float_arrays.items() if k not in dropped})
    for key, value in batch_stats.items():
        if f"batch_stats/{key}" not in dropped:
            arrays[f"batch_stats/{key}"] = np.asarray(value, np.float32)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": model_name,
            "num_classes": num_classes,
            "options": {k: export_manifest.to_json(k, v) for k, v in model_kwargs.items()},
        },
        "quant_setup": export_manifest.to_json("quant_setup", dataclasses.asdict(quant_setup)),
        "input_shape": list(input_shape),
        "weights": weight_entries,
        "activations": activation_entries,
    }
    return _write(path, arrays, manifest)


def _write(path: pathlib.Path, arrays: Mapping, manifest: dict) -> dict:
    """Writes ``arrays`` with ``manifest`` (its digest added) into ``path``; returns the
    manifest."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    manifest[export_manifest.DIGEST_KEY] = export_manifest.digest(arrays, manifest)
    weight_files.write(path, arrays, metadata_key=MANIFEST_KEY, metadata=manifest)
    return manifest


def load_export(
    path: str | os.PathLike, model: QuantizedModel | None = None
) -> tuple[nn.Module | QuantizedModel, dict]:
    """The model described by an export's manifest and variables computed from its integers.

    Each quantized kernel becomes ``scale * (kernel_int - zero_point)`` (with ``fold_bn``,
    divided by the BN factor ``gamma / sqrt(var + eps)`` the model multiplies it by again).
    Fake-quantizing a value that already lies on the grid is idempotent: ``round(kernel / s)``
    gives back ``kernel_int`` exactly (the division is off by at most an ulp, far from a
    rounding threshold), so the eval forward of the returned variables quantizes to the
    exported integers and computes what the exported model's eval forward computed, bit for
    bit without ``fold_bn`` and to float rounding with it. Tracked layers get a fresh
    ``oscillation`` state (nothing frozen: the frozen values are already in the integers).
    Range accumulators are not part of an export, so these variables count as uncalibrated
    for :func:`export_model`; the file already is their export.

    A file exported from a model quantized by rules needs that model: ``model=qmodel``
    (module docstring); the file is checked against it and the variables are built the same
    way, for ``qmodel.apply(variables, x, **call_kwargs)``.

    Returns:
      ``(model, variables)`` with collections ``params``, ``batch_stats``, ``quant_stats`` and
      ``oscillation``, ready for ``model.apply(variables, x, QuantContext.create("eval"))``
      (``(qmodel, variables)`` for a rules model).
    """
    path = check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"Export file {path} does not exist.")
    try:
        arrays, manifest = weight_files.read(path, metadata_key=MANIFEST_KEY)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its manifest is not valid JSON ({err}).") from None
    export_manifest.check_manifest(path, manifest, arrays, name=FORMAT, versions=READ_VERSIONS)
    kind = manifest["model"].get("kind")
    if kind == export_nnx.NNX_KIND or isinstance(model, nnx.Module):
        return model, _load_nnx_model(path, model, arrays, manifest)
    rules_file = kind == RULES_KIND
    if model is not None or rules_file:
        return model, _load_rules_model(path, model, arrays, manifest)
    arrays, packed_layers = export_manifest.unpacked_kernels(path, arrays, manifest)
    model = _manifest_model(path, manifest)
    shapes, setup_bits = _model_tensors(model, manifest)
    export_manifest.check_tensors(path, arrays, _stored_shapes(path, model, shapes, manifest))
    export_manifest.check_bits(path, manifest["weights"], setup_bits, arrays)
    export_manifest.check_packing(path, manifest, packed_layers)
    params, collections = _stored_collections(arrays)
    _unfold_bn(model, manifest["weights"], shapes, params, collections["batch_stats"])
    return model, _nested(_with_kernels(path, model, manifest, arrays, params, collections))


def _stored_collections(arrays: Mapping) -> tuple[dict, dict]:
    """``(params, {"batch_stats": ..., "quant_stats": ...})`` of a file's arrays, flat and
    ``/``-keyed, the packed integer kernels left out."""
    params, collections = {}, {"batch_stats": {}, QUANT_STATS: {}}
    for key, value in arrays.items():
        collection, rest = key.split("/", 1)
        if collection == "params" and not rest.endswith(f"/{KERNEL_INT}"):
            params[rest] = np.asarray(value, np.float32)
        elif collection in collections:
            collections[collection][rest] = value
    return params, collections


def _with_kernels(path, model, manifest: dict, arrays: Mapping, params: dict, collections: dict):
    """Flat loaded variables: ``params`` with the float kernels the stored integers give,
    the other ``collections``, and a fresh oscillation state for the tracked layers."""
    w_ints = {
        layer: export_manifest.checked_int(
            path, layer, arrays[f"params/{layer}/{KERNEL_INT}"], entry["n_bits"]
        )
        for layer, entry in manifest["weights"].items()
    }
    # One compiled program: eager ops would compile a kernel per layer shape.
    kernels, states = jax.jit(functools.partial(_inference_weights, model, manifest["weights"]))(
        w_ints, params, collections["batch_stats"]
    )
    params.update({f"{layer}/kernel": kernel for layer, kernel in kernels.items()})
    return {"params": params, **collections, OSCILLATION: states}


def _nested(variables: Mapping[str, dict], *, keep_empty: bool = True) -> dict:
    """Flat ``/``-keyed collections as nested dicts of arrays (an empty ``oscillation``
    collection dropped unless ``keep_empty``)."""
    return {
        name: jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(tree, sep="/"))
        for name, tree in variables.items()
        if tree or keep_empty or name != OSCILLATION
    }


def check_suffix(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path if its suffix names a supported format; one sentence otherwise."""
    return export_manifest.check_output_path(path, SUFFIXES)


def _manifest_model(path: pathlib.Path, manifest: dict) -> nn.Module:
    """The model a (checked) manifest describes; one sentence if this code builds none."""
    try:
        options = {
            k: export_manifest.from_json(k, v) for k, v in manifest["model"]["options"].items()
        }
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
            layer, name = _split(key)
            if collection == "params" and name == "kernel" and layer in manifest["weights"]:
                key = _join(layer, KERNEL_INT)
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


class _Fold(NamedTuple):
    """A quantized conv's BN as ``y * mul + offset`` (float32 ``(out,)`` each), and where the
    export puts ``mul``: ``"scale"`` (the per-channel weight scale) or ``"kernel"`` (a
    ``fold_bn`` model has quantized the folded kernel already)."""

    mul: np.ndarray
    offset: np.ndarray
    into: str


def _bn_folds(model, weights: Mapping, params: Mapping, batch_stats: Mapping) -> dict[str, _Fold]:
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
        layer: _Fold(np.asarray(mul, np.float32), np.asarray(offset, np.float32), into)
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
        if manifest["format_version"] < FOLDED_SINCE or into != expected:
            raise ValueError(
                f"{path}: its manifest folds the BN of {layer} into the {into!r}, but a format "
                f"version {manifest['format_version']} export of its model folds "
                + (
                    "none"
                    if manifest["format_version"] < FOLDED_SINCE
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
        stored[f"params/{layer}/{FOLDED_BIAS}"] = out
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
        offset = params.pop(f"{layer}/{FOLDED_BIAS}")
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


def _join(layer: str, name: str) -> str:
    return f"{layer}/{name}" if layer else name


def _split(key: str) -> tuple[str, str]:
    """``"a/b/name" -> ("a/b", "name")``."""
    layer, _, name = key.rpartition("/")
    return layer, name


def _weight_arrays(
    weights: Mapping[str, collect.QuantizedWeight],
    plan: Mapping,
    oscillation_state: Mapping,
    folds: Mapping[str, _Fold],
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The integers, scales (with folded BN) and zero points of the quantized kernels, the
    folded offsets, and their manifest."""
    arrays, entries = {}, {}
    for layer, qw in weights.items():
        if export_manifest.is_packed(qw.n_bits, FORMAT_VERSION):
            arrays[f"params/{layer}/{KERNEL_PACKED}"] = export_manifest.pack_nibbles(qw.int_weight)
        else:
            arrays[f"params/{layer}/{KERNEL_INT}"] = qw.int_weight
        arrays[f"params/{layer}/weight_scale"] = qw.scale
        fold = folds.get(layer)
        if fold is not None:
            arrays[f"params/{layer}/{FOLDED_BIAS}"] = fold.offset
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


def _param_arrays(
    params: Mapping, quantized: set[str], plan: Mapping, quant_stats: Mapping
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every ``params`` leaf but the quantized kernels and their quantizers: activation
    quantizers (effective values, with their signedness) and float parameters; and the
    activation quantizers' manifest."""
    arrays, entries = {}, {}
    for key, value in params.items():
        layer, name = _split(key)
        q, kind = split_quantizer_param(name) or (None, None)
        if q is not None and q != "weight" and _join(layer, q) not in plan and layer not in plan:
            q = None  # a parameter of the model's own named like a quantizer's
        if q is None:
            if not (layer in quantized and name == "kernel"):
                arrays[f"params/{key}"] = np.asarray(value, np.float32)
        elif q != "weight" and kind == "scale":
            spec = _activation_spec(plan, layer, q)
            arrays.update(_activation_arrays(layer, q, spec, params, quant_stats))
            signed = bool(arrays[f"{QUANT_STATS}/{_join(layer, q)}_signed"])
            entries[_join(layer, q)] = _spec_entry(spec, signed=signed)
    return arrays, entries


def _quantizer_sites(plan: Mapping) -> list[tuple[str, str, QuantizerSpec]]:
    """``(variable path, quantizer name, spec)`` of every enabled quantizer that owns variables.

    Weight layers hold ``weight``, ``input`` and ``output``; a residual site ``<block>/residual``
    keeps ``residual`` in its block; the pooling site re-uses another quantizer.
    """
    sites = []
    for path, (role, layer_quant) in plan.items():
        if role in _RESIDUAL_ROLES:
            sites.append((_split(path)[0], "residual", layer_quant.output))
        elif role != "pool":
            for q in ("weight", "input", "output"):
                sites.append((path, q, getattr(layer_quant, q)))
    return [(path, q, spec) for path, q, spec in sites if spec.enabled]


def _activation_spec(plan: Mapping, layer: str, q: str) -> QuantizerSpec:
    site = _join(layer, q) if q == "residual" else layer
    return getattr(plan[site][1], "input" if q == "input" else "output")


def _activation_arrays(
    layer: str, q: str, spec: QuantizerSpec, params: Mapping, quant_stats: Mapping
) -> dict[str, np.ndarray]:
    """The effective scale (zero point) and the signedness of activation quantizer ``q``."""
    signed = np.asarray(quant_stats[_join(layer, f"{q}_signed")], np.bool_)
    scale = params[_join(layer, f"{q}_scale")]
    p = quant.quant_params(
        scale,
        params.get(_join(layer, f"{q}_zero_point")),
        x_shape=np.shape(scale),
        n_bits=spec.n_bits,
        signed=signed,
    )
    arrays = {
        f"params/{_join(layer, q)}_scale": np.asarray(p.scale, np.float32),
        f"{QUANT_STATS}/{_join(layer, q)}_signed": signed,
    }
    if p.zero_point is not None:
        arrays[f"params/{_join(layer, q)}_zero_point"] = np.asarray(p.zero_point, np.int32)
    return arrays


def _check_calibrated(plan: Mapping, params: Mapping, quant_stats: Mapping) -> None:
    """Every quantizer has its scale, and those with a stored estimator (``mse``,
    ``running_minmax``; ``current_minmax`` keeps none) have seen calibration."""
    estimators = {key.rpartition("/")[0] for key in quant_stats}  # <q>_range/<field> keys
    for layer, q, spec in _quantizer_sites(plan):
        if _join(layer, f"{q}_scale") not in params:
            raise ValueError(
                f"The variables have no quantizer scale params/{_join(layer, q)}_scale; export "
                "the variables of the quantized model after calibrating it."
            )
        if spec.range_method != "current_minmax" and _join(layer, f"{q}_range") not in estimators:
            raise ValueError(
                f"The variables are not calibrated (quant_stats/{_join(layer, q)}_range is "
                "missing); run the model in QuantContext 'calibrate' mode before exporting."
            )


def _spec_entry(spec: QuantizerSpec, *, signed: bool) -> dict:
    return {"n_bits": spec.n_bits, "signed": signed, "symmetric": spec.symmetric}


def _inference_weights(
    model: nn.Module,
    weight_entries: Mapping[str, dict],
    w_ints: Mapping[str, jax.Array],
    params: Mapping[str, jax.Array],
    batch_stats: Mapping[str, jax.Array],
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``({layer: float kernel}, {"<layer>/<field>": fresh oscillation state})``; the kernel's
    fake quantization in ``model`` gives back ``w_ints[layer]``.

    Without ``fold_bn`` the kernel is ``scale * (w_int - zero_point)`` itself. A folded layer
    quantizes ``kernel * mul`` (``QuantConvBN``), so its kernel is that divided by ``mul``,
    which the product gives back up to an ulp; a channel with ``mul == 0`` quantizes to 0
    whatever its kernel.
    """
    kernels, states = {}, {}
    for layer, entry in weight_entries.items():
        w_q = quant.dequantize(
            w_ints[layer],
            params[f"{layer}/weight_scale"],
            params.get(f"{layer}/weight_zero_point"),
            n_bits=entry["n_bits"],
            signed=True,
        )
        if getattr(model, "fold_bn", False) and f"{layer}/bn/scale" in params:
            mul = batchnorm.fold_multiplier(
                params[f"{layer}/bn/scale"], batch_stats[f"{layer}/bn/var"], model.bn_epsilon
            )
            w_q = jnp.where(mul == 0, 0.0, w_q / jnp.where(mul == 0, 1.0, mul))
        kernels[layer] = w_q
        if entry["tracked"]:
            state = oscillation.init(w_ints[layer])
            states.update({f"{layer}/{f}": getattr(state, f) for f in state._fields})
    return kernels, states


# --- models quantized by rules --------------------------------------------------------------


def _rules_json(qmodel: QuantizedModel) -> list:
    return [export_manifest.to_json("rules", dataclasses.asdict(rule)) for rule in qmodel.rules]


def _check_rules_model(model, what: str) -> None:
    if not isinstance(model, QuantizedModel):
        raise ValueError(
            f"{what} takes model=<a QuantizedModel from oscqat_jax.nn.quantize_model>, got "
            f"{type(model).__name__}."
        )


def _export_rules_model(
    path, qmodel: QuantizedModel, variables: Mapping, input_shape, call_kwargs: dict
) -> dict:
    """:func:`export_model` of a model quantized by rules (module docstring)."""
    _check_rules_model(qmodel, "export_model")
    path = check_suffix(path)
    input_shape = export_manifest.check_input_shape(input_shape)
    export_manifest.check_variables(variables)
    image = np.zeros((1, *input_shape), np.float32)
    x = jax.ShapeDtypeStruct(image.shape, jnp.float32)
    export_manifest.fitting(
        input_shape,
        lambda: jax.eval_shape(lambda v, x: qmodel.model.apply(v, x, **call_kwargs), variables, x),
    )
    plan = {site: (RULES_KIND, lq) for site, lq in qmodel.plan(image, **call_kwargs).items()}
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    _check_calibrated(plan, params, quant_stats)
    weights = collect.quantized_weights(qmodel, variables, image, **call_kwargs)
    return _write_by_rules(
        path,
        {"kind": RULES_KIND, "name": type(qmodel.model).__name__},
        _rules_json(qmodel),
        {k: export_manifest.to_json(k, v) for k, v in call_kwargs.items()},
        input_shape,
        plan,
        params,
        quant_stats,
        weights,
        traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/"),
        traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/"),
    )


def _export_nnx_model(path, model, variables, input_shape, model_kwargs: dict) -> dict:
    """:func:`export_model` of an NNX model quantized by rules (:mod:`oscqat_jax.export_nnx`)."""
    export_nnx.check_model(model, "export_model")
    if variables is not None or model_kwargs:
        raise ValueError(
            "export_model of an NNX model takes no variables or model arguments: the model "
            "holds its variables; call export_model(path, model=model, input_shape=...)."
        )
    path = check_suffix(path)
    input_shape = export_manifest.check_input_shape(input_shape)
    pieces = export_nnx.export_pieces(model, input_shape)
    _check_calibrated(pieces["plan"], pieces["params"], pieces["quant_stats"])
    return _write_by_rules(
        path,
        {"kind": export_nnx.NNX_KIND, "name": type(model).__name__},
        export_nnx.rules_json(model),
        {},
        input_shape,
        pieces["plan"],
        pieces["params"],
        pieces["quant_stats"],
        pieces["weights"],
        pieces["oscillation"],
        pieces["batch_stats"],
    )


def _load_nnx_model(path: pathlib.Path, model, arrays: Mapping, manifest: dict):
    """Writes a (digest-checked) NNX export into ``model`` after checking that the file is
    one of it: its kind, rules, tensors and bit widths. Returns the model's state."""
    name = manifest["model"].get("name")
    if manifest["model"].get("kind") != export_nnx.NNX_KIND:
        raise ValueError(
            f"{path} holds the model {name}, not an NNX model quantized by rules; pass the "
            "model it was exported from (or none for the package's models)."
        )
    if model is None:
        raise ValueError(
            f"{path} holds the NNX model {name} quantized by rules; pass that model, "
            "quantized with the same rules: load_export(path, model=model)."
        )
    modules = export_nnx.check_model(model, "load_export")
    if manifest.get("rules") != export_nnx.rules_json(model):
        raise ValueError(
            f"{path} was exported with other quantization rules than the model given; pass "
            "a model quantized by the rules it was exported with."
        )
    arrays, packed_layers = export_manifest.unpacked_kernels(path, arrays, manifest)
    shapes = export_nnx.stored_shapes(model, manifest["weights"], KERNEL_INT)
    export_manifest.check_tensors(path, arrays, shapes)
    bits = {
        site: plan.weight.n_bits
        for site, plan in map(
            lambda item: (item[0], nnx_quant.site_plan_of(item[1])), modules.items()
        )
        if plan.weight.enabled
    }
    export_manifest.check_bits(path, manifest["weights"], bits, arrays)
    export_manifest.check_packing(path, manifest, packed_layers)
    params, collections = _stored_collections(arrays)
    variables = _with_kernels(path, model, manifest, arrays, params, collections)
    export_nnx.load_into(model, variables)
    return nnx.state(model)


def _write_by_rules(
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
    arrays, weight_entries = _weight_arrays(weights, plan, oscillation_state, {})
    float_arrays, activation_entries = _param_arrays(params, set(weights), plan, quant_stats)
    arrays.update(float_arrays)
    for key, value in batch_stats.items():
        arrays[f"batch_stats/{key}"] = np.asarray(value, np.float32)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**model_entry, "num_classes": None, "options": {}},
        "rules": rules_json,
        "call_kwargs": call_kwargs,
        "quant_setup": None,
        "input_shape": list(input_shape),
        "weights": weight_entries,
        "activations": activation_entries,
    }
    return _write(path, arrays, manifest)


def _load_rules_model(path: pathlib.Path, qmodel, arrays: Mapping, manifest: dict) -> dict:
    """The variables of a (digest-checked) rules export for ``qmodel``, after checking that
    the file is one of ``qmodel``: its kind, rules, tensors and bit widths."""
    name = manifest["model"].get("name")
    if manifest["model"].get("kind") != RULES_KIND:
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
        k: export_manifest.from_json(k, v) for k, v in manifest.get("call_kwargs", {}).items()
    }
    arrays, packed_layers = export_manifest.unpacked_kernels(path, arrays, manifest)
    x = jax.ShapeDtypeStruct((1, *(int(d) for d in manifest["input_shape"])), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, **call_kwargs), jax.random.key(0), x)
    shapes = {}
    for collection in ("params", "batch_stats", QUANT_STATS):
        for key, leaf in traverse_util.flatten_dict(abstract.get(collection, {}), sep="/").items():
            layer, leaf_name = _split(key)
            if collection == "params" and leaf_name == "kernel" and layer in manifest["weights"]:
                key = _join(layer, KERNEL_INT)
            if collection != QUANT_STATS or leaf_name.endswith("_signed"):
                shapes[f"{collection}/{key}"] = tuple(leaf.shape)
    export_manifest.check_tensors(path, arrays, shapes)
    plan = qmodel.plan(x, **call_kwargs)
    bits = {site: lq.weight.n_bits for site, lq in plan.items() if lq.weight.enabled}
    export_manifest.check_bits(path, manifest["weights"], bits, arrays)
    export_manifest.check_packing(path, manifest, packed_layers)
    params, collections = _stored_collections(arrays)
    variables = _with_kernels(path, qmodel, manifest, arrays, params, collections)
    # The file holds trained scales, not range accumulators: mark every quantizer as
    # calibrated (a counter without an accumulator, which a later calibration restarts).
    for site, lq in plan.items():
        for q in ("weight", "input", "output"):
            if getattr(lq, q).enabled:
                variables[QUANT_STATS][f"{site}/{q}_range"] = {"num_batches": np.int32(1)}
    return _nested(variables, keep_empty=False)
