"""MobileNetV3-Small and -Large (Howard et al., 2019) built from quantized layers; NHWC input.

The architecture of torchvision's ``mobilenet_v3_small`` (2,542,856 parameters at 1000
classes) and ``mobilenet_v3_large`` (5,483,032): hard-swish, squeeze-excite with a
hard-sigmoid gate, BatchNorm eps 1e-3 and PyTorch momentum 0.01 (Flax 0.99), PyTorch-style
symmetric padding, global average pooling. Dropout (torchvision: 0.2) defaults to 0.0 here,
as in the reference's QAT fine-tuning of the other families. The reference code has no
MobileNetV3.

Module tree and where torchvision's weights go (``i`` = 1..11 Small, 1..15 Large; ``j`` is
the index of the sub-layer inside torchvision's ``features.i.block``, counting only those
present: expand (when the expanded width differs from the input), depthwise, squeeze-excite
(when used), project). Each conv layer holds ``kernel`` (HWIO; PyTorch's OIHW transposed)
and, where a BatchNorm follows, ``bn/{scale, bias}`` with ``batch_stats`` ``bn/{mean, var}``:

- ``features_0``: ``features.0.0`` + ``features.0.1``.
- ``features_i/expand``, ``depthwise``, ``project``: ``features.i.block.j.0`` +
  ``features.i.block.j.1``.
- ``features_i/se/fc1``, ``se/fc2`` (``kernel`` + ``bias``, no BN):
  ``features.i.block.j.fc1``, ``fc2``.
- ``features_N`` (N = 12 Small, 16 Large): ``features.N.0`` + ``features.N.1``.
- ``classifier_0`` (dense + hard-swish) and ``classifier_3`` (the logits):
  ``classifier.0`` and ``classifier.3`` (``kernel`` = ``weight`` transposed, ``bias``).

Roles: ``features_0`` first_conv, ``depthwise`` depthwise, ``features_N`` head,
``classifier_3`` classifier, ``residual`` (``residual_scale`` in blocks with a residual
connection) residual; every other conv/dense (expand, project, squeeze-excite,
``classifier_0``) is conv. The squeeze-excite gating product is not quantized.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax.models.common import (
    BlockConfig,
    dropout,
    global_pool,
    make_divisible,
    residual_add,
)
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import QuantSetup


class BlockSpec(NamedTuple):
    """One inverted residual of torchvision's configuration (channels before width scaling)."""

    kernel_size: int
    expanded: int
    features: int
    use_se: bool
    hard_swish: bool
    strides: int


# input 16 -> ...; (kernel, expanded, out, SE, hard-swish, stride).
LARGE_SETTING = (
    BlockSpec(3, 16, 16, False, False, 1),
    BlockSpec(3, 64, 24, False, False, 2),
    BlockSpec(3, 72, 24, False, False, 1),
    BlockSpec(5, 72, 40, True, False, 2),
    BlockSpec(5, 120, 40, True, False, 1),
    BlockSpec(5, 120, 40, True, False, 1),
    BlockSpec(3, 240, 80, False, True, 2),
    BlockSpec(3, 200, 80, False, True, 1),
    BlockSpec(3, 184, 80, False, True, 1),
    BlockSpec(3, 184, 80, False, True, 1),
    BlockSpec(3, 480, 112, True, True, 1),
    BlockSpec(3, 672, 112, True, True, 1),
    BlockSpec(5, 672, 160, True, True, 2),
    BlockSpec(5, 960, 160, True, True, 1),
    BlockSpec(5, 960, 160, True, True, 1),
)
SMALL_SETTING = (
    BlockSpec(3, 16, 16, True, False, 2),
    BlockSpec(3, 72, 24, False, False, 2),
    BlockSpec(3, 88, 24, False, False, 1),
    BlockSpec(5, 96, 40, True, True, 2),
    BlockSpec(5, 240, 40, True, True, 1),
    BlockSpec(5, 240, 40, True, True, 1),
    BlockSpec(5, 120, 48, True, True, 1),
    BlockSpec(5, 144, 48, True, True, 1),
    BlockSpec(5, 288, 96, True, True, 2),
    BlockSpec(5, 576, 96, True, True, 1),
    BlockSpec(5, 576, 96, True, True, 1),
)
STEM_CHANNELS = 16
LAST_CHANNELS = {"small": 1024, "large": 1280}
SETTINGS = {"small": SMALL_SETTING, "large": LARGE_SETTING}


