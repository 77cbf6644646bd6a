"""The conversion itself: a state dict placed into a model's ``params`` and ``batch_stats``.

The rules and the layouts are in :mod:`oscqat_jax.convert`; :mod:`.layouts` holds the key
mappers and :mod:`oscqat_jax.weight_files` reads and writes the files.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oscqat_jax import models as families
from oscqat_jax import weight_files
from oscqat_jax.convert.layouts import (
    AUTO,
    LAYOUTS,
    TreePath,
    layouts_of,
    mapper_of,
    model_name_of,
    with_plain_paths,
)
from oscqat_jax.nn.quantizer import is_quantizer_param

StateDict = weight_files.StateDict
DATA_PARALLEL_PREFIX = "module."
IGNORED_SUFFIX = ".num_batches_tracked"

log = logging.getLogger(__package__)


def load_torch_state_dict(path: str | os.PathLike) -> StateDict:
    """The tensors of a checkpoint file as ``{key: numpy array}``, ``module.`` prefixes removed.

    ``.pth``/``.pt``/``.pth.tar`` (also ``.tar``/``.bin``): a PyTorch state dict, or a dict
    holding one under ``state_dict``, ``model_state_dict`` or ``model``; read with torch
    (imported only then) and ``weights_only=True``, so a file cannot run code. Floating
    tensors become float32. ``.safetensors`` and ``.npz`` are read without torch.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if weight_files.format_of(path) is None:
        raise ValueError(
            f"Checkpoint {path} has an unknown suffix; use one of "
            f"{', '.join(weight_files.SUFFIXES)}."
        )
    tensors, _ = weight_files.read(path)
    return {_strip_prefix(k): v for k, v in tensors.items()}


def _strip_prefix(key: str) -> str:
    return key.removeprefix(DATA_PARALLEL_PREFIX)


# --------------------------------------------------------------------------- the plan


class _Target(NamedTuple):
    """One float-weight leaf of our variables and the source key that fills it."""

    collection: str  # "params" or "batch_stats"
    path: TreePath  # in the collection, e.g. ("features_1", "depthwise", "conv", "kernel")
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
    ("params", ("conv", "kernel"), "conv", "weight"),
    ("params", ("kernel",), "conv", "weight"),
    ("params", ("bias",), "conv", "bias"),
    ("params", ("bn", "scale"), "bn", "weight"),
    ("params", ("bn", "bias"), "bn", "bias"),
    ("batch_stats", ("bn", "mean"), "bn", "running_mean"),
    ("batch_stats", ("bn", "var"), "bn", "running_var"),
)
"""Float-weight leaves of one layer: (collection, path in the layer, PyTorch module, name);
a ``ConvBN`` holds its conv's kernel at ``conv/kernel``, a conv or dense layer at ``kernel``."""


def _layer_of(kernel_path: TreePath, params: Mapping) -> TreePath:
    """The layer a kernel belongs to: the ``ConvBN`` around its inner ``conv`` (the module
    beside which a ``bn`` lies), else the module holding the kernel."""
    if len(kernel_path) >= 3 and kernel_path[-2] == "conv":
        layer = kernel_path[:-2]
        if (*layer, "bn", "scale") in params:
            return layer
    return kernel_path[:-1]


def _plan(model_name: str, layout: str, template: Mapping) -> list[_Target]:
    """Every float-weight leaf of ``template`` with its source key under ``layout``, in the
    order of the params tree."""
    mapper = mapper_of(model_name, layout)
    flat = {c: traverse_util.flatten_dict(template.get(c, {})) for c in ("params", "batch_stats")}
    layers = [_layer_of(path, flat["params"]) for path in flat["params"] if path[-1] == "kernel"]
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
                key, transpose = f"{prefixes[module]}.{name}", suffix[-1] == "kernel"
            targets.append(_Target(collection, path, _shape(leaf), leaf.dtype, key, transpose))
    covered = {(t.collection, t.path) for t in targets}
    leftover = [
        "/".join((collection, *path))
        for collection, leaves in flat.items()
        for path in leaves
        if (collection, path) not in covered
        and not (collection == "params" and is_quantizer_param(path[-1]))
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
    keys = set(with_plain_paths(state_dict))
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
        plain model (``oscqat_jax.models.create_model``).
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
    source = with_plain_paths(
        {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIX)}
    )
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
    path: str | os.PathLike, model: str | nn.Module, variables: Mapping, *, layout: str = AUTO
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


def save_variables(path: str | os.PathLike, variables: Mapping) -> None:
    """Writes the ``params`` and ``batch_stats`` of model ``variables`` as an uncompressed
    ``.npz`` in the ``converted`` layout (what ``model.pretrained`` reads back); as with
    ``numpy.savez``, ``.npz`` is appended to a path that does not end in it."""
    path = os.fspath(path)
    arrays = {
        "/".join((collection, *k)): np.asarray(v)
        for collection in ("params", "batch_stats")
        for k, v in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items()
    }
    weight_files.write(path if path.endswith(".npz") else f"{path}.npz", arrays, compress=False)


def save_converted(path: str | os.PathLike, conversion: Conversion) -> None:
    """Writes converted weights with :func:`save_variables`."""
    save_variables(path, {"params": conversion.params, "batch_stats": conversion.batch_stats})


# --------------------------------------------------------------------------- command


def _template(model_name: str, num_classes: int, width_multiplier: float) -> dict:
    """Variable shapes of the plain model ``model_name`` (no arrays are allocated)."""
    model = families.create_model(
        model_name, num_classes=num_classes, width_multiplier=width_multiplier
    )
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


USAGE = "python -m oscqat_jax.convert --model=NAME [--layout=L] SRC DST.npz"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one sentence on stderr (exit status 2), not the
    usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message.rstrip('.')}; usage: {USAGE} (--help for more).\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oscqat_jax.convert --model=NAME [--layout=L] SRC DST.npz``."""
    parser = _Parser(
        prog="python -m oscqat_jax.convert",
        description="Convert a PyTorch checkpoint into an .npz of oscqat_jax float weights.",
    )
    parser.add_argument(
        "--model", required=True, choices=list(families.MODELS), help="registry name"
    )
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
    if not args.dst.endswith(".npz") or os.path.isdir(args.dst):
        parser.error(f"DST must be a file name ending in .npz, got {args.dst!r}")
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
