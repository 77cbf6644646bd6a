"""Image classifiers built from quantized layers, and a registry to create them by name.

Every model maps an NHWC float image batch ``(N, H, W, 3)`` (H, W >= 32) and a
:class:`~oscqat_jax.nn.config.QuantContext` to logits ``(N, num_classes)``; its
``quant_setup`` decides which tensors are quantized (:mod:`oscqat_jax.nn.setups`). Each model
file documents how its module tree maps onto the torchvision/timm/reference weights.

Example::

    model = create_model("mobilenet_v2", num_classes=1000, quant_setup=QuantSetup(n_bits=4))
    variables = model.init(key, images, QuantContext.create("eval"))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from oscqat_jax.models.common import quant_plan
from oscqat_jax.models.efficientnet_lite import VARIANTS as EFFICIENTNET_LITE_VARIANTS
from oscqat_jax.models.efficientnet_lite import EfficientNetLite
from oscqat_jax.models.mobilenet_v2 import MobileNetV2
from oscqat_jax.models.mobilenet_v3 import MobileNetV3
from oscqat_jax.models.resnet import ResNet
from oscqat_jax.nn.setups import QuantSetup

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": MobileNetV2,
    "mobilenet_v3_small": functools.partial(MobileNetV3, variant="small"),
    "mobilenet_v3_large": functools.partial(MobileNetV3, variant="large"),
    **{
        f"efficientnet_{variant}": functools.partial(EfficientNetLite, variant=variant)
        for variant in EFFICIENTNET_LITE_VARIANTS
    },
    "resnet18": functools.partial(ResNet, depth=18),
    "resnet50": functools.partial(ResNet, depth=50),
}
"""Model names and their constructors."""


def _model_class(factory) -> type[nn.Module]:
    return factory.func if isinstance(factory, functools.partial) else factory


def create_model(
    name: str,
    *,
    num_classes: int,
    quant_setup: QuantSetup | str,
    width_multiplier: float = 1.0,
    fold_bn: bool = False,
    dtype: Any = None,
    **kwargs,
) -> nn.Module:
    """The model ``name`` (see :data:`MODELS`) with the given head, setup and options.

    ``quant_setup`` may be a :class:`QuantSetup` or a setup name (defaults for the rest);
    ``kwargs`` are further attributes of the model class (e.g. ``dropout_rate``,
    ``bn_momentum``).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models are {', '.join(MODELS)}.")
    if isinstance(quant_setup, str):
        quant_setup = QuantSetup(name=quant_setup)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}.")
    factory = MODELS[name]
    fields = {f.name for f in dataclasses.fields(_model_class(factory))} - {"parent", "name"}
    options = dict(
        num_classes=num_classes,
        quant_setup=quant_setup,
        width_multiplier=width_multiplier,
        fold_bn=fold_bn,
        dtype=dtype,
    )
    fixed = set(factory.keywords) if isinstance(factory, functools.partial) else set()
    unknown = sorted(set(kwargs) - (fields - fixed - set(options)))
    if unknown:
        valid = sorted(fields - fixed - set(options))
        raise ValueError(
            f"{name} has no option {', '.join(unknown)}; its options are {', '.join(valid)}."
        )
    return factory(**options, **kwargs)


__all__ = [
    "EFFICIENTNET_LITE_VARIANTS",
    "EfficientNetLite",
    "MODELS",
    "MobileNetV2",
    "MobileNetV3",
    "ResNet",
    "create_model",
    "quant_plan",
]
