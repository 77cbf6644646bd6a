"""MobileNetV2 (Sandler et al., 2018) as a plain Flax model; NHWC input, any size >= 32.

Architecture of torchvision's ``mobilenet_v2`` and of the reference's ``MobileNetV2``
(tonylins/pytorch-mobilenet-v2; identical at width 1.0: 3,504,872 parameters at 1000
classes). Differences: global average pooling instead of the reference's fixed 7x7 pool, so
any input from 32x32 up works; widths below 1.0 round channels to multiples of 8 as
torchvision does (the reference truncates ``int(c * width)``); dropout before the classifier
defaults to 0.0 as in the reference (torchvision: 0.2).

The network is written with ``ConvBN``, ``nn.Dense`` and ``ActQuant`` hooks and quantized by
rules (:meth:`MobileNetV2.quant_sites`). Module tree (``i`` = 1..17 inverted-residual blocks,
``N`` = the head, 18 at the default setting):

- ``features_0``, ``features_i/{expand, depthwise, project}``, ``features_N``: ConvBN
  (``conv/kernel``, ``bn/{scale, bias}``, ``batch_stats`` ``bn/{mean, var}``), each followed
  by its output hook ``<name>_out``;
- ``features_i/residual``: the hook on a residual sum (blocks with stride 1, equal channels);
- ``classifier`` (dense) and its hook ``classifier_out`` (the logits).
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
    make_divisible,
    pool_and_requantize,
)
from oscqat_jax.nn.intercept import ActQuant
from oscqat_jax.nn.setup_rules import ModelSites

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
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        block = functools.partial(conv_bn_act, self.conv_bn, train=train)
        y = x
        if self.expand_ratio != 1:
            y = block(y, "expand", hidden, 1, activation=jax.nn.relu6)
        y = block(
            y, "depthwise", hidden, 3, strides=self.strides, groups=hidden, activation=jax.nn.relu6
        )
        y = block(y, "project", self.features, 1)
        if self.strides == 1 and in_features == self.features:
            y = ActQuant(name="residual")(y + x)
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      num_classes: output classes.
      width_multiplier: channel multiplier (torchvision rounding to multiples of 8).
      dropout_rate: dropout before the classifier while training.
      bn_momentum: BatchNorm momentum, Flax convention (PyTorch's 0.1).
      bn_epsilon: BatchNorm epsilon.
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
      block_setting: ``(expansion t, channels c, repeats n, first stride s)`` per stage; the
        paper's Table 2 by default (:data:`SMALL_INPUT_SETTING` for 32x32 inputs).
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    depthwise_impl: str = "auto"
    block_setting: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_SETTING

    @property
    def head_index(self) -> int:
        return 1 + sum(n for _, _, n, _ in self.block_setting)

    def quant_sites(self) -> ModelSites:
        """Where the paper's roles are, for :func:`~oscqat_jax.nn.setup_rules.setup_rules`."""
        return ModelSites(
            first_conv="features_0",
            classifier="classifier",
            head_output=f"features_{self.head_index}_out",
            logits="classifier_out",
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv_bn = conv_bn_factory(self)
        width = self.width_multiplier
        stem = make_divisible(STEM_CHANNELS * width)
        x = conv_bn_act(
            conv_bn, x, "features_0", stem, 3, strides=2, activation=jax.nn.relu6, train=train
        )
        index = 1
        for t, c, n, s in self.block_setting:
            for repeat in range(n):
                x = InvertedResidual(
                    make_divisible(c * width),
                    s if repeat == 0 else 1,
                    t,
                    conv_bn,
                    name=f"features_{index}",
                )(x, train)
                index += 1
        head = f"features_{index}"
        x = conv_bn(make_divisible(LAST_CHANNELS * max(1.0, width)), (1, 1), padding=0, name=head)(
            x, train
        )
        head_hook = ActQuant(name=f"{head}_out")
        x = pool_and_requantize(head_hook(jax.nn.relu6(x)), head_hook)
        x = dropout(x, self.dropout_rate, train=train)
        return dense_act(x, "classifier", self.num_classes, dtype=self.dtype)
