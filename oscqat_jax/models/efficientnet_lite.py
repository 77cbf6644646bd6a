"""EfficientNet-lite0..4 (TensorFlow's edge variants, as timm builds them) from quantized layers.

The architecture of timm's ``efficientnet_lite{0..4}`` (lite0: 4,652,008 parameters at 1000
classes), which the reference quantizes: ReLU6, no squeeze-excite, stem (32) and head (1280)
channels not scaled, first and last stage depths not scaled, PyTorch-style symmetric padding,
BatchNorm eps 1e-5. Variants differ by ``(channel multiplier, depth multiplier, input size)``
in :data:`VARIANTS`; ``width_multiplier`` multiplies the variant's channel multiplier. Dropout
defaults to 0.0 as in the reference's timm model (timm's ``drop_rate`` default).

Module tree and where timm's (and the reference's) weights go; ``s`` = stage 0..6, ``b`` =
block in the stage. Stage 0 is a depth-wise separable (DS) block, every later block an
inverted residual (IR). Each of our conv layers holds ``kernel`` (HWIO; PyTorch's OIHW
transposed) and ``bn/{scale, bias}`` with ``batch_stats`` ``bn/{mean, var}``:

- ``conv_stem``: timm ``conv_stem`` + ``bn1``.
- ``blocks_s_b/conv_dw``: timm ``blocks.s.b.conv_dw`` + ``bn1`` (DS) or + ``bn2`` (IR).
- ``blocks_s_b/conv_pw``: timm ``conv_pw`` + ``bn2`` (DS: the projection) or + ``bn1``
  (IR: the expansion).
- ``blocks_s_b/conv_pwl``: timm ``conv_pwl`` + ``bn3`` (IR).
- ``conv_head``: timm ``conv_head`` + ``bn2``.
- ``classifier`` (dense, ``kernel`` = ``weight`` transposed, ``bias``): timm ``classifier``.

The reference's quantized model fuses each conv + BN (+ ReLU6) into one module holding
``weight``, ``gamma``, ``beta``, ``running_mean``, ``running_var``, named ``conv_stem``,
``blocks.s.b.conv_dw`` (DS) / ``blocks.s.b.conv_dw.0`` (IR), ``blocks.s.b.conv_pw``,
``blocks.s.b.conv_pwl``, ``conv_head``, and keeps ``classifier``.

Roles: ``conv_stem`` first_conv, ``conv_dw`` depthwise, ``conv_head`` head, ``classifier``
classifier, ``residual`` (``residual_scale`` in blocks with a residual connection) residual,
other point-wise convs conv. The reference does not re-quantize the pooled features of this
model in its output-quantizing setups; here the ``pool`` role does so for every family.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from oscqat_jax.models.common import (
    BlockConfig,
    dropout,
    global_pool,
    make_divisible,
    residual_add,
)
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import QuantSetup


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


def stage_repeats(depth_multiplier: float) -> tuple[int, ...]:
    """Blocks per stage: ``ceil(repeats * depth_multiplier)``, first and last stage fixed."""
    last = len(STAGES) - 1
    return tuple(
        s.repeats if i in (0, last) else int(math.ceil(s.repeats * depth_multiplier))
        for i, s in enumerate(STAGES)
    )


class DepthwiseSeparable(nn.Module):
    """Depth-wise kxk (ReLU6) -> point-wise 1x1 (linear) [+ input]; ``(N, H, W, C) -> (N, H/s, W/s, features)``."""

    features: int
    kernel_size: int
    strides: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg, in_features = self.cfg, x.shape[-1]
        y = cfg.conv_bn_act(
            self,
            "conv_dw",
            "depthwise",
            in_features,
            self.kernel_size,
            strides=self.strides,
            groups=in_features,
            activation=jax.nn.relu6,
        )(x, ctx)
        y = cfg.conv_bn_act(self, "conv_pw", "conv", self.features, 1)(y, ctx)
        if self.strides == 1 and in_features == self.features:
            y = residual_add(self, cfg, y, x, ctx)
        return y


class InvertedResidualLite(nn.Module):
    """Expand 1x1 (ReLU6) -> depth-wise kxk (ReLU6) -> project 1x1 (linear) [+ input].

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``.
    """

    features: int
    kernel_size: int
    strides: int
    expand_ratio: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg, in_features = self.cfg, x.shape[-1]
        hidden = make_divisible(in_features * self.expand_ratio)
        y = cfg.conv_bn_act(self, "conv_pw", "conv", hidden, 1, activation=jax.nn.relu6)(x, ctx)
        y = cfg.conv_bn_act(
            self,
            "conv_dw",
            "depthwise",
            hidden,
            self.kernel_size,
            strides=self.strides,
            groups=hidden,
            activation=jax.nn.relu6,
        )(y, ctx)
        y = cfg.conv_bn_act(self, "conv_pwl", "conv", self.features, 1)(y, ctx)
        if self.strides == 1 and in_features == self.features:
            y = residual_add(self, cfg, y, x, ctx)
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-lite classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      variant: ``"lite0"`` .. ``"lite4"`` (see :data:`VARIANTS`).
      num_classes: output classes.
      width_multiplier: extra channel multiplier on top of the variant's.
      quant_setup: assigns every layer its quantizers.
      fold_bn: fold BN into the quantized conv weights.
      dropout_rate: dropout before the classifier in training modes.
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
    """

    variant: str = "lite0"
    num_classes: int = 1000
    width_multiplier: float = 1.0
    quant_setup: QuantSetup = QuantSetup()
    fold_bn: bool = False
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        cfg = BlockConfig(
            self.quant_setup,
            self.fold_bn,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            self.depthwise_impl,
        )
        variant = VARIANTS[self.variant]
        multiplier = variant.channel_multiplier * self.width_multiplier
        x = cfg.conv_bn_act(
            self, "conv_stem", "first_conv", STEM_CHANNELS, 3, strides=2, activation=jax.nn.relu6
        )(x, ctx)
        for s, (stage, repeats) in enumerate(
            zip(STAGES, stage_repeats(variant.depth_multiplier), strict=True)
        ):
            for b in range(repeats):
                common = dict(
                    features=make_divisible(stage.features * multiplier),
                    kernel_size=stage.kernel_size,
                    strides=stage.strides if b == 0 else 1,
                    cfg=cfg,
                    name=f"blocks_{s}_{b}",
                )
                if stage.expand_ratio == 1:
                    x = DepthwiseSeparable(**common)(x, ctx)
                else:
                    x = InvertedResidualLite(expand_ratio=stage.expand_ratio, **common)(x, ctx)
        head = cfg.conv_bn_act(self, "conv_head", "head", HEAD_CHANNELS, 1, activation=jax.nn.relu6)
        x = head(x, ctx)
        x = global_pool(
            self, cfg, x, ctx, source=head, source_quantizer="output", source_spec=head.output_quant
        )
        x = dropout(self, self.dropout_rate, x, ctx)
        return cfg.dense(self, "classifier", "classifier", self.num_classes)(x, ctx)
