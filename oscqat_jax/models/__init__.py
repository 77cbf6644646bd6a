"""The package's model families as plain Flax models, quantized by rules.

Each model is an ordinary ``flax.linen.Module``, called as
``model.apply(variables, images, train=train)``; :func:`quantize` gives it the quantizers
of a :class:`QuantSetup` through the rules interceptor (:func:`oscqat_jax.nn.quantize_model`),
using the sites the model declares (``model.quant_sites()``). :data:`MODELS` and
:func:`create_model` build them by name (:mod:`~oscqat_jax.models.registry`);
:func:`~oscqat_jax.models.mapping.from_package` maps variables in the layout of the
former ctx models (files converted before the plain models) onto these.

Example::

    model = MobileNetV2(num_classes=10, block_setting=SMALL_INPUT_SETTING)
    qmodel = quantize(model, QuantSetup("LSQ_paper", n_bits=4))
    variables = qmodel.calibrate(qmodel.init(key, images), batches, train=False)
    logits = qmodel.apply(variables, images)
"""

from __future__ import annotations

from oscqat_jax.models.efficientnet_lite import EfficientNetLite
from oscqat_jax.models.mapping import from_package
from oscqat_jax.models.mobilenet_v2 import MobileNetV2
from oscqat_jax.models.mobilenet_v3 import MobileNetV3
from oscqat_jax.models.registry import MODELS, create_model, model_name_of
from oscqat_jax.models.resnet import ResNet
from oscqat_jax.nn.intercept import QuantizedModel, quantize_model
from oscqat_jax.nn.setup_rules import setup_rules
from oscqat_jax.nn.setups import QuantSetup


def quantize(
    model, setup: QuantSetup | str, *, fold_bn: bool = False, depthwise_impl: str | None = None
) -> QuantizedModel:
    """``model`` (a plain family model) quantized as ``setup`` says (a :class:`QuantSetup` or
    a setup name), BN folded into the quantized kernels when ``fold_bn``. Quantized
    depth-wise convs use ``depthwise_impl`` (default: the model's own)."""
    if isinstance(setup, str):
        setup = QuantSetup(name=setup)
    rules = setup_rules(setup, model.quant_sites(), fold_bn=fold_bn)
    impl = getattr(model, "depthwise_impl", "auto") if depthwise_impl is None else depthwise_impl
    return quantize_model(model, rules, depthwise_impl=impl)


__all__ = [
    "MODELS",
    "EfficientNetLite",
    "MobileNetV2",
    "MobileNetV3",
    "ResNet",
    "create_model",
    "from_package",
    "model_name_of",
    "quantize",
]
