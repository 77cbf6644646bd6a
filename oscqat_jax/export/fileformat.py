"""The manifest of an integer export (``oscqat_jax.export``): its JSON values, its digest,
and what the loader checks before it trusts a file.

- :func:`digest`: the sha256 that the exporter writes into the manifest (``sha256``), over the
  rest of the manifest and every tensor's name, dtype, shape and little-endian bytes; so a
  flipped byte or an edited manifest value is noticed, while the same content saved again
  (other compression, the other format) still matches.
- :func:`check_manifest`: an export's manifest of this format version, with the keys the
  loader reads and the digest of the file's content.
- :func:`check_tensors` and :func:`check_bits`: every tensor has the shape of the model's
  variable it becomes (none missing, none extra), and each quantized kernel the bit width the
  model's quant setup gives it; :func:`checked_int`: a kernel's integers lie on its grid.
- :func:`pack_nibbles` and :func:`unpack_nibbles`: kernels of at most :data:`PACKED_MAX_BITS`
  bits stored two per byte, and :func:`unpacked_kernels`, which turns a
  file's packed kernels back into integers before the checks above.

Each check raises a ValueError of one sentence that starts with the file's path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from oscqat_jax import quant

FORMAT = "oscqat_jax.export"
# 2: the manifest holds the sha256 of the file's content; 3: packed kernels; 4: BN folded
# (the package's former ctx models); 5: BN folded at the ConvBN sites of models quantized by
# rules.
FORMAT_VERSION = 5
# 4 is 5 with ConvBN sites unfolded (read for rules models without them). Versions 2 and 3
# were written only for the former ctx models, which this code no longer builds.
READ_VERSIONS = (4, 5)
FOLDED_RULES_SINCE = 5
FOLDED_BIAS = "folded_bias"
MANIFEST_KEY = "oscqat_jax_export"
SUFFIXES = (".safetensors", ".npz")
RULES_KIND = "rules"  # manifest model kind of a Linen model quantized by rules
DIGEST_KEY = "sha256"
KERNEL_INT = "kernel_int"
KERNEL_PACKED = "kernel_packed"
PACKED_MAX_BITS = 4
"""Kernels of at most this many bits are stored packed, two 4-bit two's-complement values per
byte (every version read); wider ones as int8 (int16 above 8 bits)."""
# The keys the loader reads: top level, under "model", and in each "weights" entry.
REQUIRED = ("model", "quant_setup", "input_shape", "weights", "activations", DIGEST_KEY)
MODEL_KEYS = ("name", "num_classes", "options")
WEIGHT_KEYS = ("n_bits", "kernel_shape", "tracked")
_AGAIN = "export the model again"


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """``input_shape`` of an export as ``(H, W, C)`` ints; one sentence unless it is three
    positive whole numbers."""
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if (
        dims is None
        or isinstance(input_shape, (str, bytes))
        or len(dims) != 3
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims)
        or not all(d > 0 for d in dims)
    ):
        raise ValueError(
            f"input_shape must be the shape (H, W, C) of one image, three positive ints, "
            f"got {input_shape!r}."
        )
    return tuple(int(d) for d in dims)


def check_output_path(path: Any, suffixes: tuple[str, ...]) -> pathlib.Path:
    """``path`` of a file to write as a Path; one sentence unless it is a str or
    ``os.PathLike`` ending in one of ``suffixes`` that is not a folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"path must be a file name ending in {' or '.join(suffixes)}, got "
            f"{type(path).__name__}."
        )
    path = pathlib.Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(
            f"Export file {path} has the suffix {path.suffix!r}; use one of {', '.join(suffixes)}."
        )
    if path.is_dir():
        raise ValueError(f"Export file {path} is a folder; name a file to write.")
    return path


def fitting(input_shape: tuple[int, ...], trace: Callable[[], Any]) -> Any:
    """``trace()``, which traces the model on one image of ``input_shape``. When the model
    refuses it from inside Flax or JAX (a kernel of another input-channel count, a rank it
    cannot take), one sentence naming ``input_shape``; the package's own errors, already
    sentences (an uncalibrated quantizer), pass unchanged."""
    try:
        return trace()
    except Exception as err:
        if _raised_by_package(err):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"input_shape {input_shape} does not fit the model with its variables and the "
            f"keyword arguments given ({reason.rstrip('.')}); pass the (H, W, C) of the images "
            "the model was trained on."
        ) from None


