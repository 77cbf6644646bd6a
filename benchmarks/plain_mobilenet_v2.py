"""MobileNetV2 written with plain ``flax.linen`` layers only, as a user would bring it.

The architecture of ``oscqat_jax.models.MobileNetV2`` (same stages, widths, PyTorch
padding, BatchNorm momentum and epsilon, ReLU6, global mean pooling, dense classifier), but no
package layer and no activation hook: ``model.apply(variables, x, train=...)``. The benchmark (``train_step.py``, variant ``rules``) quantizes it with
``oscqat_jax.nn.quantize_model`` and the ``LSQ_paper`` rules and times its train step against
the package's MobileNetV2.

Module paths: ``features_0/conv`` (the stem), ``features_i/{expand,depthwise,project}/conv``
with their ``bn``, ``features_<last>/conv`` (the head conv) and ``classifier``.
:class:`NNXMobileNetV2` is the same network in ``flax.nnx``, with the same paths (variant
``nnx`` of the benchmark).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax.models.layers import CONV_INIT, DENSE_INIT, make_divisible
from oscqat_jax.models.mobilenet_v2 import (
    INVERTED_RESIDUAL_SETTING,
    LAST_CHANNELS,
    STEM_CHANNELS,
)

FIRST_CONV = "features_0/conv"
CLASSIFIER = "classifier"
"""Regexes of the stem conv and the classifier for ``paper_rules``."""


class ConvBN(nn.Module):
    """A bias-free square conv with PyTorch padding, BatchNorm and an optional activation.

    ``(N, H, W, C_in) -> (N, H / strides, W / strides, features)``.
    """

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    activation: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = (self.kernel_size - 1) // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            (self.strides, self.strides),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=self.groups,
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
        )(x)
        return x if self.activation is None else self.activation(x)


class InvertedResidual(nn.Module):
    """Expand (1x1, ReLU6) -> depth-wise 3x3 (ReLU6) -> project (1x1) [+ input]."""

    features: int
    strides: int
    expand_ratio: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        hidden = int(round(x.shape[-1] * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = ConvBN(hidden, 1, activation=jax.nn.relu6, dtype=self.dtype, name="expand")(
                y, train
            )
        y = ConvBN(
            hidden,
            3,
            strides=self.strides,
            groups=hidden,
            activation=jax.nn.relu6,
            dtype=self.dtype,
            name="depthwise",
        )(y, train)
        y = ConvBN(self.features, 1, dtype=self.dtype, name="project")(y, train)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class PlainMobileNetV2(nn.Module):
    """``(N, H, W, C) -> (N, num_classes)`` logits; fields as
    ``oscqat_jax.models.MobileNetV2``."""

    num_classes: int = 1000
    width_multiplier: float = 1.0
    block_setting: tuple[tuple[int, int, int, int], ...] = INVERTED_RESIDUAL_SETTING
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = self.width_multiplier
        stem = make_divisible(STEM_CHANNELS * width)
        x = ConvBN(
            stem, 3, strides=2, activation=jax.nn.relu6, dtype=self.dtype, name="features_0"
        )(x, train)
        index = 1
        for t, c, n, s in self.block_setting:
            for repeat in range(n):
                x = InvertedResidual(
                    make_divisible(c * width),
                    s if repeat == 0 else 1,
                    t,
                    dtype=self.dtype,
                    name=f"features_{index}",
                )(x, train)
                index += 1
        x = ConvBN(
            make_divisible(LAST_CHANNELS * max(1.0, width)),
            1,
            activation=jax.nn.relu6,
            dtype=self.dtype,
            name=f"features_{index}",
        )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes, kernel_init=DENSE_INIT, dtype=self.dtype, name=CLASSIFIER
        )(x)


class _NNXConvBN(nnx.Module):
    """:class:`ConvBN` in ``flax.nnx``: ``conv`` and ``bn`` attributes, the same paths."""

    def __init__(
        self,
        in_features,
        features,
        kernel_size,
        *,
        strides=1,
        groups=1,
        activation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        pad = (kernel_size - 1) // 2
        self.conv = nnx.Conv(
            in_features,
            features,
            (kernel_size, kernel_size),
            (strides, strides),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        x = self.bn(self.conv(x))
        return x if self.activation is None else self.activation(x)


class _NNXInvertedResidual(nnx.Module):
    def __init__(self, in_features, features, strides, expand_ratio, *, dtype, rngs):
        hidden = int(round(in_features * expand_ratio))
        self.expand = nnx.data(None)
        if expand_ratio != 1:
            self.expand = _NNXConvBN(
                in_features, hidden, 1, activation=jax.nn.relu6, dtype=dtype, rngs=rngs
            )
        self.depthwise = _NNXConvBN(
            hidden,
            hidden,
            3,
            strides=strides,
            groups=hidden,
            activation=jax.nn.relu6,
            dtype=dtype,
            rngs=rngs,
        )
        self.project = _NNXConvBN(hidden, features, 1, dtype=dtype, rngs=rngs)
        self.residual = strides == 1 and in_features == features

    def __call__(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return y + x if self.residual else y


class NNXMobileNetV2(nnx.Module):
    """:class:`PlainMobileNetV2` written in ``flax.nnx`` (``model(x)``; BatchNorm follows
    ``model.train()`` / ``model.eval()``), with the same module paths."""

    def __init__(
        self,
        num_classes=1000,
        width_multiplier=1.0,
        in_features=3,
        block_setting=INVERTED_RESIDUAL_SETTING,
        dtype=None,
        *,
        rngs: nnx.Rngs,
    ):
        stem = make_divisible(STEM_CHANNELS * width_multiplier)
        layers = {
            "features_0": _NNXConvBN(
                in_features, stem, 3, strides=2, activation=jax.nn.relu6, dtype=dtype, rngs=rngs
            )
        }
        channels, index = stem, 1
        for t, c, n, s in block_setting:
            for repeat in range(n):
                out = make_divisible(c * width_multiplier)
                layers[f"features_{index}"] = _NNXInvertedResidual(
                    channels, out, s if repeat == 0 else 1, t, dtype=dtype, rngs=rngs
                )
                channels, index = out, index + 1
        last = make_divisible(LAST_CHANNELS * max(1.0, width_multiplier))
        layers[f"features_{index}"] = _NNXConvBN(
            channels, last, 1, activation=jax.nn.relu6, dtype=dtype, rngs=rngs
        )
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.feature_names = tuple(layers)
        self.classifier = nnx.Linear(
            last, num_classes, kernel_init=DENSE_INIT, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        for name in self.feature_names:
            x = getattr(self, name)(x)
        return self.classifier(jnp.mean(x, axis=(1, 2)))
