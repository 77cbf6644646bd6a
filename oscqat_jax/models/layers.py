"""What the plain model families share: channel rounding, PyTorch padding, initialisers, and
the one pattern every family repeats (conv, BatchNorm, activation, output hook).

The plain models are ordinary Flax modules (``nn.Conv``, ``nn.Dense``, the package's
:class:`~oscqat_jax.nn.convbn.ConvBN` and :class:`~oscqat_jax.nn.intercept.ActQuant` hooks, a
``train`` flag); how they are quantized is decided by rules (:mod:`oscqat_jax.nn.setup_rules`).
Each model builds one ``conv_bn`` factory (:func:`conv_bn_factory`: ``ConvBN`` with the
model's dtype, BatchNorm settings and depth-wise implementation) and hands it to its blocks,
as Flax's ImageNet example hands its ``conv`` and ``norm``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.intercept import ActQuant

ModuleDef = Any
Activation = Callable[[jax.Array], jax.Array]

# torchvision's and timm's conv initialisation (Kaiming normal, fan-out); it only matters
# when training from scratch, since QAT starts from converted pretrained weights.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nn.initializers.normal(0.01)


def conv_bn_factory(model: nn.Module) -> Callable[..., ConvBN]:
    """``ConvBN`` with ``model``'s ``dtype``, ``bn_momentum``, ``bn_epsilon`` and (where the
    family has depth-wise convs) ``depthwise_impl``, and the families' conv initialiser."""
    return functools.partial(
        ConvBN,
        kernel_init=CONV_INIT,
        dtype=model.dtype,
        bn_momentum=model.bn_momentum,
        bn_epsilon=model.bn_epsilon,
        depthwise_impl=getattr(model, "depthwise_impl", "auto"),
    )


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` to ``value`` (at least ``divisor``), rounded up when
    rounding would lose more than ``1 - round_limit`` of ``value``: torchvision's
    ``_make_divisible`` and timm's ``make_divisible``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def torch_padding(kernel_size: int) -> int:
    """Symmetric padding of PyTorch's ``padding=(k - 1) // 2`` convs (differs from ``"SAME"``
    for strided convs on even inputs, so converted weights see the same pixels)."""
    return (kernel_size - 1) // 2


def conv_bn_act(
    conv_bn: ModuleDef,
    x: jax.Array,
    name: str,
    features: int,
    kernel_size: int,
    *,
    train: bool,
    strides: int = 1,
    groups: int = 1,
    activation: Activation | None = None,
) -> jax.Array:
    """``hook(activation(BN(conv(x))))``: a bias-free ``kernel_size`` conv with PyTorch padding
    (ConvBN ``name``), then ``activation``, then the output hook ``<name>_out`` (where the
    output-quantizing setups quantize; after the activation, so post-ReLU tensors get an
    unsigned grid). Call from a compact method; ``(N, H, W, C) -> (N, Ho, Wo, features)``."""
    y = conv_bn(
        features,
        (kernel_size, kernel_size),
        strides=strides,
        padding=torch_padding(kernel_size),
        feature_group_count=groups,
        name=name,
    )(x, train)
    if activation is not None:
        y = activation(y)
    return ActQuant(name=f"{name}_out")(y)


def dense_act(
    x: jax.Array,
    name: str,
    features: int,
    *,
    dtype: Any,
    activation: Activation | None = None,
) -> jax.Array:
    """``hook(activation(Dense(x)))`` with the output hook ``<name>_out``; call from a compact
    method; ``(N, C) -> (N, features)``."""
    y = nn.Dense(features, kernel_init=DENSE_INIT, dtype=dtype, name=name)(x)
    if activation is not None:
        y = activation(y)
    return ActQuant(name=f"{name}_out")(y)


def dropout(x: jax.Array, rate: float, *, train: bool) -> jax.Array:
    """Dropout while training (needs a ``"dropout"`` rng then); identity for rate 0."""
    if rate == 0:
        return x
    return nn.Dropout(rate, deterministic=not train)(x)


def pool_and_requantize(x: jax.Array, hook: ActQuant) -> jax.Array:
    """Global average pooling ``(N, H, W, C) -> (N, C)``, then the pooled features through
    ``hook``, the hook that quantized ``x``, again without updating its range (the reference's
    tied quantizers; only the output-quantizing setups quantize there, docs/method.md §4)."""
    return hook(x.mean(axis=(1, 2)), update_range=False)
