"""Integer export of a quantized model, and loading it back as a model plus variables.

:func:`export_model` writes one file holding what quantized inference needs and nothing else
(no latent float weights, range accumulators or tracking state); :func:`load_export` rebuilds
the model from the file's manifest and variables whose quantized kernels are dequantized from
the stored integers, so the usual eval forward
``model.apply(variables, x, QuantContext.create("eval"))`` runs on the exported integers.

File layout (format version 5), ``.safetensors`` or ``.npz`` (compressed) by suffix; keys
follow the model's variable tree, ``<layer>`` being a ``/``-joined module path:

- ``params/<layer>/kernel_packed``: the kernel of a quantized layer of at most 4 bits as
  integers packed two per byte (:func:`oscqat_jax.export.fileformat.pack_nibbles`: uint8
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
  (:mod:`oscqat_jax.export.fileformat`), which the loader verifies before it checks each
  tensor's shape and each kernel's bit width against the model the manifest describes.
  The digest is of the tensors as stored (packed), so a changed nibble is noticed too.

:func:`load_export` also reads version 4 (the same layout, but the ConvBN sites of models
quantized by rules unfolded: read for models without such sites), version 3 (BN stored
unfolded) and version 2 (version 3 with every kernel as ``kernel_int``); other versions are
refused with one sentence naming the version.

**Models quantized by rules** (``oscqat_jax.nn.quantize_model``, a user's own Linen model):
``export_model(path, variables, model=qmodel, input_shape=..., **model_kwargs)`` writes the
same layout for every site the rules quantize: packed or int8 kernels with their effective
scales and zero points, activation quantizers with their signedness, every other ``params``
leaf and the ``batch_stats`` as float32. BN is folded, as above, where the model makes a conv
and its BN one site (a ``ConvBN``, as the package's plain families do, docs/method.md §4;
version 5): the site's integers at ``params/<site>/kernel_packed`` (or ``kernel_int``), its
``weight_scale`` and ``folded_bias``, with the BN's own epsilon and running statistics; no
BN variables and no float kernel of the site are stored, and the manifest marks it
(``"bn": "scale"``, or ``"kernel"`` under a rule's ``fold_bn``). A user's separate BatchNorm
layer is not folded (wherever the model applies it); its variables are stored. The export
refuses a traced call in which a ConvBN normalises with batch statistics (``train=True``).
The manifest's ``model`` entry has
``"kind": "rules"`` and the model class's name, ``rules`` lists the quantization rules and
``call_kwargs`` the model's keyword arguments of the traced call (e.g. ``train: false``).
``load_export(path, model=qmodel)`` checks the file against that model (the same rules, every
tensor of its variables at its shape, the bit widths of its plan) and returns the model and
variables whose ``eval`` forward computes what the exported one computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx

from oscqat_jax import weight_files
from oscqat_jax.export import fileformat, nnx_model, package_model, rules_model, tensors
from oscqat_jax.nn.intercept import QuantizedModel
from oscqat_jax.nn.setups import QuantSetup


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
        return nnx_model.export_nnx_model(path, model, variables, input_shape, model_kwargs)
    if model is not None:
        return rules_model.export_rules_model(path, model, variables, input_shape, model_kwargs)
    if model_name is None or num_classes is None or quant_setup is None:
        raise ValueError(
            "export_model needs model=<a QuantizedModel>, or the model_name, num_classes and "
            "quant_setup of one of the package's models."
        )
    return package_model.export_package_model(
        path, variables, model_name, num_classes, quant_setup, input_shape, model_kwargs
    )


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
    way, for ``qmodel.apply(variables, x, **call_kwargs)`` (a folded ConvBN site as above:
    its BN made ``y * gamma + beta`` with mean 0 and ``var + eps == 1``).

    Returns:
      ``(model, variables)`` with collections ``params``, ``batch_stats``, ``quant_stats`` and
      ``oscillation``, ready for ``model.apply(variables, x, QuantContext.create("eval"))``
      (``(qmodel, variables)`` for a rules model).
    """
    path = tensors.check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"Export file {path} does not exist.")
    try:
        arrays, manifest = weight_files.read(path, metadata_key=fileformat.MANIFEST_KEY)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its manifest is not valid JSON ({err}).") from None
    fileformat.check_manifest(
        path, manifest, arrays, name=fileformat.FORMAT, versions=fileformat.READ_VERSIONS
    )
    kind = manifest["model"].get("kind")
    if kind == nnx_model.NNX_KIND or isinstance(model, nnx.Module):
        return model, nnx_model.load_nnx_model(path, model, arrays, manifest)
    rules_file = kind == fileformat.RULES_KIND
    if model is not None or rules_file:
        return model, rules_model.load_rules_model(path, model, arrays, manifest)
    return package_model.load_package_model(path, arrays, manifest)
