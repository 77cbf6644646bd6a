"""MobileNetV2 (Sandler et al., 2018) built from quantized layers; NHWC input, any size >= 32.

Architecture of torchvision's ``mobilenet_v2`` and of the reference's ``MobileNetV2``
(tonylins/pytorch-mobilenet-v2; identical at width 1.0: 3,504,872 parameters at 1000
classes). Differences: global average pooling instead of the reference's fixed 7x7 pool, so
any input from 32x32 up works; widths below 1.0 round channels to multiples of 8 as
torchvision does (the reference truncates ``int(c * width)``); dropout before the classifier
defaults to 0.0 as in the reference (torchvision: 0.2).

Module tree and where PyTorch weights go. ``i`` = 1..17 are the inverted-residual blocks;
block 1 has expansion t=1 and no ``expand``, the others t=6. Each of our conv layers holds
``kernel`` (HWIO; PyTorch's OIHW transposed) and ``bn/{scale, bias}`` with ``batch_stats``
``bn/{mean, var}`` (PyTorch's ``weight``, ``bias``, ``running_mean``, ``running_var``):

- ``features_0``: torchvision ``features.0.0`` + ``features.0.1``; reference float model
  (tonylins checkpoint) the same.
- ``features_i/expand``: torchvision ``features.i.conv.0.0`` + ``.conv.0.1``; reference
  ``features.i.conv.0`` + ``.conv.1``.
- ``features_i/depthwise``: torchvision ``conv.1.0`` + ``conv.1.1`` (t=1: ``conv.0.0`` +
  ``conv.0.1``); reference ``conv.3`` + ``conv.4`` (t=1: ``conv.0`` + ``conv.1``).
- ``features_i/project``: torchvision ``conv.2`` + ``conv.3`` (t=1: ``conv.1`` + ``conv.2``);
  reference ``conv.6`` + ``conv.7`` (t=1: ``conv.3`` + ``conv.4``).
- ``features_18``: ``features.18.0`` + ``features.18.1`` in both.
- ``classifier`` (dense, ``kernel`` = PyTorch ``weight`` transposed, ``bias``):
  ``classifier.1`` in both.

The reference's *quantized* model (its QAT checkpoints) fuses each conv + BN (+ ReLU6) into
one module holding ``weight``, ``gamma``, ``beta``, ``running_mean``, ``running_var``:
``features.0.0``, ``features.i.conv.{0,1,2}`` (expand, depthwise, project; t=1:
``conv.{0,1}``), ``features.18.0`` and ``classifier.1``.

Quantizer variables live in the layer that owns them (``weight_scale``, ``input_scale``,
``output_scale``); a block with a residual connection (stride 1 and equal channels; at width
1.0 blocks 3, 5, 6, 8, 9, 10, 12, 13, 15, 16) holds ``residual_scale``. Roles:
``features_0`` first_conv, ``depthwise`` depthwise, ``features_18`` head, ``classifier``
classifier, ``residual`` residual, every other conv conv.
"""

from __future__ import annotations

from typing import Any

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

# (expansion t, output channels c, repeats n, first stride s) of the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# For 32x32 inputs (digits, Fashion-MNIST): the sixth stage (160 channels) at stride 1, so the
# last maps are 2x2 instead of 1x1.
SMALL_INPUT_SETTING = tuple(
    (t, c, n, 1 if c == 160 else s) for t, c, n, s in INVERTED_RESIDUAL_SETTING
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """Expand (1x1, ReLU6) -> depth-wise 3x3 (ReLU6) -> project (1x1, linear) [+ input].

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``.
    """

    features: int
    strides: int
    expand_ratio: int
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg, in_features = self.cfg, x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = cfg.conv_bn_act(self, "expand", "conv", hidden, 1, activation=jax.nn.relu6)(y, ctx)
        y = cfg.conv_bn_act(
            self,
            "depthwise",
            "depthwise",
            hidden,
            3,
            strides=self.strides,
            groups=hidden,
            activation=jax.nn.relu6,
        )(y, ctx)
        y = cfg.conv_bn_act(self, "project", "conv", self.features, 1)(y, ctx)
        if self.strides == 1 and in_features == self.features:
            y = residual_add(self, cfg, y, x, ctx)
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      num_classes: output classes.
      width_multiplier: channel multiplier (torchvision rounding to multiples of 8).
      quant_setup: assigns every layer its quantizers.
      fold_bn: fold BN into the quantized conv weights (the reference does not).
      dropout_rate: dropout before the classifier in training modes.
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
      block_setting: ``(expansion t, channels c, repeats n, first stride s)`` per stage; the
        paper's Table 2 by default. Small inputs may drop a stride (32x32 digits keep 2x2
        maps with the sixth stage at stride 1); parameter counts refer to the default.
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    quant_setup: QuantSetup = QuantSetup()
    fold_bn: bool = False
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    depthwise_impl: str = "auto"
    block_setting: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_SETTING

    @nn.compact
    def __call__(self, x: jax.Array, ctx: QuantContext) -> jax.Array:
        cfg = BlockConfig(
            self.quant_setup,
            self.fold_bn,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            self.depthwise_impl,
        )
        width = self.width_multiplier
        channels = make_divisible(STEM_CHANNELS * width)
        x = cfg.conv_bn_act(
            self, "features_0", "first_conv", channels, 3, strides=2, activation=jax.nn.relu6
        )(x, ctx)
        index = 1
        for t, c, n, s in self.block_setting:
            for repeat in range(n):
                x = InvertedResidual(
                    features=make_divisible(c * width),
                    strides=s if repeat == 0 else 1,
                    expand_ratio=t,
                    cfg=cfg,
                    name=f"features_{index}",
                )(x, ctx)
                index += 1
        head = cfg.conv_bn_act(
            self,
            f"features_{index}",
            "head",
            make_divisible(LAST_CHANNELS * max(1.0, width)),
            1,
            activation=jax.nn.relu6,
        )
        x = head(x, ctx)
        x = global_pool(
            self, cfg, x, ctx, source=head, source_quantizer="output", source_spec=head.output_quant
        )
        x = dropout(self, self.dropout_rate, x, ctx)
        return cfg.dense(self, "classifier", "classifier", self.num_classes)(x, ctx)
