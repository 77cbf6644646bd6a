"""Pretrained PyTorch weights -> this package's ``params`` and ``batch_stats``.

QAT starts from a pretrained float network (SPEC §9). This module reads a PyTorch state dict
and places every tensor in the variables of one of our models:

- conv weights OIHW ``(O, I, kh, kw)`` -> HWIO ``(kh, kw, I, O)`` (depth-wise: ``(C, 1, kh,
  kw)`` -> ``(kh, kw, 1, C)``); linear weights ``(out, in)`` -> ``(in, out)``; biases as they are;
- BatchNorm ``weight``/``bias`` -> ``params .../bn/{scale, bias}``, ``running_mean``/
  ``running_var`` -> ``batch_stats .../bn/{mean, var}``; ``num_batches_tracked`` is ignored;
- quantizer parameters (``weight_scale``, ``input_scale``, ...) have no PyTorch counterpart
  and are left to range initialisation (the ``calibrate`` mode), which also restarts the
  oscillation state from the loaded weights; the conversion reports them.

Layouts (the key names of the source), per model family:

===================  =======================================================================
family               layouts
===================  =======================================================================
mobilenet_v2         ``reference`` (the reference's tonylins/pytorch-mobilenet-v2 checkpoint:
                     ``features.i.conv.{0, 1, 3, ...}``), ``torchvision`` (``mobilenet_v2``)
mobilenet_v3_*       ``torchvision`` (``mobilenet_v3_small``, ``mobilenet_v3_large``)
resnet18, resnet50   ``torchvision``; ``reference`` is the same (the reference loads torchvision)
efficientnet_lite*   ``timm``; ``reference`` is the same (the reference loads timm)
every model          ``converted``: the ``.npz`` written by this module's command, keys
                     ``params/<module path>/<name>`` and ``batch_stats/...``
===================  =======================================================================

Where each tensor goes is in the docstring of each model file. The target tree always comes
from the model (``jax.eval_shape(model.init, ...)`` is enough), so any quant setup works; every
source tensor must be used exactly once with the right shape, otherwise a ``ValueError``
names the first key that is missing, unexpected or mis-shaped.

API: :func:`load_torch_state_dict` reads ``.pth``/``.pt``/``.pth.tar`` (with torch, which is
imported only there), ``.safetensors`` and ``.npz`` into ``{key: numpy array}``;
:func:`convert_state_dict` maps one onto a model's variable tree and returns a
:class:`Conversion`; :func:`load_pretrained` does both and merges the result into initialised
variables; :func:`save_converted` writes the ``converted`` layout.

Command (writes the ``converted`` layout and prints a summary)::

    python -m oscqat_jax.convert --model=mobilenet_v2 --layout=torchvision \\
        mobilenet_v2-b0353104.pth mobilenet_v2.npz
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import math
import pathlib
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from oscqat_jax.models import MODELS, create_model
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import FLOAT_SETUP

StateDict = dict[str, np.ndarray]
TreePath = tuple[str, ...]

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")
STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model")
"""Entries of a checkpoint dict that may hold the state dict, in the order they are tried."""
DATA_PARALLEL_PREFIX = "module."
IGNORED_SUFFIX = ".num_batches_tracked"
CONVERTED = "converted"
AUTO = "auto"
LAYOUTS = ("reference", "torchvision", "timm", CONVERTED, AUTO)
"""Every ``layout`` value the converter accepts."""

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
_QUANTIZER_PARAM = re.compile(r".+_(scale|zero_point)$")
"""Names of quantizer parameters (``weight_scale``, ``input_zero_point``, ...)."""

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading files


def load_torch_state_dict(path: str | pathlib.Path) -> StateDict:
    """The tensors of a checkpoint file as ``{key: numpy array}``, ``module.`` prefixes removed.

    ``.pth``/``.pt``/``.pth.tar`` (also ``.tar``/``.bin``): a PyTorch state dict, or a dict
    holding one under ``state_dict``, ``model_state_dict`` or ``model``; read with torch
    (imported here only) and ``weights_only=True``, so a file cannot run code. Floating
    tensors become float32. ``.safetensors`` and ``.npz`` are read without torch.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    name = path.name.lower()
    if name.endswith(".npz"):
        tensors = _read_npz(path)
    elif name.endswith(".safetensors"):
        tensors = _read_safetensors(path)
    elif name.endswith(TORCH_SUFFIXES):
        tensors = _read_torch(path)
    else:
        raise ValueError(
            f"Checkpoint {path} has an unknown suffix; use one of "
            f"{', '.join((*TORCH_SUFFIXES, '.safetensors', '.npz'))}."
        )
    return {_strip_prefix(k): v for k, v in tensors.items()}