def _raised_by_package(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this package."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def check_variables(variables: Any) -> None:
    """One sentence unless ``variables`` is a Linen model's variables (a mapping with a
    ``params`` collection)."""
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        keys = f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else ""
        raise ValueError(
            "variables must be the model's variables (a dict with a 'params' collection, from "
            f"init and calibrate), got {type(variables).__name__}{keys}."
        )


def to_json(name: str, value: Any) -> Any:
    """A model option or setup field as JSON (tuples as lists, dtypes by name)."""
    if name == "dtype" and value is not None:
        return jnp.dtype(value).name
    if isinstance(value, Mapping):
        return {k: to_json(k, v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_json(name, v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"The model option {name}={value!r} cannot be written to the export manifest; pass "
        "numbers, strings, booleans, None or tuples of them."
    )


def from_json(name: str, value: Any) -> Any:
    """Inverse of :func:`to_json` for model options (lists back to tuples)."""
    if name == "dtype" and value is not None:
        return jnp.dtype(value)
    if isinstance(value, list):
        return tuple(from_json(name, v) for v in value)
    return value


def digest(arrays: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """The hex sha256 of ``manifest`` (without its own ``sha256`` entry) and ``arrays``."""
    h = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    h.update(json.dumps(body, sort_keys=True).encode())
    for key in sorted(arrays):
        array = np.asarray(arrays[key])
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        h.update(f"\0{key}\0{array.dtype.name}\0{list(array.shape)}\0".encode())
        h.update(little.tobytes())
    return h.hexdigest()


def check_manifest(
    path: pathlib.Path,
    manifest: Any,
    arrays: Mapping[str, Any],
    *,
    name: str,
    versions: tuple[int, ...],
) -> None:
    """``manifest`` is a ``name`` manifest of one of ``versions`` with every key the loader
    reads, and its digest is that of ``arrays`` and itself."""
    if not isinstance(manifest, dict) or manifest.get("format") != name:
        raise ValueError(f"{path} is not an oscqat_jax export (it has no {name} manifest).")
    found = manifest.get("format_version")
    if isinstance(found, bool) or found not in versions:
        readable = ", ".join(str(v) for v in versions[:-1])
        readable = f"{readable} or {versions[-1]}" if readable else str(versions[-1])
        raise ValueError(
            f"{path} is an export of format version {found}, but this code reads version "
            f"{readable}; export the model again with this version."
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if not missing and isinstance(manifest["model"], dict):
        missing = [f"model/{k}" for k in MODEL_KEYS if k not in manifest["model"]]
    if not missing and isinstance(manifest["weights"], dict):
        missing = [
            f"weights/{layer}/{k}"
            for layer, entry in manifest["weights"].items()
            for k in WEIGHT_KEYS
            if not isinstance(entry, dict) or k not in entry
        ]
    if missing:
        raise ValueError(f"{path}: its manifest lacks the key {missing[0]!r}; {_AGAIN}.")
    if manifest[DIGEST_KEY] != digest(arrays, manifest):
        raise ValueError(
            f"{path} was changed after it was exported: the sha256 of its tensors and manifest "
            f"is not the one written into it; {_AGAIN}."
        )


def check_tensors(
    path: pathlib.Path, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]
) -> None:
    """The file holds exactly the tensors of ``shapes`` (``{key: shape}`` of the model)."""
    for key, array in sorted(arrays.items()):
        if key not in shapes:
            raise ValueError(
                f"{path} holds the tensor {key}, which the model of its manifest has no "
                f"variable for; {_AGAIN}."
            )
        if tuple(np.shape(array)) != tuple(shapes[key]):
            raise ValueError(
                f"{path}: the tensor {key} has shape {tuple(np.shape(array))}, but the model of "
                f"its manifest needs {tuple(shapes[key])}; {_AGAIN}."
            )
    missing = sorted(set(shapes) - set(arrays))
    if missing:
        raise ValueError(f"{path} lacks the tensor {missing[0]} of its model; {_AGAIN}.")


def check_bits(
    path: pathlib.Path, weights: Mapping[str, dict], setup_bits: Mapping[str, int], arrays
) -> None:
    """The manifest's quantized kernels are the model's (``setup_bits``: ``{layer: n_bits}``),
    at the same bit widths and with the shapes of the stored integers."""
    for layer in sorted(set(setup_bits) | set(weights)):
        listed, setup = weights.get(layer, {}).get("n_bits"), setup_bits.get(layer)
        if listed != setup:
            said = f"gives {listed} bits to" if layer in weights else "does not list"
            does = f"quantizes it at {setup} bits" if setup is not None else "keeps it in float"
            raise ValueError(
                f"{path}: its manifest {said} the kernel of {layer}, but the quant setup of its "
                f"model {does}; {_AGAIN}."
            )
        shape = tuple(np.shape(arrays[f"params/{layer}/{KERNEL_INT}"]))
        if tuple(weights[layer]["kernel_shape"]) != shape:
            raise ValueError(
                f"{path}: its manifest gives the kernel of {layer} the shape "
                f"{tuple(weights[layer]['kernel_shape'])}, but the file holds {shape}; {_AGAIN}."
            )


def checked_int(path: pathlib.Path, layer: str, w_int: np.ndarray, n_bits: int) -> np.ndarray:
    """``w_int`` as float32 after checking it is integer and on the signed ``n_bits`` grid."""
    int_min, int_max = quant.int_range(n_bits, True)
    if not np.issubdtype(w_int.dtype, np.integer) or (
        w_int.size and (w_int.min() < int_min or w_int.max() > int_max)
    ):
        raise ValueError(
            f"{path}: params/{layer}/{KERNEL_INT} must hold integers in [{int_min}, {int_max}] "
            f"({n_bits} bits), got dtype {w_int.dtype}."
        )
    return w_int.astype(np.float32)


def is_packed(n_bits: int) -> bool:
    """Whether a kernel of ``n_bits`` is stored packed (in every format version read)."""
    return n_bits <= PACKED_MAX_BITS


def pack_nibbles(w_int: np.ndarray) -> np.ndarray:
    """Signed integers in [-8, 7] packed two per byte.

    Args:
      w_int: integers of any shape and integer dtype (a kernel of at most 4 bits).

    Returns:
      uint8 of shape ``(ceil(w_int.size / 2),)``: element ``i`` of the C-order flattened
      ``w_int`` as a 4-bit two's-complement nibble, in the low half of byte ``i // 2`` for
      even ``i`` and the high half for odd ``i``; an odd count leaves the last high half 0.
    """
    flat = np.asarray(w_int).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer) or (
        flat.size and (flat.min() < -8 or flat.max() > 7)
    ):
        raise ValueError(
            f"Only integers in [-8, 7] pack into 4 bits, got dtype {flat.dtype}"
            + (f" and values in [{flat.min()}, {flat.max()}]." if flat.size else ".")
        )
    nibbles = (flat.astype(np.int8) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: int8 of ``shape`` (raises if ``packed`` is not
    uint8 of ``(ceil(prod(shape) / 2),)``)."""
    size = math.prod(shape)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.shape != ((size + 1) // 2,):
        raise ValueError(
            f"{size} packed 4-bit values need uint8 of shape ({(size + 1) // 2},), got "
            f"{packed.dtype} of shape {packed.shape}."
        )
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:size]
    # Sign extension of a 4-bit two's-complement value: 0..7 stay, 8..15 become -8..-1.
    return ((nibbles ^ 8).astype(np.int8) - np.int8(8)).reshape(shape)


def unpacked_kernels(
    path: pathlib.Path, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], set[str]]:
    """``arrays`` with each packed kernel (``params/<layer>/kernel_packed``) of a layer the
    manifest lists replaced by its integers (``params/<layer>/kernel_int``, int8 of the
    manifest's ``kernel_shape``), and the set of those layers.

    Call it after :func:`check_manifest` (the digest covers the packed bytes as stored), and
    :func:`check_packing` once the bit widths are checked.
    """
    arrays, packed_layers = dict(arrays), set()
    for layer, entry in sorted(manifest["weights"].items()):
        key = f"params/{layer}/{KERNEL_PACKED}"
        if key not in arrays:
            if is_packed(entry["n_bits"]) and f"params/{layer}/{KERNEL_INT}" not in arrays:
                raise ValueError(
                    f"{path} lacks the tensor {key}, the packed {entry['n_bits']}-bit kernel "
                    f"its manifest lists; {_AGAIN}."
                )
            continue
        shape = tuple(int(d) for d in entry["kernel_shape"])
        packed = arrays.pop(key)
        expected = ((math.prod(shape) + 1) // 2,)
        if packed.dtype != np.uint8 or tuple(packed.shape) != expected:
            raise ValueError(
                f"{path}: {key} is {packed.dtype} of shape {tuple(packed.shape)}, but the kernel "
                f"{shape} of its manifest packs into uint8 of shape {expected}; {_AGAIN}."
            )
        arrays[f"params/{layer}/{KERNEL_INT}"] = unpack_nibbles(packed, shape)
        packed_layers.add(layer)
    return arrays, packed_layers


def check_packing(path: pathlib.Path, manifest: Mapping[str, Any], packed_layers: set[str]):
    """The kernels stored packed are exactly those the format version packs."""
    version = manifest["format_version"]
    for layer, entry in sorted(manifest["weights"].items()):
        n_bits, packed = entry["n_bits"], layer in packed_layers
        if packed != is_packed(n_bits):
            raise ValueError(
                f"{path}: the {n_bits}-bit kernel of {layer} is stored "
                f"{'packed' if packed else 'unpacked'}, but format version {version} packs "
                f"the kernels of at most {PACKED_MAX_BITS} bits; {_AGAIN}."
            )
