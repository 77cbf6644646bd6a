"""Integer export of a quantized model, and loading it back as the model's variables.

:func:`export_model` writes one file holding what quantized inference needs and nothing else
(no latent float weights, range accumulators or tracking state); :func:`load_export` checks
the file against the model it is given and returns variables whose quantized kernels are
dequantized from the stored integers, so the model's ``eval`` forward runs on the exported
integers. Models: a Linen model quantized by rules (``oscqat_jax.nn.quantize_model``; the
package's families are such models, ``oscqat_jax.models.quantize``) or an NNX model
quantized by ``quantize_model``.

File layout (format version 5), ``.safetensors`` or ``.npz`` (compressed) by suffix; keys
follow the model's variable tree, ``<site>`` being a ``/``-joined module path:

- ``params/<site>/kernel_packed``: the kernel of a quantized site of at most 4 bits as
  integers packed two per byte (:func:`oscqat_jax.export.fileformat.pack_nibbles`: uint8
  ``(ceil(size / 2),)``, the C-order kernel in 4-bit two's complement, low nibble first);
  the manifest's ``kernel_shape`` gives its shape back.
- ``params/<site>/kernel_int``: the kernel of a wider quantized site as integers, int8
  (int16 above 8 bits). Kernels are HWIO ``(kh, kw, in // groups, out)`` or ``(in, out)``;
  frozen weights hold their frozen integer.
- ``params/<site>/weight_scale``: float32, ``()`` or ``(1, ..., 1, out)`` per channel;
  ``params/<site>/weight_zero_point``: int32 of the same shape (asymmetric weights only).
- BatchNorm is folded where the model makes a conv and its BN one site (a
  :class:`~oscqat_jax.nn.convbn.ConvBN`, as the package's families do, docs/method.md §4):
  with ``mul = gamma / sqrt(var + eps)`` per output channel (the BN's own epsilon),
  ``params/<site>/weight_scale`` is float32 ``(out,)``, the weight scale times ``mul`` (of
  either sign), and ``params/<site>/folded_bias`` float32 ``(out,)`` is
  ``beta + (bias - mean) * mul``; the site computes
  ``conv(x, weight_scale * (kernel_int - zero_point)) + folded_bias`` per channel, with the
  trained integers at ``params/<site>/kernel_packed`` (or ``kernel_int``). Under a rule's
  ``fold_bn`` the site already quantizes the folded kernel: its scale keeps the quantizer's
  shape and only ``folded_bias`` replaces BN. The manifest marks such sites (``"bn": "scale"``
  or ``"bn": "kernel"``); the BN's parameters and statistics, the conv's own bias and its
  float kernel are not stored. A user's separate BatchNorm layer is not folded (wherever the
  model applies it); its variables are stored. The export refuses a traced call in which a
  ConvBN normalises with batch statistics (``train=True``).
- ``params/<site>/input_scale`` and ``output_scale`` (with ``_zero_point`` for asymmetric
  grids): activation quantizers, float32 scale and int32 zero point;
  ``quant_stats/<site>/<q>_signed``: bool, the grid's signedness learnt at calibration.
- every other ``params`` leaf as float32 (float kernels, biases, unfolded BatchNorms) and
  every ``batch_stats`` leaf of an unfolded BatchNorm.

Scales and zero points are the effective ones the forward uses (``max(s, 1e-8)``; zero point
``clip(round(z), int_min, int_max)``), so ``scale * (kernel_int - zero_point)`` is the kernel
the fake-quantized forward convolves with.

The manifest is JSON, stored inside the file: the safetensors metadata entry
``oscqat_jax_export``, or the 0-d string array of that name in the ``.npz``. It holds the
format name and version; ``model``: ``"kind": "rules"`` (or ``"nnx"``) and the model class's
name; ``rules``: the quantization rules; ``call_kwargs``: the model's keyword arguments of the
traced call (e.g. ``train: false``); the traced input shape ``(H, W, C)``, and

- ``weights``: per quantized site its ``n_bits``, ``signed``, ``symmetric``, ``per_channel``,
  ``role``, ``kernel_shape``, ``tracked`` (oscillation tracking), ``frozen`` (how many of its
  weights are frozen) and ``bn`` where BN is folded;
- ``activations``: per activation quantizer ``<site>/<q>`` its ``n_bits``, ``signed`` and
  ``symmetric``;
- ``sha256``: the digest of the rest of the manifest and every tensor
  (:mod:`oscqat_jax.export.fileformat`), which the loader verifies before it checks the
  rules, each tensor's shape and each kernel's bit width against the model it is given.
  The digest is of the tensors as stored (packed), so a changed nibble is noticed too.

:func:`load_export` also reads version 4 (the same layout with the ConvBN sites unfolded,
read for models without such sites). Versions 2 and 3, and version 4 and 5 files of the
package's former ctx models (a manifest without ``kind``), are refused in one sentence
naming the version: those models are no longer built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from oscqat_jax import weight_files
from oscqat_jax.export import fileformat, nnx_model, rules_model, tensors
from oscqat_jax.nn.intercept import QuantizedModel


def export_model(
    path: str | os.PathLike,
    variables: Mapping[str, Any] | None = None,
    *,
    model: QuantizedModel | nnx.Module | None = None,
    input_shape: Sequence[int],
    **model_kwargs,
) -> dict:
    """Writes the integer export of a calibrated (and usually trained) quantized model.

    Args:
      path: the file to write, ending in ``.safetensors`` or ``.npz``.
      variables: the model's variables: ``params``, ``batch_stats``, ``quant_stats`` and
        ``oscillation`` (its frozen weights are exported at their frozen integers).
      model: a ``QuantizedModel`` (``oscqat_jax.nn.quantize_model``; the package's families:
        ``oscqat_jax.models.quantize``); then ``model_kwargs`` are the model's own
        keyword arguments for inference (e.g. ``train=False``). Or an NNX model quantized by
        ``quantize_model`` (its variables are its own: pass none).
      input_shape: ``(H, W, C)`` of one image; one zero image of this shape is pushed through
        the eval forward to read the integers.

    Returns:
      The manifest written into the file.
    """
    if isinstance(model, nnx.Module):
        return nnx_model.export_nnx_model(path, model, variables, input_shape, model_kwargs)
    if model is None:
        raise ValueError(
            "export_model needs model=<a QuantizedModel> (oscqat_jax.nn.quantize_model; the "
            "package's families: oscqat_jax.models.quantize) or an NNX model quantized "
            "by quantize_model."
        )
    return rules_model.export_rules_model(path, model, variables, input_shape, model_kwargs)


def load_export(
    path: str | os.PathLike, model: QuantizedModel | nnx.Module | None = None
) -> tuple[QuantizedModel | nnx.Module, Any]:
    """The variables an export's integers give, checked against ``model``.

    Each quantized kernel becomes ``scale * (kernel_int - zero_point)``; a folded ConvBN
    site's BN becomes ``y * gamma + beta`` with mean 0 and ``var + eps == 1``, so it
    multiplies by the stored folded scale's factor (or exactly 1 under ``fold_bn``).
    Fake-quantizing a value that already lies on the grid is idempotent: ``round(kernel / s)``
    gives back ``kernel_int`` exactly, so the eval forward of the returned variables
    quantizes to the exported integers and computes what the exported model's eval forward
    computed, to float rounding where BN was folded. Tracked sites get a fresh
    ``oscillation`` state (nothing frozen: the frozen values are already in the integers).

    Args:
      path: an export written by :func:`export_model`.
      model: the ``QuantizedModel`` it was exported from (the same rules, every tensor of its
        variables at its shape, the bit widths of its plan), or the NNX model, into which the
        state is written.

    Returns:
      ``(model, variables)`` for ``model.apply(variables, x, **call_kwargs)``
      (``(model, state)`` for an NNX model).
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
    if kind not in (fileformat.RULES_KIND, nnx_model.NNX_KIND):
        raise ValueError(_unread_kind(path, manifest))
    if kind == nnx_model.NNX_KIND or isinstance(model, nnx.Module):
        return model, nnx_model.load_nnx_model(path, model, arrays, manifest)
    return model, rules_model.load_rules_model(path, model, arrays, manifest)


def _unread_kind(path, manifest: dict) -> str:
    """The one sentence refusing a file of a model kind this code does not read: the
    package's former ctx models (no ``kind``), or another."""
    kind, version = manifest["model"].get("kind"), manifest["format_version"]
    if kind is None:
        return (
            f"{path} is a format version {version} export of {manifest['model'].get('name')} "
            "as the package's former ctx models built it, which this code no longer reads "
            "(it reads the exports of models quantized by rules, kind 'rules' or 'nnx'); "
            "export the model again with export_model(path, variables, model=qmodel, ...)."
        )
    return (
        f"{path} holds a model of kind {kind!r}, but this code reads the kinds "
        f"{fileformat.RULES_KIND!r} and {nnx_model.NNX_KIND!r}; export the model again."
    )