def _strip_prefix(key: str) -> str:
    return key.removeprefix(DATA_PARALLEL_PREFIX)


def _read_npz(path: pathlib.Path) -> StateDict:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _read_safetensors(path: pathlib.Path) -> StateDict:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return _parse_safetensors(path)
    return load_file(str(path))


def _parse_safetensors(path: pathlib.Path) -> StateDict:
    """Reads the safetensors format: u64 little-endian header length, JSON header, raw data.

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
        if key == "__metadata__":
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
    return tensors


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


# --------------------------------------------------------------------------- key mappings
#
# A mapper takes the module path of one of our layers (a module whose params hold a
# ``kernel``) and the model's params tree, and returns the PyTorch prefix of the layer's conv
# or linear and of its BatchNorm (None when the layer has none).

LayerNames = tuple[str, str | None]


def _numbers(name: str, stem: str) -> list[int]:
    """``_numbers("layer2_1", "layer") == [2, 1]``."""
    return [int(n) for n in name.removeprefix(stem).strip("_").split("_")]


def _present(block: Mapping, order: Sequence[str]) -> list[str]:
    return [name for name in order if name in block]


def _mobilenet_v2_reference(path: TreePath, params: Mapping) -> LayerNames:
    # tonylins: each block's `conv` is a flat Sequential of (conv, bn, relu6) triples.
    if path == ("classifier",):
        return "classifier.1", None
    (i,) = _numbers(path[0], "features")
    if len(path) == 1:
        return f"features.{i}.0", f"features.{i}.1"
    position = _present(params[path[0]], ("expand", "depthwise", "project")).index(path[1])
    return f"features.{i}.conv.{3 * position}", f"features.{i}.conv.{3 * position + 1}"


def _mobilenet_v2_torchvision(path: TreePath, params: Mapping) -> LayerNames:
    # torchvision: Conv2dNormActivation (conv .0, bn .1) for expand and depth-wise, then the
    # projection conv and its BN as two plain entries.
    if path == ("classifier",):
        return "classifier.1", None
    (i,) = _numbers(path[0], "features")
    if len(path) == 1:
        return f"features.{i}.0", f"features.{i}.1"
    position = _present(params[path[0]], ("expand", "depthwise", "project")).index(path[1])
    prefix = f"features.{i}.conv.{position}"
    if path[1] == "project":
        return prefix, f"features.{i}.conv.{position + 1}"
    return f"{prefix}.0", f"{prefix}.1"


def _mobilenet_v3_torchvision(path: TreePath, params: Mapping) -> LayerNames:
    if len(path) == 1 and path[0].startswith("classifier_"):
        (k,) = _numbers(path[0], "classifier")
        return f"classifier.{k}", None
    (i,) = _numbers(path[0], "features")
    if len(path) == 1:
        return f"features.{i}.0", f"features.{i}.1"
    order = _present(params[path[0]], ("expand", "depthwise", "se", "project"))
    prefix = f"features.{i}.block.{order.index(path[1])}"
    if path[1] == "se":
        return f"{prefix}.{path[2]}", None
    return f"{prefix}.0", f"{prefix}.1"


def _resnet_torchvision(path: TreePath, params: Mapping) -> LayerNames:
    if path == ("fc",):
        return "fc", None
    if path == ("conv1",):
        return "conv1", "bn1"
    i, j = _numbers(path[0], "layer")
    prefix = f"layer{i}.{j}"
    if path[1] == "downsample":
        return f"{prefix}.downsample.0", f"{prefix}.downsample.1"
    (k,) = _numbers(path[1], "conv")
    return f"{prefix}.conv{k}", f"{prefix}.bn{k}"


def _efficientnet_lite_timm(path: TreePath, params: Mapping) -> LayerNames:
    top_level = {"conv_stem": ("conv_stem", "bn1"), "conv_head": ("conv_head", "bn2")}
    if path == ("classifier",):
        return "classifier", None
    if len(path) == 1:
        return top_level[path[0]]
    s, b = _numbers(path[0], "blocks")
    if "conv_pwl" in params[path[0]]:  # inverted residual
        bn = {"conv_pw": "bn1", "conv_dw": "bn2", "conv_pwl": "bn3"}
    else:  # depth-wise separable
        bn = {"conv_dw": "bn1", "conv_pw": "bn2"}
    return f"blocks.{s}.{b}.{path[1]}", f"blocks.{s}.{b}.{bn[path[1]]}"


Mapper = Callable[[TreePath, Mapping], LayerNames]
FAMILIES: dict[str, dict[str, Mapper]] = {
    "mobilenet_v2": {
        "reference": _mobilenet_v2_reference,
        "torchvision": _mobilenet_v2_torchvision,
    },
    "mobilenet_v3": {"torchvision": _mobilenet_v3_torchvision},
    "resnet": {"torchvision": _resnet_torchvision, "reference": _resnet_torchvision},
    "efficientnet_lite": {"timm": _efficientnet_lite_timm, "reference": _efficientnet_lite_timm},
}
"""Model family (a prefix of the model name) -> layout -> mapper."""


def model_name_of(model: str | nn.Module) -> str:
    """The registry name of ``model``: itself if a string, else that of the model's class and
    fixed attributes (e.g. ``mobilenet_v3_small`` for ``MobileNetV3(variant="small")``)."""
    if isinstance(model, str):
        return model
    for name, factory in MODELS.items():
        fixed = factory.keywords if isinstance(factory, functools.partial) else {}
        cls = factory.func if isinstance(factory, functools.partial) else factory
        if type(model) is cls and all(getattr(model, k) == v for k, v in fixed.items()):
            return name
    raise ValueError(f"{type(model).__name__} is not a model of oscqat_jax.models.MODELS.")


def family_of(model: str | nn.Module) -> str:
    """The family of a model or registry name, e.g. ``mobilenet_v3`` for ``mobilenet_v3_small``."""
    model_name = model_name_of(model)
    for family in FAMILIES:
        if model_name.startswith(family):
            return family
    raise ValueError(
        f"No converter for model {model_name!r}; models of the families "
        f"{', '.join(FAMILIES)} can be converted."
    )


def layouts_of(model: str | nn.Module) -> tuple[str, ...]:
    """The layouts a checkpoint for ``model`` may have."""
    return (*FAMILIES[family_of(model)], CONVERTED)


# --------------------------------------------------------------------------- the plan


class _Target(NamedTuple):
    """One float-weight leaf of our variables and the source key that fills it."""

    collection: str  # "params" or "batch_stats"
    path: TreePath  # path inside the collection, e.g. ("features_1", "depthwise", "kernel")
    shape: tuple[int, ...]
    dtype: Any
    key: str  # key in the source state dict
    transpose: bool  # PyTorch conv/linear weight: OIHW -> HWIO, (out, in) -> (in, out)


def _shape(leaf) -> tuple[int, ...]:
    return tuple(int(n) for n in np.shape(leaf))


def _to_ours(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch shape of a weight with our shape ``shape`` (the inverse of :func:`_to_ours`)."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


_LAYER_LEAVES = (
    ("params", ("kernel",), "conv", "weight"),
    ("params", ("bias",), "conv", "bias"),
    ("params", ("bn", "scale"), "bn", "weight"),
    ("params", ("bn", "bias"), "bn", "bias"),
    ("batch_stats", ("bn", "mean"), "bn", "running_mean"),
    ("batch_stats", ("bn", "var"), "bn", "running_var"),
)
"""Float-weight leaves of one layer: (collection, path in the layer, PyTorch module, name)."""


def _mapper(model_name: str, layout: str) -> Mapper | None:
    """The mapper of ``layout`` for ``model_name``; None for the ``converted`` layout."""
    mappers = FAMILIES[family_of(model_name)]
    if layout == CONVERTED:
        return None
    if layout not in mappers:
        raise ValueError(
            f"layout must be one of {', '.join((*layouts_of(model_name), AUTO))} for "
            f"{model_name}, got {layout!r}."
        )
    return mappers[layout]


def _plan(model_name: str, layout: str, template: Mapping) -> list[_Target]:
    """Every float-weight leaf of ``template`` with its source key under ``layout``, in the
    order of the params tree."""
    mapper = _mapper(model_name, layout)
    flat = {c: traverse_util.flatten_dict(template.get(c, {})) for c in ("params", "batch_stats")}
    layers = [path[:-1] for path in flat["params"] if path[-1] == "kernel"]
    targets = []
    for layer in layers:
        conv, bn = mapper(layer, template["params"]) if mapper else (None, None)
        prefixes = {"conv": conv, "bn": bn}
        for collection, suffix, module, name in _LAYER_LEAVES:
            path = (*layer, *suffix)
            if path not in flat[collection]:
                continue
            leaf = flat[collection][path]
            if mapper is None:
                key, transpose = "/".join((collection, *path)), False
            else:
                key, transpose = f"{prefixes[module]}.{name}", suffix == ("kernel",)
            targets.append(_Target(collection, path, _shape(leaf), leaf.dtype, key, transpose))
    covered = {(t.collection, t.path) for t in targets}
    leftover = [
        "/".join((collection, *path))
        for collection, leaves in flat.items()
        for path in leaves
        if (collection, path) not in covered
        and not (collection == "params" and _QUANTIZER_PARAM.fullmatch(path[-1]))
    ]
    if leftover:
        raise ValueError(
            f"The converter does not know where {leftover[0]} of {model_name} comes from; "
            "oscqat_jax.convert needs a mapping for it."
        )
    return targets


# --------------------------------------------------------------------------- conversion


class Conversion(NamedTuple):
    """The converted float weights and what the conversion did.

    Attributes:
      params: nested dict of float32 numpy arrays: every ``kernel``, ``bias`` and
        ``bn/{scale, bias}`` of the model, in our shapes (HWIO kernels, ``(in, out)`` dense).
      batch_stats: nested dict ``.../bn/{mean, var}``, float32 ``(C,)``.
      untouched: ``params/...`` paths of the quantizer parameters left to range
        initialisation.
      layout: the layout that was read.
      ignored: source keys deliberately not used (``num_batches_tracked``).
    """

    params: dict
    batch_stats: dict
    untouched: tuple[str, ...]
    layout: str
    ignored: tuple[str, ...]

    def summary(self) -> str:
        """A few human-readable lines about the conversion."""
        tensors = traverse_util.flatten_dict(self.params)
        count = sum(v.size for v in tensors.values())
        stats = len(traverse_util.flatten_dict(self.batch_stats))
        lines = [
            f"layout {self.layout}: {len(tensors)} parameter tensors ({count:,} parameters) "
            f"and {stats} BatchNorm statistics converted, "
            f"{len(self.ignored)} num_batches_tracked entries ignored",
        ]
        if self.untouched:
            kinds = collections.Counter(path.rsplit("/", 1)[-1] for path in self.untouched)
            lines.append(
                f"{len(self.untouched)} quantizer parameters left to range initialisation ("
                + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                + ")"
            )
        return "\n".join(lines)


def _variables_tree(variables: Mapping) -> dict:
    return {name: dict(tree) for name, tree in variables.items()}


def detect_layout(
    state_dict: Mapping[str, Any], model: str | nn.Module, variables_template: Mapping
) -> str:
    """The layout of ``model`` whose keys overlap most with ``state_dict``'s.

    Raises ``ValueError`` when no layout shares a single key with it.
    """
    model_name = model_name_of(model)
    template = _variables_tree(variables_template)
    keys = set(state_dict)
    overlaps = {
        layout: len(keys & {t.key for t in _plan(model_name, layout, template)})
        for layout in layouts_of(model_name)
    }
    best = max(overlaps, key=overlaps.get)
    if not overlaps[best]:
        raise ValueError(
            f"The checkpoint (first key {next(iter(state_dict), None)!r}) shares no key with any "
            f"layout of {model_name} ({', '.join(overlaps)}); is it a checkpoint of another model?"
        )
    return best


def convert_state_dict(
    state_dict: Mapping[str, Any],
    model: str | nn.Module,
    variables_template: Mapping,
    layout: str = AUTO,
) -> Conversion:
    """Places the tensors of ``state_dict`` into the float weights of ``model``.

    Args:
      state_dict: ``{key: array}`` (numpy, or anything ``np.asarray`` takes), e.g. from
        :func:`load_torch_state_dict`; a ``module.`` prefix is removed.
      model: a registry name (``mobilenet_v2``, ``resnet18``, ``efficientnet_lite0``, ...) or a
        model made by ``oscqat_jax.models.create_model``.
      variables_template: the model's variables or their shapes (``jax.eval_shape`` of
        ``model.init``); only ``params`` and ``batch_stats`` are read.
      layout: one of :func:`layouts_of`, or ``auto`` for :func:`detect_layout`.

    Returns:
      A :class:`Conversion` whose arrays have the template's shapes and dtypes.

    Raises:
      ValueError: naming the first source key that is missing, mis-shaped or unexpected.
    """
    model_name = model_name_of(model)
    state_dict = {_strip_prefix(k): v for k, v in state_dict.items()}
    ignored = tuple(k for k in state_dict if k.endswith(IGNORED_SUFFIX))
    source = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIX)}
    template = _variables_tree(variables_template)
    if layout == AUTO:
        layout = detect_layout(source, model_name, template)
    targets = _plan(model_name, layout, template)
    where = f"the {layout} layout of {model_name}"
    converted = {"params": {}, "batch_stats": {}}
    for n, target in enumerate(targets):
        name = "/".join((target.collection, *target.path))
        if target.key not in source:
            missing = sum(t.key not in source for t in targets[n:]) - 1
            others = f" (and {missing} other keys)" if missing else ""
            raise ValueError(
                f"The checkpoint lacks key {target.key!r}{others}, which {where} needs for {name}."
            )
        array = np.asarray(source[target.key])
        expected = _torch_shape(target.shape) if target.transpose else target.shape
        if array.shape != expected:
            raise ValueError(
                f"Checkpoint key {target.key!r} has shape {array.shape}, but {where} needs "
                f"{expected} for {name}."
            )
        array = _to_ours(array) if target.transpose else array
        converted[target.collection][target.path] = np.ascontiguousarray(array, target.dtype)
    used = {t.key for t in targets}
    unexpected = [k for k in source if k not in used]
    if unexpected:
        raise ValueError(
            f"Checkpoint key {unexpected[0]!r} (of {len(unexpected)} unused keys) has no place "
            f"in {where}."
        )
    untouched = tuple(
        "/".join(("params", *path))
        for path in traverse_util.flatten_dict(template["params"])
        if path not in converted["params"]
    )
    return Conversion(
        params=traverse_util.unflatten_dict(converted["params"]),
        batch_stats=traverse_util.unflatten_dict(converted["batch_stats"]),
        untouched=untouched,
        layout=layout,
        ignored=ignored,
    )


def load_pretrained(
    path: str | pathlib.Path, model: str | nn.Module, variables: Mapping, *, layout: str = AUTO
) -> dict:
    """``variables`` with its float weights and BN statistics replaced by the checkpoint's.

    Everything else (quantizer scales, ``quant_stats``, ``oscillation``) is kept as it is;
    calibrate the quantizers afterwards. See :func:`convert_state_dict` for the arguments.
    """
    conversion = convert_state_dict(load_torch_state_dict(path), model, variables, layout)
    log.info("Loaded %s into %s: %s", path, model_name_of(model), conversion.summary())
    merged = _variables_tree(variables)
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(merged.get(collection, {}))
        new = traverse_util.flatten_dict(getattr(conversion, collection))
        flat.update({k: jnp.asarray(v) for k, v in new.items()})
        merged[collection] = traverse_util.unflatten_dict(flat)
    return merged


def save_converted(path: str | pathlib.Path, conversion: Conversion) -> None:
    """Writes the converted weights as an ``.npz`` in the ``converted`` layout."""
    arrays = {
        "/".join((collection, *k)): v
        for collection in ("params", "batch_stats")
        for k, v in traverse_util.flatten_dict(getattr(conversion, collection)).items()
    }
    np.savez(path, **arrays)


# --------------------------------------------------------------------------- command


def _template(model_name: str, num_classes: int, width_multiplier: float) -> dict:
    """Variable shapes of the float model ``model_name`` (no arrays are allocated)."""
    model = create_model(
        model_name,
        num_classes=num_classes,
        quant_setup=FLOAT_SETUP,
        width_multiplier=width_multiplier,
    )
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, QuantContext.create("float_eval"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oscqat_jax.convert --model=NAME [--layout=L] SRC DST.npz``."""
    parser = argparse.ArgumentParser(
        prog="python -m oscqat_jax.convert",
        description="Convert a PyTorch checkpoint into an .npz of oscqat_jax float weights.",
    )
    parser.add_argument("--model", required=True, choices=list(MODELS), help="registry name")
    parser.add_argument(
        "--layout",
        default=AUTO,
        choices=LAYOUTS,
        help="key layout of SRC (default: detected from its keys)",
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--width-multiplier", type=float, default=1.0)
    parser.add_argument("src", help=".pth, .pt, .pth.tar, .safetensors or .npz checkpoint")
    parser.add_argument("dst", help="output .npz")
    args = parser.parse_args(argv)
    try:
        template = _template(args.model, args.num_classes, args.width_multiplier)
        state_dict = load_torch_state_dict(args.src)
        conversion = convert_state_dict(state_dict, args.model, template, args.layout)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_converted(args.dst, conversion)
    print(f"{args.src} -> {args.dst} ({args.model})\n{conversion.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
