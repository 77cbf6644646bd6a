"""EfficientNet-lite0..4 (TensorFlow's edge variants, as timm builds them) as plain Flax models.

The architecture of timm's ``efficientnet_lite{0..4}`` (lite0: 4,652,008 parameters at 1000
classes), which the reference quantizes: ReLU6, no squeeze-excite, stem (32) and head (1280)
channels not scaled, first and last stage depths not scaled, PyTorch-style symmetric padding,
BatchNorm eps 1e-5. Variants differ by ``(channel multiplier, depth multiplier, input size)``
in :data:`VARIANTS`; ``width_multiplier`` multiplies the variant's channel multiplier. Dropout
defaults to 0.0 as in the reference's timm model (timm's ``drop_rate`` default).

The network is written with ``ConvBN``, ``nn.Dense`` and ``ActQuant`` hooks and quantized by
rules (:meth:`EfficientNetLite.quant_sites`). Module tree (``s`` = stage 0..6, ``b`` = block in
the stage; stage 0 is depth-wise separable, the rest inverted residuals):

- ``conv_stem``, ``blocks_s_b/{conv_pw, conv_dw, conv_pwl}``, ``conv_head``: ConvBN, each
  followed by its output hook ``<name>_out``;
- ``blocks_s_b/residual``: the hook on a residual sum;
- ``classifier`` (dense) and its hook ``classifier_out`` (the logits).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from oscqat_jax.models.layers import (
    ModuleDef,
    conv_bn_act,
    conv_bn_factory,
    dense_act,
    dropout,
    make_divisible,
    pool_and_requantize,
)
from oscqat_jax.nn.intercept import ActQuant
from oscqat_jax.nn.setup_rules import ModelSites


class Variant(NamedTuple):
    """Scaling coefficients of one EfficientNet-lite."""

    channel_multiplier: float
    depth_multiplier: float
    input_size: int  # the resolution it was trained at


VARIANTS = {
    "lite0": Variant(1.0, 1.0, 224),
    "lite1": Variant(1.0, 1.1, 240),
    "lite2": Variant(1.1, 1.2, 260),
    "lite3": Variant(1.2, 1.4, 280),
    "lite4": Variant(1.4, 1.8, 300),
}


class StageSpec(NamedTuple):
    """One stage before scaling: (repeats, kernel, first stride, expansion, output channels)."""

    repeats: int
    kernel_size: int
    strides: int
    expand_ratio: int
    features: int


STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def stage_repeats(stages: tuple[StageSpec, ...], depth_multiplier: float) -> tuple[int, ...]:
    """Blocks per stage: ``ceil(repeats * depth_multiplier)``, first and last stage fixed."""
    last = len(stages) - 1
    return tuple(
        s.repeats if i in (0, last) else int(math.ceil(s.repeats * depth_multiplier))
        for i, s in enumerate(stages)
    )


class Block(nn.Module):
    """Depth-wise separable (``expand_ratio`` 1: depth-wise kxk ReLU6, point-wise 1x1) or
    inverted residual (expand 1x1 ReLU6, depth-wise kxk ReLU6, project 1x1), + input when
    the shape allows; ``(N, H, W, C) -> (N, H / strides, W / strides, features)``."""

    features: int
    kernel_size: int
    strides: int
    expand_ratio: int
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_features, relu6 = x.shape[-1], jax.nn.relu6
        block = functools.partial(conv_bn_act, self.conv_bn, train=train)
        depthwise = functools.partial(
            block, name="conv_dw", kernel_size=self.kernel_size, strides=self.strides
        )
        if self.expand_ratio == 1:
            y = depthwise(x, features=in_features, groups=in_features, activation=relu6)
            y = block(y, "conv_pw", self.features, 1)
        else:
            hidden = make_divisible(in_features * self.expand_ratio)
            y = block(x, "conv_pw", hidden, 1, activation=relu6)
            y = depthwise(y, features=hidden, groups=hidden, activation=relu6)
            y = block(y, "conv_pwl", self.features, 1)
        if self.strides == 1 and in_features == self.features:
            y = ActQuant(name="residual")(y + x)
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-lite classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      variant: ``"lite0"`` .. ``"lite4"`` (see :data:`VARIANTS`).
      num_classes: output classes.
      width_multiplier: extra channel multiplier on top of the variant's.
      dropout_rate: dropout before the classifier while training.
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
      stages: the stages before scaling (None: :data:`STAGES`); fewer make cheaper tests.
    """

    variant: str = "lite0"
    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    depthwise_impl: str = "auto"
    stages: tuple[StageSpec, ...] | None = None

    def quant_sites(self) -> ModelSites:
        """Where the paper's roles are, for :func:`~oscqat_jax.nn.setup_rules.setup_rules`."""
        return ModelSites(
            first_conv="conv_stem",
            classifier="classifier",
            head_output="conv_head_out",
            logits="classifier_out",
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        variant, stages = VARIANTS[self.variant], self.stages or STAGES
        multiplier = variant.channel_multiplier * self.width_multiplier
        conv_bn = conv_bn_factory(self)
        x = conv_bn_act(
            conv_bn,
            x,
            "conv_stem",
            STEM_CHANNELS,
            3,
            strides=2,
            activation=jax.nn.relu6,
            train=train,
        )
        repeats = stage_repeats(stages, variant.depth_multiplier)
        for s, (stage, count) in enumerate(zip(stages, repeats, strict=True)):
            for b in range(count):
                x = Block(
                    features=make_divisible(stage.features * multiplier),
                    kernel_size=stage.kernel_size,
                    strides=stage.strides if b == 0 else 1,
                    expand_ratio=stage.expand_ratio,
                    conv_bn=conv_bn,
                    name=f"blocks_{s}_{b}",
                )(x, train)
        x = conv_bn(HEAD_CHANNELS, (1, 1), padding=0, name="conv_head")(x, train)
        head_hook = ActQuant(name="conv_head_out")
        x = pool_and_requantize(head_hook(jax.nn.relu6(x)), head_hook)
        x = dropout(x, self.dropout_rate, train=train)
        return dense_act(x, "classifier", self.num_classes, dtype=self.dtype)
