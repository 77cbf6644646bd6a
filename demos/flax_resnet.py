"""A small ResNet written as in Flax's examples, with nothing of oscqat_jax in it: the model
``configs/own_model.py`` trains with ``python train.py`` to show the training program on a
model it does not know.

    python train.py --config=configs/own_model.py --workdir=/tmp/own_model

``make_model(num_classes, width, stage_sizes)`` returns the unbound ``flax.linen`` module; the
training program calls it with the config's ``model.kwargs`` and ``num_classes``, then
quantizes the result by rules over its module paths (``conv_init`` is the stem,
``head`` the classifier).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

# Flax's examples: running averages with momentum 0.9 (Flax's default, 0.99, lags far behind a
# short run's weights).
_batch_norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual connection (a 1x1 projection when the
    shape changes), as ``examples/imagenet/models.py``'s ``ResNetBlock``."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        norm = functools.partial(_batch_norm, use_running_average=not train)
        residual = x
        y = nn.Conv(self.filters, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if residual.shape != y.shape:
            residual = nn.Conv(
                self.filters, (1, 1), (self.strides, self.strides), use_bias=False, name="proj"
            )(residual)
            residual = norm(name="proj_bn")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """``(N, H, W, C)`` float images -> ``(N, num_classes)`` logits."""

    num_classes: int
    width: int = 16  # channels of the stem and the first stage (doubled per stage)
    stage_sizes: Sequence[int] = (1, 1)  # BasicBlocks per stage

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(_batch_norm(use_running_average=not train, name="bn_init")(x))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(self.width * 2**i, strides)(x, train=train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def make_model(num_classes: int, width: int = 16, stage_sizes: Sequence[int] = (1, 1)) -> ResNet:
    """The ResNet for ``num_classes`` classes (``width``, ``stage_sizes``: see :class:`ResNet`)."""
    return ResNet(num_classes=num_classes, width=width, stage_sizes=tuple(stage_sizes))
