"""Integer export of a quantized model, and loading it back as a model plus variables.

:func:`export_model` writes one file holding what quantized inference needs and nothing else
(no latent float weights, range accumulators or tracking state); :func:`load_export` rebuilds
the model from the file's manifest and variables whose quantized kernels are dequantized from
the stored integers, so the usual eval forward
``model.apply(variables, x, QuantContext.create("eval"))`` runs on the exported integers.

File layout (format version 3), ``.safetensors`` or ``.npz`` (compressed) by suffix; keys
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
- ``params/<site>/<q>_scale`` and ``<q>_zero_point`` (``q`` = ``input``, ``output`` or
  ``residual``): activation quantizers, float32 scale and int32 zero point (asymmetric only);
  ``quant_stats/<site>/<q>_signed``: bool, the grid's signedness learnt at calibration.
- every other ``params`` leaf as float32: float kernels, biases, BatchNorm ``bn/scale`` and
  ``bn/bias``; ``batch_stats/<layer>/bn/{mean, var}``: the running statistics eval uses.

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

:func:`load_export` also reads version 2, the same layout with every kernel as
``kernel_int``; other versions are refused with one sentence naming the version.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax import export_manifest, oscillation, quant, weight_files
from oscqat_jax.models import create_model, quant_plan
from oscqat_jax.nn import batchnorm, collect
from oscqat_jax.nn.config import QuantContext, QuantizerSpec
from oscqat_jax.nn.quantizer import OSCILLATION, QUANT_STATS, split_quantizer_param
from oscqat_jax.nn.setups import QuantSetup

FORMAT = "oscqat_jax.export"
FORMAT_VERSION = 3  # 2: the manifest holds the sha256 of the file's content; 3: packed kernels
READ_VERSIONS = (2, 3)  # version 2 is version 3 without packing
MANIFEST_KEY = "oscqat_jax_export"
SUFFIXES = (".safetensors", ".npz")
KERNEL_INT = export_manifest.KERNEL_INT
KERNEL_PACKED = export_manifest.KERNEL_PACKED
_RESIDUAL_ROLES = ("residual", "head_residual")


def export_model(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    model_name: str,
    num_classes: int,
    quant_setup: QuantSetup | str,
    input_shape: Sequence[int],
    **model_kwargs,
) -> dict:
    """Writes the integer export of a calibrated (and usually trained) quantized model.

    Args:
      path: the file to write, ending in ``.safetensors`` or ``.npz``.
      variables: the model's variables: ``params``, ``batch_stats``, ``quant_stats`` and
        ``oscillation`` (its frozen weights are exported at their frozen integers).
      model_name, num_classes, quant_setup, **model_kwargs: the arguments of
        :func:`oscqat_jax.models.create_model` that build the model (e.g.
        ``width_multiplier``, ``fold_bn``, ``block_setting``); they go into the manifest.
      input_shape: ``(H, W, C)`` of one image; one zero image of this shape is pushed through
        the eval forward to read the integers.

    Returns:
      The manifest written into the file.
    """
    path = check_suffix(path)
    quant_setup = QuantSetup(name=quant_setup) if isinstance(quant_setup, str) else quant_setup
    model = create_model(
        model_name, num_classes=num_classes, quant_setup=quant_setup, **model_kwargs
    )
    input_shape = tuple(int(d) for d in input_shape)
    plan = quant_plan(model, (1, *input_shape))
    variables = flax.core.unfreeze(variables)
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    quant_stats = traverse_util.flatten_dict(variables.get(QUANT_STATS, {}), sep="/")
    _check_calibrated(plan, params, quant_stats)

    image = np.zeros((1, *input_shape), np.float32)
    weights = collect.quantized_weights(model, variables, image, QuantContext.create("eval"))
    oscillation_state = traverse_util.flatten_dict(variables.get(OSCILLATION, {}), sep="/")
    arrays, weight_entries = _weight_arrays(weights, plan, oscillation_state)
    float_arrays, activation_entries = _param_arrays(params, set(weights), plan, quant_stats)
    arrays.update(float_arrays)
    for key, value in traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/").items():
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
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    manifest[export_manifest.DIGEST_KEY] = export_manifest.digest(arrays, manifest)
    weight_files.write(path, arrays, metadata_key=MANIFEST_KEY, metadata=manifest)
    return manifest


def load_export(path: str | os.PathLike) -> tuple[nn.Module, dict]:
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

    Returns:
      ``(model, variables)`` with collections ``params``, ``batch_stats``, ``quant_stats`` and
      ``oscillation``, ready for ``model.apply(variables, x, QuantContext.create("eval"))``.
    """
    path = check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"Export file {path} does not exist.")
    try:
        arrays, manifest = weight_files.read(path, metadata_key=MANIFEST_KEY)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its manifest is not valid JSON ({err}).") from None
    export_manifest.check_manifest(path, manifest, arrays, name=FORMAT, versions=READ_VERSIONS)
    arrays, packed_layers = export_manifest.unpacked_kernels(path, arrays, manifest)
    model = _manifest_model(path, manifest)
    shapes, setup_bits = _model_tensors(model, manifest)
    export_manifest.check_tensors(path, arrays, shapes)
    export_manifest.check_bits(path, manifest["weights"], setup_bits, arrays)
    export_manifest.check_packing(path, manifest, packed_layers)
    params, collections = {}, {"batch_stats": {}, QUANT_STATS: {}}
    for key, value in arrays.items():
        collection, rest = key.split("/", 1)
        if collection == "params" and not rest.endswith(f"/{KERNEL_INT}"):
            params[rest] = np.asarray(value, np.float32)
        elif collection in collections:
            collections[collection][rest] = value
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
    variables = {"params": params, **collections, OSCILLATION: states}
    return model, {
        name: jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(tree, sep="/"))
        for name, tree in variables.items()
    }


def check_suffix(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a Path if its suffix names a supported format; one sentence otherwise."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(
            f"Export file {path} has the suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}."
        )
    return path


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


def _join(layer: str, name: str) -> str:
    return f"{layer}/{name}" if layer else name


def _split(key: str) -> tuple[str, str]:
    """``"a/b/name" -> ("a/b", "name")``."""
    layer, _, name = key.rpartition("/")
    return layer, name


def _weight_arrays(
    weights: Mapping[str, collect.QuantizedWeight], plan: Mapping, oscillation_state: Mapping
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The integers, scales and zero points of the quantized kernels, and their manifest."""
    arrays, entries = {}, {}
    for layer, qw in weights.items():
        if export_manifest.is_packed(qw.n_bits, FORMAT_VERSION):
            arrays[f"params/{layer}/{KERNEL_PACKED}"] = export_manifest.pack_nibbles(qw.int_weight)
        else:
            arrays[f"params/{layer}/{KERNEL_INT}"] = qw.int_weight
        arrays[f"params/{layer}/weight_scale"] = qw.scale
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
