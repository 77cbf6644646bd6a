"""Helpers shared by the tests of oscqat_jax.nn's quantizer, BatchNorm, collect and training API:
fixed pseudo-random inputs and kernels, plain Flax models quantized by rules, and their calls
compiled once."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.intercept import QuantizedModel, quantize_model
from oscqat_jax.nn.rules import QuantRule

TRACKED = (QuantRule(".*", weight_bits=4, act_bits=4, per_channel=True),)
"""A 4-bit per-channel weight (tracked and dampened) and a 4-bit input, for every site."""


def randn(seed, shape):
    # NumPy rather than jax.random: compiling threefry for every shape costs seconds on CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def kernel_init(key, shape, dtype=jnp.float32):
    """A fixed pseudo-random kernel (same reason as ``randn``)."""
    del key
    return 0.3 * randn(sum(shape), shape).astype(dtype)


@functools.cache
def _jitted(model: QuantizedModel, mode: str, mutable: tuple, static: tuple):
    def run(variables, *args, **traced):
        return model.apply(
            variables, *args, mode=mode, mutable=list(mutable), **dict(static), **traced
        )

    return jax.jit(run)


def apply(model: QuantizedModel, variables, *args, mode="eval", mutable=(), static=(), **traced):
    """``model.apply(variables, *args, mode=mode, ...)`` compiled once per model, mode, mutable
    collections and ``static`` keywords (``(name, value)`` pairs); ``traced`` keywords
    (``freeze_threshold``, ``osc_momentum``, ``train``...) are arguments of the compiled call."""
    return _jitted(model, mode, tuple(mutable), tuple(static))(variables, *args, **traced)


@functools.cache
def _jitted_init(model: QuantizedModel):
    return jax.jit(model.init)


def init(model: QuantizedModel, *args, seed=1):
    """``model.init`` compiled once per model."""
    return _jitted_init(model)(jax.random.key(seed), *args)


def replace(variables, collection, **values):
    """A copy of ``variables`` with top-level entries of ``collection`` replaced."""
    out = {k: dict(v) for k, v in variables.items()}
    out[collection].update({k: jnp.asarray(v) for k, v in values.items()})
    return out


def tracked_conv():
    """A bias-free 3x3 conv (3 -> 4 channels) quantized by :data:`TRACKED`, its input
    ``(2, 5, 5, 3)`` and its variables calibrated on that input (the conv's variables at the
    top of each collection)."""
    model = quantize_model(nn.Conv(4, (3, 3), use_bias=False, kernel_init=kernel_init), TRACKED)
    x = randn(0, (2, 5, 5, 3))
    return model, x, model.calibrate(init(model, x), [x])


def shapes_and_dtypes(tree):
    return jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree)


class Net(nn.Module):
    """A ConvBN site (3x3, 3 -> 4 channels) and a dense head over the mean-pooled features."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(4, (3, 3), kernel_init=kernel_init, name="conv")(x, train)
        return nn.Dense(2, kernel_init=kernel_init, name="head")(jnp.mean(x, axis=(1, 2)))


NET_RULES = (
    QuantRule("conv", weight_bits=4, act_bits=4, per_channel=True),
    QuantRule("head", weight_bits=8, act_bits=8, weight_symmetric=False),
)
""":class:`Net`'s conv: 4-bit per-channel weight, tracked; its head: an asymmetric 8-bit weight
(wider than the tracked 4 bits, so untracked, but dampened) and an 8-bit input."""


def quantized_net():
    """:class:`Net` quantized by :data:`NET_RULES`, an input ``(2, 5, 5, 3)`` and its
    variables calibrated on it."""
    model = quantize_model(Net(), NET_RULES)
    x = randn(0, (2, 5, 5, 3))
    return model, x, model.calibrate(init(model, x), [x])


def paper_roles(net, shape: jax.ShapeDtypeStruct) -> dict[str, str]:
    """``{site path: paper role}`` (``QuantSetup``'s roles) of every site of the plain family
    model ``net`` for inputs of ``shape``.

    The sites are found by quantizing ``net`` with one rule matching everything; the roles
    come from its declared sites (``net.quant_sites()``) and each site's structure: the stem
    and the classifier by their patterns, depth-wise convs by their shape, the conv whose
    output hook ``<p>_out`` feeds the pooling is the ``head``, every other layer a ``conv``.
    A layer's output hook ``<p>_out`` is the layer's output and not listed on its own; the
    other hooks are residual adds (``head_residual`` when they feed the pooling). The pooled
    features are re-quantized by the hook that fed the pooling, so they are no site."""
    sites = net.quant_sites()
    every = quantize_model(net, (QuantRule(".*", 8, 8, 8),)).plan(shape)
    full = lambda pattern, path: re.fullmatch(pattern, path) is not None  # noqa: E731
    out = {}
    for path, site in every.items():
        if site.kind == "hook":
            if path.endswith("_out") and path[: -len("_out")] in every:
                continue
            out[path] = "head_residual" if full(sites.head_output, path) else "residual"
        elif full(sites.first_conv, path):
            out[path] = "first_conv"
        elif full(sites.classifier, path):
            out[path] = "classifier"
        elif site.depthwise:
            out[path] = "depthwise"
        elif full(sites.head_output, f"{path}_out"):
            out[path] = "head"
        else:
            out[path] = "conv"
    return out
