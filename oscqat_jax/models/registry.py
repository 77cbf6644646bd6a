"""The plain model families by name: what ``config.model.name`` and the converter's
``--model`` choose from.

Each name fixes a family and its variant (``mobilenet_v3_small`` is
``MobileNetV3(variant="small")``); :func:`create_model` builds one with the given classes and
options (the family's attributes: ``width_multiplier``, ``dtype``, ``dropout_rate``,
``block_setting``, ...) and refuses, in one sentence, a name or option the family lacks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn

from oscqat_jax.models.efficientnet_lite import VARIANTS as EFFICIENTNET_LITE_VARIANTS
from oscqat_jax.models.efficientnet_lite import EfficientNetLite
from oscqat_jax.models.mobilenet_v2 import MobileNetV2
from oscqat_jax.models.mobilenet_v3 import MobileNetV3
from oscqat_jax.models.resnet import ResNet

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
"""Model names and the plain constructors they call."""


def _parts(factory) -> tuple[type[nn.Module], dict]:
    if isinstance(factory, functools.partial):
        return factory.func, dict(factory.keywords)
    return factory, {}


def options_of(name: str) -> tuple[str, ...]:
    """The options :func:`create_model` takes for ``name`` (its family's attributes, less
    the ones the name fixes and ``num_classes``)."""
    cls, fixed = _parts(MODELS[name])
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
    return tuple(sorted(fields - set(fixed)))


def create_model(name: str, *, num_classes: int, **options) -> nn.Module:
    """The unbound plain model ``name`` (see :data:`MODELS`) with ``num_classes`` outputs and
    ``options`` (e.g. ``width_multiplier=0.5``, ``dtype=jnp.bfloat16``)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models are {', '.join(MODELS)}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    valid = options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(unknown)}; its options are {', '.join(valid)}."
        )
    width = options.get("width_multiplier", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width_multiplier must be a positive number, got {width!r}.")
    return MODELS[name](num_classes=num_classes, **options)


def model_name_of(model: nn.Module) -> str:
    """The registry name of a plain model (its class and the attributes a name fixes); one
    sentence when it is not one of :data:`MODELS`."""
    for name, factory in MODELS.items():
        cls, fixed = _parts(factory)
        if type(model) is cls and all(getattr(model, k) == v for k, v in fixed.items()):
            return name
    raise ValueError(
        f"{type(model).__name__} is not a model of oscqat_jax.models.MODELS; name one of "
        f"{', '.join(MODELS)}."
    )


__all__ = ["MODELS", "create_model", "model_name_of", "options_of"]
