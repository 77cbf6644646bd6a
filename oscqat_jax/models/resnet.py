"""ResNet-18 and ResNet-50 (He et al., 2016; torchvision's v1.5) from quantized layers; NHWC input.

The architecture of torchvision's ``resnet18`` (11,689,512 parameters at 1000 classes) and
``resnet50`` (25,557,032), which the reference quantizes: 7x7 stem with max pooling, basic
blocks (18) or bottlenecks with the stride on the 3x3 conv (50), a 1x1 conv + BN shortcut
where the shape changes, global average pooling. The paper uses ResNet-18 as the contrast
case where oscillations matter little.

Module tree and where torchvision's weights go (``i`` = stage 1..4, ``j`` = block in the
stage). Each of our conv layers holds ``kernel`` (HWIO; PyTorch's OIHW transposed) and
``bn/{scale, bias}`` with ``batch_stats`` ``bn/{mean, var}``:

- ``conv1``: torchvision ``conv1`` + ``bn1``.
- ``layeri_j/conv1``, ``conv2`` (and ``conv3`` in ResNet-50): ``layeri.j.conv1`` + ``bn1``,
  ``conv2`` + ``bn2`` (``conv3`` + ``bn3``).
- ``layeri_j/downsample``: ``layeri.j.downsample.0`` + ``downsample.1``.
- ``fc`` (dense, ``kernel`` = ``weight`` transposed, ``bias``): ``fc``.

The reference's quantized model fuses each conv + BN (+ ReLU) into one module holding
``weight``, ``gamma``, ``beta``, ``running_mean``, ``running_var``: ``features.0`` (stem),
``features.(i+1).j.features.{0,1[,2]}`` (the block's convs), ``features.(i+1).j.downsample.0``
and ``fc``.

Every block ends with ``relu(residual + shortcut)``, quantized with ``residual_scale`` in the
block (role residual; head_residual in the very last block, whose last conv is the head).
Roles: ``conv1`` first_conv, ``fc`` classifier, every other conv conv.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from oscqat_jax.models.common import BlockConfig, dropout, global_pool, residual_add
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import QuantSetup

DEPTHS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)
STEM_CHANNELS = 64


def scaled_channels(channels: int, width_multiplier: float) -> int:
    """``channels * width_multiplier`` rounded, at least 1 (torchvision's widths at 1.0)."""
    return max(1, int(channels * width_multiplier + 0.5))


class ResidualBlock(nn.Module):
    """Basic block (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion), ReLU after the add.

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, planes * expansion)``.
    """

    planes: int
    strides: int
    bottleneck: bool
    last: bool  # the model's final block: its last conv and add feed the pooling
    cfg: BlockConfig

    @property
    def out_features(self) -> int:
        return self.planes * (4 if self.bottleneck else 1)

    @property
    def residual_role(self) -> str:
        return "head_residual" if self.last else "residual"

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg, relu = self.cfg, jax.nn.relu
        last_role = "head" if self.last else "conv"
        if self.bottleneck:
            y = cfg.conv_bn_act(self, "conv1", "conv", self.planes, 1, activation=relu)(x, ctx)
            y = cfg.conv_bn_act(
                self, "conv2", "conv", self.planes, 3, strides=self.strides, activation=relu
            )(y, ctx)
            y = cfg.conv_bn_act(self, "conv3", last_role, self.out_features, 1)(y, ctx)
        else:
            y = cfg.conv_bn_act(
                self, "conv1", "conv", self.planes, 3, strides=self.strides, activation=relu
            )(x, ctx)
            y = cfg.conv_bn_act(self, "conv2", last_role, self.out_features, 3)(y, ctx)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.out_features:
            shortcut = cfg.conv_bn_act(
                self, "downsample", "conv", self.out_features, 1, strides=self.strides
            )(x, ctx)
        return residual_add(self, cfg, y, shortcut, ctx, role=self.residual_role, activation=relu)


class ResNet(nn.Module):
    """ResNet classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      depth: 18 or 50.
      num_classes: output classes.
      width_multiplier: scales every stage's and the stem's channels (1.0 is torchvision's
        network, the only width its weights load into; narrower networks of the same
        structure make cheaper tests).
      quant_setup: assigns every layer its quantizers.
      fold_bn: fold BN into the quantized conv weights.
      dropout_rate: dropout before ``fc`` in training modes (torchvision has none).
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
    """

    depth: int = 18
    num_classes: int = 1000
    width_multiplier: float = 1.0
    quant_setup: QuantSetup = QuantSetup()
    fold_bn: bool = False
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be 18 or 50, got {self.depth!r}.")
        cfg = BlockConfig(
            self.quant_setup,
            self.fold_bn,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
        )
        x = cfg.conv_bn_act(
            self,
            "conv1",
            "first_conv",
            scaled_channels(STEM_CHANNELS, self.width_multiplier),
            7,
            strides=2,
            activation=jax.nn.relu,
        )(x, ctx)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        depths = DEPTHS[self.depth]
        for i, (blocks, planes) in enumerate(zip(depths, STAGE_CHANNELS, strict=True), start=1):
            for j in range(blocks):
                block = ResidualBlock(
                    planes=scaled_channels(planes, self.width_multiplier),
                    strides=2 if j == 0 and i > 1 else 1,
                    bottleneck=self.depth == 50,
                    last=i == len(depths) and j == blocks - 1,
                    cfg=cfg,
                    name=f"layer{i}_{j}",
                )
                x = block(x, ctx)
        x = global_pool(
            self,
            cfg,
            x,
            ctx,
            source=block,
            source_quantizer="residual",
            source_spec=cfg.quant(block, "residual", block.residual_role).output,
        )
        x = dropout(self, self.dropout_rate, x, ctx)
        return cfg.dense(self, "fc", "classifier", self.num_classes)(x, ctx)
