"""Models and rules factories a user might name in a config (``"own_models:<name>"``), for
tests/training/test_own_model.py and test_own_nnx_model.py: Linen and NNX models that train
without BatchNorm, and one of each kind the training program must refuse at start-up."""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

from oscqat_jax.nn import QuantRule, paper_rules


class NoBatchNorm(nn.Module):
    """Conv, ReLU, pooling, dense: no BatchNorm and no training keyword."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="mid")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class NoTrainFlag(nn.Module):
    """BatchNorm fixed to running averages, and no keyword to switch it."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), name="stem")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class TwoInputs(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = True) -> jax.Array:
        return nn.Dense(self.num_classes)((x * mask).mean(axis=(1, 2)))


class NoInput(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, train: bool = True) -> jax.Array:
        return self.param("logits", nn.initializers.zeros, (1, self.num_classes))


class Tokens(nn.Module):
    """A text model: integer token ids in, no image."""

    num_classes: int

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Embed(100, 8)(tokens)
        return nn.Dense(self.num_classes)(x.mean(axis=1))


def wrong_classes(num_classes: int) -> nn.Module:
    """Logits of 3 classes whatever the data's."""
    del num_classes
    return NoBatchNorm(num_classes=3)


def not_a_module() -> int:
    return 42


def broken(num_classes: int) -> nn.Module:
    raise RuntimeError("the factory failed")


class NNXNet(nnx.Module):
    """An NNX model for 3-channel images (digits have one)."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs | None = None):
        self.head = nnx.Linear(3, num_classes, rngs=rngs or nnx.Rngs(0))

    def __call__(self, x):
        return self.head(x.mean(axis=(1, 2)))


def nnx_factory(num_classes: int, **kwargs) -> nnx.Module:
    """An NNX model seeded by the factory itself, so train.py cannot seed it (``kwargs``,
    whatever the config's, are not used)."""
    del kwargs
    return NNXNet(num_classes)


class NNXTwoInputs(nnx.Module):
    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.head = nnx.Linear(1, num_classes, rngs=rngs)

    def __call__(self, x, mask):
        return self.head((x * mask).mean(axis=(1, 2)))


class NNXNoBatchNorm(nnx.Module):
    """Conv, ReLU, pooling, linear: an NNX model without BatchNorm, layers ``stem``/``head``."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.mid = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.mid(nnx.relu(self.stem(x))))
        return self.head(x.mean(axis=(1, 2)))


NOT_CALLABLE = 7


def rules_for_no_batchnorm(n_bits: int = 4) -> tuple:
    """The paper's LSQ_paper rules for :class:`NoBatchNorm`."""
    return paper_rules("LSQ_paper", n_bits, first_conv="stem", classifier="head")


def rules_quantizing_nothing() -> list:
    return [QuantRule(".*", weight_bits=None, act_bits=None)]


def rules_matching_nothing() -> list:
    return [QuantRule("no_such_layer")]


def rules_not_rules() -> list:
    return ["stem"]
