"""ResNet-18 and ResNet-50 (He et al., 2016; torchvision's v1.5) as plain Flax models.

The architecture of torchvision's ``resnet18`` (11,689,512 parameters at 1000 classes) and
``resnet50`` (25,557,032), which the reference quantizes: 7x7 stem with max pooling, basic
blocks (18) or bottlenecks with the stride on the 3x3 conv (50), a 1x1 conv + BN shortcut
where the shape changes, global average pooling. The paper uses ResNet-18 as the contrast
case where oscillations matter little.

The network is written with ``ConvBN``, ``nn.Dense`` and ``ActQuant`` hooks and quantized by
rules (:meth:`ResNet.quant_sites`). Module tree (``i`` = stage 1..4, ``j`` = block in the
stage):

- ``conv1``, ``layeri_j/{conv1, conv2[, conv3], downsample}``: ConvBN (``conv/kernel``,
  ``bn/...``), each followed by its output hook ``<name>_out``;
- ``layeri_j/residual``: the hook on ``relu(residual + shortcut)``; the last block's also
  re-quantizes the pooled features (the reference's tied quantizer);
- ``fc`` (dense) and its hook ``fc_out`` (the logits).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from oscqat_jax.models.layers import (
    ModuleDef,
    conv_bn_act,
    conv_bn_factory,
    dense_act,
    dropout,
    pool_and_requantize,
)
from oscqat_jax.nn.intercept import ActQuant
from oscqat_jax.nn.setup_rules import ModelSites

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
    conv_bn: ModuleDef

    def setup(self):
        self.residual = ActQuant()  # reached by the model for the pooled features

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        relu = jax.nn.relu
        block = functools.partial(conv_bn_act, self.conv_bn, train=train)
        out_features = self.planes * (4 if self.bottleneck else 1)
        if self.bottleneck:
            y = block(x, "conv1", self.planes, 1, activation=relu)
            y = block(y, "conv2", self.planes, 3, strides=self.strides, activation=relu)
            y = block(y, "conv3", out_features, 1)
        else:
            y = block(x, "conv1", self.planes, 3, strides=self.strides, activation=relu)
            y = block(y, "conv2", out_features, 3)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = block(x, "downsample", out_features, 1, strides=self.strides)
        return self.residual(relu(y + shortcut))


class ResNet(nn.Module):
    """ResNet classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      depth: 18 or 50 (basic blocks or bottlenecks, and the stage sizes of :data:`DEPTHS`).
      num_classes: output classes.
      width_multiplier: scales every stage's and the stem's channels (1.0 is torchvision's).
      dropout_rate: dropout before ``fc`` while training (torchvision has none).
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
      stage_sizes: blocks per stage (None: those of ``depth``); fewer make cheaper tests.
    """

    depth: int = 18
    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    stage_sizes: tuple[int, ...] | None = None

    def _stage_sizes(self) -> tuple[int, ...]:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be 18 or 50, got {self.depth!r}.")
        return DEPTHS[self.depth] if self.stage_sizes is None else tuple(self.stage_sizes)

    def quant_sites(self) -> ModelSites:
        """Where the paper's roles are, for :func:`~oscqat_jax.nn.setup_rules.setup_rules`:
        the activations feeding the pooling are the last block's last conv output and sum."""
        sizes = self._stage_sizes()
        last = f"layer{len(sizes)}_{sizes[-1] - 1}"
        last_conv = "conv3" if self.depth == 50 else "conv2"
        return ModelSites(
            first_conv="conv1",
            classifier="fc",
            head_output=f"{last}/({last_conv}_out|residual)",
            logits="fc_out",
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        sizes = self._stage_sizes()
        conv_bn = conv_bn_factory(self)
        stem = scaled_channels(STEM_CHANNELS, self.width_multiplier)
        x = conv_bn_act(
            conv_bn, x, "conv1", stem, 7, strides=2, activation=jax.nn.relu, train=train
        )
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (blocks, planes) in enumerate(zip(sizes, STAGE_CHANNELS, strict=True), start=1):
            for j in range(blocks):
                block = ResidualBlock(
                    planes=scaled_channels(planes, self.width_multiplier),
                    strides=2 if j == 0 and i > 1 else 1,
                    bottleneck=self.depth == 50,
                    conv_bn=conv_bn,
                    name=f"layer{i}_{j}",
                )
                x = block(x, train)
        x = pool_and_requantize(x, block.residual)
        x = dropout(x, self.dropout_rate, train=train)
        return dense_act(x, "fc", self.num_classes, dtype=self.dtype)
