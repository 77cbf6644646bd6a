"""A small CNN written with ``flax.nnx``, with nothing of oscqat_jax in it: the model
``configs/own_nnx_model.py`` trains with ``python train.py`` to show the training program on
an NNX model it does not know.

    python train.py --config=configs/own_nnx_model.py --workdir=/tmp/own_nnx_model

``make_model(num_classes, width, depth, *, rngs)`` returns the ``nnx.Module``; the training
program calls it with the config's ``model.kwargs``, ``num_classes`` and an ``nnx.Rngs`` of
the run's seed, then quantizes it in place by rules over its attribute paths (``stem`` is the
stem, ``blocks/0/conv`` ... the inner convs, ``head`` the classifier). BatchNorm switches
with ``model.train()`` / ``model.eval()``, so ``__call__`` takes only the images.
"""

from __future__ import annotations

import jax
from flax import nnx


class ConvBlock(nnx.Module):
    """3x3 conv, BatchNorm, ReLU; ``stride`` 2 halves the image."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_features, out_features, (3, 3), strides=stride, use_bias=False, rngs=rngs
        )
        # Running averages with momentum 0.9, as Flax's examples (0.99 lags a short run).
        self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


class CNN(nnx.Module):
    """``(N, H, W, C)`` float images -> ``(N, num_classes)`` logits: a stem block, ``depth``
    blocks (every other one strided, channels doubled there), global mean pooling, a dense
    classifier."""

    def __init__(
        self, num_classes: int, width: int = 8, depth: int = 2, channels: int = 1, *, rngs
    ):
        self.stem = ConvBlock(channels, width, 1, rngs=rngs)
        blocks, features = [], width
        for i in range(depth):
            out = features * 2 if i % 2 == 0 else features
            blocks.append(ConvBlock(features, out, 2 if i % 2 == 0 else 1, rngs=rngs))
            features = out
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def make_model(
    num_classes: int, width: int = 8, depth: int = 2, channels: int = 1, *, rngs: nnx.Rngs
) -> CNN:
    """The CNN for ``num_classes`` classes of ``channels``-channel images."""
    return CNN(num_classes, width, depth, channels, rngs=rngs)
