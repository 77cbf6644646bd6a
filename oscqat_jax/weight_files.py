"""Weight files: ``{key: numpy array}`` in ``.npz``, ``.safetensors`` and PyTorch checkpoints.

The one place that reads and writes them, for the converter (``oscqat_jax.convert``) and the
integer export (``oscqat_jax.export``). Only numpy is needed; the optional ``safetensors``
package is used when installed (without it ``.safetensors`` files are read by a small parser
here, but cannot be written), and ``torch`` is imported by the PyTorch reader alone.

- ``.npz``: a numpy archive; a JSON metadata entry is a 0-d string array under its key.
- ``.safetensors``: u64 little-endian header length, JSON header, raw little-endian data; a
  JSON metadata entry is a string in the header's ``__metadata__``.
- ``.pth``/``.pt``/``.pth.tar``/``.tar``/``.bin`` (read only): a PyTorch state dict, or a dict
  holding one under ``state_dict``, ``model_state_dict`` or ``model``, loaded with
  ``weights_only=True`` so that a file cannot run code; floating tensors become float32.

Writes are atomic: the file is written next to ``path`` under a temporary name and moved
onto ``path`` only once complete, so a failed write leaves an existing file as it was.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")
SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".npz")
"""Every suffix :func:`read` accepts; :func:`write` takes ``.safetensors`` and ``.npz``."""
STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model")
"""Entries of a checkpoint dict that may hold the state dict, in the order they are tried."""

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_METADATA = "__metadata__"


def format_of(path: str | os.PathLike) -> str | None:
    """``"npz"``, ``"safetensors"`` or ``"torch"`` by the name's suffix; None for another."""
    name = pathlib.Path(path).name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    return None


def read(path: str | os.PathLike, *, metadata_key: str | None = None) -> tuple[StateDict, Any]:
    """The arrays of a weight file and the JSON value stored under ``metadata_key``.

    Returns:
      ``({key: array}, metadata)``; ``metadata`` is None when ``metadata_key`` is None or the
      file has no such entry (a PyTorch checkpoint never has one). Arrays keep their stored
      dtype, except PyTorch floating tensors, which become float32.

    Raises:
      ValueError: one sentence naming the file when its suffix is unknown, it is truncated or
        corrupt, or a PyTorch checkpoint holds more than tensors and plain containers.
    """
    path = pathlib.Path(path)
    kind = format_of(path)
    if kind is None:
        raise ValueError(f"{path} has an unknown suffix; use one of {', '.join(SUFFIXES)}.")
    if kind == "torch":
        return _read_torch(path), None
    arrays, text = (_read_npz if kind == "npz" else _read_safetensors)(path, metadata_key)
    return arrays, None if text is None else json.loads(text)


