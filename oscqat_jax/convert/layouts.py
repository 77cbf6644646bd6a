"""Key layouts of pretrained checkpoints: where each of our layers sits in a PyTorch state dict.

A mapper takes the module path of one of our layers (a ``ConvBN``, whose params hold
``conv/kernel`` and ``bn/...``, or a conv or dense layer holding a ``kernel``) and the plain
model's params tree, and returns the PyTorch prefix of the layer's conv or linear and of its
BatchNorm (None when the layer has none). The layouts of each model family are in the table
of :mod:`oscqat_jax.convert`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import traverse_util

from oscqat_jax import models as families

TreePath = tuple[str, ...]
LayerNames = tuple[str, str | None]
Mapper = Callable[[TreePath, Mapping], LayerNames]

CONVERTED = "converted"
AUTO = "auto"
LAYOUTS = ("reference", "torchvision", "timm", CONVERTED, AUTO)
"""Every ``layout`` value the converter accepts."""


def _numbers(name: str, stem: str) -> list[int]:
    """``_numbers("layer2_1", "layer") == [2, 1]``."""
    return [int(n) for n in name.removeprefix(stem).strip("_").split("_")]


def _present(block: Mapping, order: Sequence[str]) -> list[str]:
    return [name for name in order if name in block]


def _mobilenet_v2(path: TreePath, params: Mapping, *, flat_blocks: bool) -> LayerNames:
    """Both MobileNetV2 layouts; they differ only inside an inverted-residual block's ``conv``.

    ``flat_blocks`` (the reference, tonylins): ``conv`` is a flat Sequential of (conv, bn,
    relu6) triples. Otherwise (torchvision): Conv2dNormActivation (conv ``.0``, bn ``.1``) for
    expand and depth-wise, then the projection conv and its BN as two plain entries.
    """
    if path == ("classifier",):
        return "classifier.1", None
    (i,) = _numbers(path[0], "features")
    if len(path) == 1:
        return f"features.{i}.0", f"features.{i}.1"
    position = _present(params[path[0]], ("expand", "depthwise", "project")).index(path[1])
    block = f"features.{i}.conv"
    if flat_blocks:
        return f"{block}.{3 * position}", f"{block}.{3 * position + 1}"
    if path[1] == "project":
        return f"{block}.{position}", f"{block}.{position + 1}"
    return f"{block}.{position}.0", f"{block}.{position}.1"


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


FAMILIES: dict[str, dict[str, Mapper]] = {
    "mobilenet_v2": {
        "reference": functools.partial(_mobilenet_v2, flat_blocks=True),
        "torchvision": functools.partial(_mobilenet_v2, flat_blocks=False),
    },
    "mobilenet_v3": {"torchvision": _mobilenet_v3_torchvision},
    "resnet": {"torchvision": _resnet_torchvision, "reference": _resnet_torchvision},
    "efficientnet_lite": {"timm": _efficientnet_lite_timm, "reference": _efficientnet_lite_timm},
}
"""Model family (a prefix of the model name) -> layout -> mapper."""


def model_name_of(model: str | nn.Module) -> str:
    """The registry name of ``model``: itself if a string, else that of the plain model's
    class and fixed attributes (e.g. ``mobilenet_v3_small`` for
    ``MobileNetV3(variant="small")``, :func:`oscqat_jax.models.model_name_of`)."""
    if isinstance(model, str):
        return model
    return families.model_name_of(model)


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


def mapper_of(model_name: str, layout: str) -> Mapper | None:
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


def with_plain_paths(state_dict: Mapping[str, Any]) -> dict:
    """``state_dict`` with the keys of a ``converted`` file written for the ctx models (a
    conv's kernel at ``params/<layer>/kernel`` beside ``<layer>/bn``) moved to the plain
    models' paths (``params/<layer>/conv/kernel``, :func:`oscqat_jax.models.from_package`),
    so such files still load; keys of PyTorch layouts and of the plain paths are kept."""
    trees: dict[str, dict] = {}
    for key, value in state_dict.items():
        collection, _, path = key.partition("/")
        if collection in ("params", "batch_stats") and path:
            trees.setdefault(collection, {})[tuple(path.split("/"))] = value
    if not trees:
        return dict(state_dict)
    mapped = families.from_package({c: traverse_util.unflatten_dict(t) for c, t in trees.items()})
    out = {k: v for k, v in state_dict.items() if k.partition("/")[0] not in trees}
    for collection, tree in mapped.items():
        for path, value in traverse_util.flatten_dict(tree).items():
            out["/".join((collection, *path))] = value
    return out
