"""MobileNetV3-Small and -Large (Howard et al., 2019) as plain Flax models; NHWC input.

The architecture of torchvision's ``mobilenet_v3_small`` (2,542,856 parameters at 1000
classes) and ``mobilenet_v3_large`` (5,483,032): hard-swish, squeeze-excite with a
hard-sigmoid gate, BatchNorm eps 1e-3 and PyTorch momentum 0.01 (Flax 0.99), PyTorch-style
symmetric padding, global average pooling. Dropout (torchvision: 0.2) defaults to 0.0 here,
as in the reference's QAT fine-tuning of the other families. The reference code has no
MobileNetV3.

The network is written with ``ConvBN``, ``nn.Conv``/``nn.Dense`` and ``ActQuant`` hooks and
quantized by rules (:meth:`MobileNetV3.quant_sites`). Module tree (``i`` = 1..11 Small, 1..15
Large, ``N`` = the head, 12 Small, 16 Large):

- ``features_0``, ``features_i/{expand, depthwise, project}``, ``features_N``: ConvBN, each
  followed by its output hook ``<name>_out``;
- ``features_i/se/{fc1, fc2}``: squeeze-excite 1x1 convs with bias (no BN), each followed by
  its hook ``<name>_out``; the gating product is not quantized;
- ``features_i/residual``: the hook on a residual sum;
- ``classifier_0`` (dense + hard-swish), ``classifier_3`` (the logits), each with its hook.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from oscqat_jax.models.layers import (
    CONV_INIT,
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
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        for name, features, activation in (
            ("fc1", self.squeeze, jax.nn.relu),
            ("fc2", x.shape[-1], jax.nn.hard_sigmoid),
        ):
            conv = nn.Conv(
                features, (1, 1), padding=0, kernel_init=CONV_INIT, dtype=self.dtype, name=name
            )
            scale = ActQuant(name=f"{name}_out")(activation(conv(scale)))
        return x * scale


class InvertedResidualV3(nn.Module):
    """[Expand 1x1] -> depth-wise kxk -> [squeeze-excite] -> project 1x1 (linear) [+ input].

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``; channels already scaled.
    """

    spec: BlockSpec
    conv_bn: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        spec, in_features = self.spec, x.shape[-1]
        act = jax.nn.hard_swish if spec.hard_swish else jax.nn.relu
        block = functools.partial(conv_bn_act, self.conv_bn, train=train)
        y = x
        if spec.expanded != in_features:
            y = block(y, "expand", spec.expanded, 1, activation=act)
        y = block(
            y,
            "depthwise",
            spec.expanded,
            spec.kernel_size,
            strides=spec.strides,
            groups=spec.expanded,
            activation=act,
        )
        if spec.use_se:
            y = SqueezeExcite(make_divisible(spec.expanded // 4), self.dtype, name="se")(y)
        y = block(y, "project", spec.features, 1)
        if spec.strides == 1 and in_features == spec.features:
            y = ActQuant(name="residual")(y + x)
        return y


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier: ``(N, H, W, 3) -> (N, num_classes)`` logits, H, W >= 32.

    Attributes:
      variant: ``"small"`` or ``"large"``.
      num_classes: output classes.
      width_multiplier: channel multiplier (torchvision's rounding to multiples of 8; the
        last hidden dense layer is scaled too).
      dropout_rate: dropout before the last dense layer while training.
      bn_momentum: BatchNorm momentum, Flax convention (torchvision's 0.01 is 0.99).
      bn_epsilon: BatchNorm epsilon (torchvision: 1e-3).
      dtype: compute dtype (None: float32).
      depthwise_impl: depth-wise conv implementation (see ``oscqat_jax.nn.depthwise``).
      block_setting: the blocks (None: the variant's :data:`SETTINGS`); fewer make cheaper
        tests.
    """

    variant: str = "large"
    num_classes: int = 1000
    width_multiplier: float = 1.0
    dropout_rate: float = 0.0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    depthwise_impl: str = "auto"
    block_setting: tuple[BlockSpec, ...] | None = None

    def _setting(self) -> tuple[BlockSpec, ...]:
        if self.variant not in SETTINGS:
            raise ValueError(f"variant must be 'small' or 'large', got {self.variant!r}.")
        return SETTINGS[self.variant] if self.block_setting is None else self.block_setting

    def quant_sites(self) -> ModelSites:
        """Where the paper's roles are, for :func:`~oscqat_jax.nn.setup_rules.setup_rules`."""
        return ModelSites(
            first_conv="features_0",
            classifier="classifier_3",
            head_output=f"features_{len(self._setting()) + 1}_out",
            logits="classifier_3_out",
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        setting = self._setting()
        conv_bn = conv_bn_factory(self)

        def scaled(channels: int) -> int:
            return make_divisible(channels * self.width_multiplier)

        x = conv_bn_act(
            conv_bn,
            x,
            "features_0",
            scaled(STEM_CHANNELS),
            3,
            strides=2,
            activation=jax.nn.hard_swish,
            train=train,
        )
        for index, spec in enumerate(setting, start=1):
            spec = spec._replace(expanded=scaled(spec.expanded), features=scaled(spec.features))
            x = InvertedResidualV3(spec, conv_bn, self.dtype, name=f"features_{index}")(x, train)
        head = f"features_{len(setting) + 1}"
        x = conv_bn(6 * scaled(setting[-1].features), (1, 1), padding=0, name=head)(x, train)
        head_hook = ActQuant(name=f"{head}_out")
        x = pool_and_requantize(head_hook(jax.nn.hard_swish(x)), head_hook)
        x = dense_act(
            x,
            "classifier_0",
            scaled(LAST_CHANNELS[self.variant]),
            dtype=self.dtype,
            activation=jax.nn.hard_swish,
        )
        x = dropout(x, self.dropout_rate, train=train)
        return dense_act(x, "classifier_3", self.num_classes, dtype=self.dtype)