def write(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    metadata_key: str | None = None,
    metadata: Any = None,
    compress: bool = True,
) -> None:
    """Writes ``arrays`` (and ``metadata`` as JSON under ``metadata_key``) atomically.

    Args:
      path: ends in ``.npz`` or ``.safetensors``; missing parent folders are created.
      arrays: ``{key: array}``; ``.safetensors`` needs numpy arrays.
      metadata_key, metadata: a JSON-serialisable value stored in the file (see the module
        docstring), written with sorted keys; nothing when ``metadata_key`` is None.
      compress: deflate the members of an ``.npz``.
    """
    path = pathlib.Path(path)
    kind = format_of(path)
    if kind not in ("npz", "safetensors"):
        raise ValueError(f"{path} has an unknown suffix; write .safetensors or .npz.")
    text = None if metadata_key is None else json.dumps(metadata, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if kind == "npz":
            extra = {} if text is None else {metadata_key: np.asarray(text)}
            with open(tmp, "wb") as f:
                (np.savez_compressed if compress else np.savez)(f, **arrays, **extra)
        else:
            _safetensors_package().numpy.save_file(
                dict(arrays), str(tmp), metadata=None if text is None else {metadata_key: text}
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unreadable(path: pathlib.Path, kind: str, err: BaseException) -> ValueError:
    """One sentence for a file its reader fails on, with the reader's first sentence."""
    reason = (str(err).splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return ValueError(f"{path} is truncated or not a {kind} file ({reason or type(err).__name__}).")


def _read_npz(path: pathlib.Path, metadata_key: str | None) -> tuple[StateDict, str | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as err:
        raise _unreadable(path, ".npz", err) from None
    text = None if metadata_key is None else arrays.pop(metadata_key, None)
    return arrays, None if text is None else str(text)


def _safetensors_package():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "Files ending in .safetensors need the safetensors package (pip install "
            "safetensors); use a .npz path otherwise."
        ) from None
    return safetensors


def _read_safetensors(path: pathlib.Path, metadata_key: str | None) -> tuple[StateDict, str | None]:
    try:
        import safetensors.numpy
    except ImportError:
        arrays, metadata = _parse_safetensors(path)
    else:
        try:
            arrays = safetensors.numpy.load_file(str(path))
            metadata = {}
            if metadata_key is not None:
                with safetensors.safe_open(str(path), framework="np") as f:
                    metadata = f.metadata() or {}
        except safetensors.SafetensorError as err:
            raise _unreadable(path, ".safetensors", err) from None
    return arrays, None if metadata_key is None else metadata.get(metadata_key)


def _parse_safetensors(path: pathlib.Path) -> tuple[StateDict, dict[str, str]]:
    """Reads the safetensors format without the package: the arrays and the metadata.

    The header maps each key to ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)``
    into the data that follows it (little-endian, C order).
    """
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is too short to be a safetensors file.")
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} has no valid safetensors header ({err}).") from None
    buffer = memoryview(data)[8 + header_len :]
    tensors = {}
    for key, info in header.items():
        if key == _SAFETENSORS_METADATA:
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"Tensor {key!r} of {path} has dtype {info['dtype']}, which is not one of "
                f"{', '.join(_SAFETENSORS_DTYPES)}."
            )
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(buffer):
            raise ValueError(
                f"Tensor {key!r} of {path} has data offsets [{begin}, {end}) that do not fit "
                f"its shape {shape} and dtype {info['dtype']} in a {len(buffer)}-byte buffer."
            )
        tensors[key] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
    return tensors, header.get(_SAFETENSORS_METADATA) or {}


def _read_torch(path: pathlib.Path) -> StateDict:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise ValueError(
            f"{path} was not loaded: read with weights_only=True, a checkpoint may hold only "
            f"tensors and plain containers, but this one holds "
            f"{found.group(1) if found else 'other objects'}; save model.state_dict() instead."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise _unreadable(path, "PyTorch checkpoint", err) from None
    state_dict = _find_state_dict(obj, path, lambda v: isinstance(v, torch.Tensor))

    def to_numpy(tensor):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        return tensor.numpy()

    return {key: to_numpy(value) for key, value in state_dict.items()}


def _find_state_dict(obj: Any, path: pathlib.Path, is_tensor: Callable[[Any], bool]) -> Mapping:
    """``obj`` if it maps names to tensors, else the first such entry of ``STATE_DICT_ENTRIES``."""
    if isinstance(obj, Mapping):
        if obj and all(is_tensor(v) for v in obj.values()):
            return obj
        for entry in STATE_DICT_ENTRIES:
            value = obj.get(entry)
            if isinstance(value, Mapping) and value and all(is_tensor(v) for v in value.values()):
                return value
        found = f"a dict with keys {sorted(map(str, obj))[:8]}"
    else:
        found = type(obj).__name__
    raise ValueError(
        f"{path} holds {found}, not a state dict (a dict of tensors, or one under "
        f"{', '.join(repr(e) for e in STATE_DICT_ENTRIES)})."
    )