class SqueezeExcite(nn.Module):
    """``x * hard_sigmoid(fc2(relu(fc1(mean_hw(x)))))`` with 1x1 convs; shape ``(N, H, W, C)`` kept."""

    squeeze: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg = self.cfg
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = cfg.conv_act(self, "fc1", "conv", self.squeeze, activation=jax.nn.relu)(scale, ctx)
        scale = cfg.conv_act(self, "fc2", "conv", x.shape[-1], activation=jax.nn.hard_sigmoid)(
            scale, ctx
        )
        return x * scale


class InvertedResidualV3(nn.Module):
    """[Expand 1x1] -> depth-wise kxk -> [squeeze-excite] -> project 1x1 (linear) [+ input].

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``; channels already scaled.
    """

    kernel_size: int
    expanded: int
    features: int
    use_se: bool
    hard_swish: bool
    strides: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg, in_features = self.cfg, x.shape[-1]
        act = jax.nn.hard_swish if self.hard_swish else jax.nn.relu
        y = x
        if self.expanded != in_features:
            y = cfg.conv_bn_act(self, "expand", "conv", self.expanded, 1, activation=act)(y, ctx)
        y = cfg.conv_bn_act(
            self,
            "depthwise",
            "depthwise",
            self.expanded,
            self.kernel_size,
            strides=self.strides,
            groups=self.expanded,
            activation=act,
        )(y, ctx)
        if self.use_se:
            y = SqueezeExcite(make_divisible(self.expanded // 4), cfg, name="se")(y, ctx)
        y = cfg.conv_bn_act(self, "project", "conv", self.features, 1)(y, ctx)
        if self.strides == 1 and in_features == self.features:
            y = residual_add(self, cfg, y, x, ctx)
        return y


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      variant: ``"small"`` or ``"large"``.
      num_classes: output classes.
      width_multiplier: channel multiplier (torchvision's rounding to multiples of 8; the
        last hidden dense layer is scaled too).
      quant_setup: assigns every layer its quantizers.
      fold_bn: fold BN into the quantized conv weights.
      dropout_rate: dropout before the last dense layer in training modes.
      bn_momentum: BatchNorm momentum, Flax convention (torchvision's 0.01 is 0.99).
      bn_epsilon: BatchNorm epsilon (torchvision: 1e-3).
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
    """

    variant: str = "large"
    num_classes: int = 1000
    width_multiplier: float = 1.0
    quant_setup: QuantSetup = QuantSetup()
    fold_bn: bool = False
    dropout_rate: float = 0.0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        if self.variant not in SETTINGS:
            raise ValueError(f"variant must be 'small' or 'large', got {self.variant!r}.")
        cfg = BlockConfig(
            self.quant_setup,
            self.fold_bn,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            self.depthwise_impl,
        )
        setting = SETTINGS[self.variant]

        def scaled(channels: int) -> int:
            return make_divisible(channels * self.width_multiplier)

        x = cfg.conv_bn_act(
            self,
            "features_0",
            "first_conv",
            scaled(STEM_CHANNELS),
            3,
            strides=2,
            activation=jax.nn.hard_swish,
        )(x, ctx)
        for index, spec in enumerate(setting, start=1):
            x = InvertedResidualV3(
                kernel_size=spec.kernel_size,
                expanded=scaled(spec.expanded),
                features=scaled(spec.features),
                use_se=spec.use_se,
                hard_swish=spec.hard_swish,
                strides=spec.strides,
                cfg=cfg,
                name=f"features_{index}",
            )(x, ctx)
        head = cfg.conv_bn_act(
            self,
            f"features_{len(setting) + 1}",
            "head",
            6 * scaled(setting[-1].features),
            1,
            activation=jax.nn.hard_swish,
        )
        x = head(x, ctx)
        x = global_pool(
            self, cfg, x, ctx, source=head, source_quantizer="output", source_spec=head.output_quant
        )
        x = cfg.dense(
            self,
            "classifier_0",
            "conv",
            scaled(LAST_CHANNELS[self.variant]),
            activation=jax.nn.hard_swish,
        )(x, ctx)
        x = dropout(self, self.dropout_rate, x, ctx)
        return cfg.dense(self, "classifier_3", "classifier", self.num_classes)(x, ctx)
