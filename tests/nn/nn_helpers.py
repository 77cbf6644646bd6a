"""Helpers shared by the tests of oscqat_jax.nn's layers, quantizer, BatchNorm and collect:
compiled-once ``init``/``apply``, fixed pseudo-random inputs and kernels, and a tiny network."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.nn.config import LayerQuant, QuantContext, QuantizerSpec
from oscqat_jax.nn.layers import QuantConv, QuantConvBN, QuantDense

W4_PC = QuantizerSpec(4, per_channel=True)
TRACKED = LayerQuant(weight=W4_PC, input=QuantizerSpec(4), track_oscillations=True)


@functools.cache
def _jitted(module, mutable, method):
    def run(variables, *args):
        return module.apply(variables, *args, mutable=list(mutable) or False, method=method)

    return jax.jit(run)


def apply(module, variables, *args, mutable=(), method=None):
    """``module.apply`` compiled once per module, mutable set and method (faster than eager)."""
    return _jitted(module, tuple(mutable), method)(variables, *args)


@functools.cache
def _jitted_init(module):
    return jax.jit(module.init)


def init(module, *args, seed=1):
    """``module.init`` compiled once per module."""
    return _jitted_init(module)(jax.random.key(seed), *args)


def ctx(mode, **kwargs):
    return QuantContext.create(mode, **kwargs)


def randn(seed, shape):
    # NumPy rather than jax.random: compiling threefry for every shape costs seconds on CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def kernel_init(key, shape, dtype=jnp.float32):
    """A fixed pseudo-random kernel (same reason as ``randn``)."""
    del key
    return 0.3 * randn(sum(shape), shape).astype(dtype)


QConv = functools.partial(QuantConv, kernel_init=kernel_init)
QConvBN = functools.partial(QuantConvBN, kernel_init=kernel_init)
QDense = functools.partial(QuantDense, kernel_init=kernel_init)


def replace(variables, collection, **values):
    """A copy of ``variables`` with top-level entries of ``collection`` replaced."""
    out = {k: dict(v) for k, v in variables.items()}
    out[collection].update({k: jnp.asarray(v) for k, v in values.items()})
    return out


def tracked_conv():
    layer = QConv(4, 3, quant=TRACKED)
    x = randn(0, (2, 5, 5, 3))
    return layer, x, init(layer, x, ctx("eval"))


def shapes_and_dtypes(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree)


class Net(nn.Module):
    """A tracked 4-bit conv with BatchNorm, then an asymmetric 8-bit dense head."""

    fold_bn: bool = False

    @nn.compact
    def __call__(self, x, context):
        x = QConvBN(4, 3, quant=TRACKED, fold_bn=self.fold_bn, name="conv")(x, context)
        asym = LayerQuant(weight=QuantizerSpec(8, symmetric=False), input=QuantizerSpec(8))
        return QDense(2, quant=asym, name="head")(jnp.mean(x, axis=(1, 2)), context)
