"""Tiny models written as a user would, outside the package, for the tests that BN
re-estimation, the oscillation summaries and the exports work on any quantized model.

Each is a small CNN on 8x8 images: a stem conv, a depth-wise conv with as many outputs as
inputs (named ``mixer``, not ``depthwise``: the package must find it by its structure), a
point-wise conv, BatchNorm after each conv, global mean pooling and a dense head.

- :class:`LinenNet`: ``flax.linen`` layers and ``nn.BatchNorm(use_running_average=not train)``.
- :class:`PackageBNNet`: the same with the package's ``oscqat_jax.nn.BatchNorm``.
- :class:`NNXNet`: ``flax.nnx`` layers, the middle ones inside an ``nnx.List``.

:func:`linen_quantized` / :func:`nnx_quantized` quantize them with the paper's ``LSQ_paper``
rules at W4A4 and calibrate them on :func:`images`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from oscqat_jax.nn import nnx_quant
from oscqat_jax.nn.batchnorm import BatchNorm
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import paper_rules

CHANNELS = 8
CLASSES = 5
SHAPE = (8, 8, 3)
RULES = paper_rules("LSQ_paper", n_bits=4, first_conv="stem", classifier="head")


def images(n: int, seed: int = 0) -> jax.Array:
    """``(n, 8, 8, 3)`` float32 images, a pure function of ``seed``."""
    return jax.random.normal(jax.random.key(seed), (n, *SHAPE), jnp.float32)


class LinenNet(nn.Module):
    channels: int = CHANNELS

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.channels
        x = nn.Conv(c, (3, 3), name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        x = nn.Conv(c, (3, 3), feature_group_count=c, name="mixer")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="mixer_bn")(x))
        x = nn.Conv(2 * c, (1, 1), strides=(2, 2), name="expand")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="expand_bn")(x))
        return nn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


class PackageBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        ctx = QuantContext.create("float_train" if train else "float_eval")
        x = nn.Conv(CHANNELS, (3, 3), name="stem")(x)
        x = nn.relu(BatchNorm(name="stem_bn")(x, ctx))
        x = nn.Conv(CHANNELS, (3, 3), feature_group_count=CHANNELS, name="mixer")(x)
        x = nn.relu(BatchNorm(name="mixer_bn")(x, ctx))
        return nn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, channels: int = CHANNELS):
        c = channels
        self.stem = nnx.Conv(3, c, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)
        self.blocks = nnx.List(
            [
                nnx.Conv(c, c, (3, 3), feature_group_count=c, rngs=rngs),
                nnx.BatchNorm(c, rngs=rngs),
                nnx.Conv(c, 2 * c, (1, 1), strides=(2, 2), rngs=rngs),
                nnx.BatchNorm(2 * c, rngs=rngs),
            ]
        )
        self.head = nnx.Linear(2 * c, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.relu(self.blocks[1](self.blocks[0](x)))
        x = nnx.relu(self.blocks[3](self.blocks[2](x)))
        return self.head(x.mean(axis=(1, 2)))


def linen_quantized(model: nn.Module | None = None, seed: int = 0):
    """``(QuantizedModel, calibrated variables)`` of ``model`` (default :class:`LinenNet`)."""
    qmodel = quantize_model(model or LinenNet(), RULES)
    variables = qmodel.init(jax.random.key(seed), images(1), train=False)
    return qmodel, qmodel.calibrate(variables, [images(16, seed=1)], train=False)


def nnx_quantized(seed: int = 0, channels: int = CHANNELS) -> NNXNet:
    """An :class:`NNXNet` quantized by the same rules and calibrated on the same images."""
    model = NNXNet(nnx.Rngs(seed), channels)
    nnx_quant.quantize_nnx(model, RULES)
    return nnx_quant.calibrate_nnx(model, [images(16, seed=1)])
