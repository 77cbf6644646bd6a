"""Tests for oscqat_jax.nn.depthwise: the shifted and grouped-conv implementations agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax.nn import depthwise
from oscqat_jax.nn.convbn import ConvBN
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import QuantRule

CASES = [
    # (input shape NHWC, kernel size, depth multiplier, strides, padding)
    ((2, 7, 7, 3), 3, 1, (1, 1), "SAME"),
    ((2, 8, 8, 4), 3, 1, (2, 2), "SAME"),
    ((1, 9, 7, 2), 5, 1, (2, 2), "SAME"),
    ((2, 8, 8, 3), 5, 1, (1, 1), "VALID"),
    ((1, 9, 9, 2), 3, 2, (2, 1), ((1, 0), (2, 1))),
    ((1, 6, 6, 2), 3, 1, (1, 1), 1),
]


@pytest.mark.parametrize("shape, k, mult, strides, padding", CASES)
def test_shifted_matches_lax_outputs_and_gradients(shape, k, mult, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1] * mult)), jnp.float32)

    def outputs_and_grads(fn):
        def loss(x, kernel):
            y = fn(x, kernel, strides=strides, padding=padding)
            # A fixed, non-uniform cotangent (NumPy: compiling jax.random is slow on CPU).
            cotangent = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
            return jnp.sum(y * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, kernel)
        return (y, *grads)

    both = jax.jit(
        lambda: (
            outputs_and_grads(depthwise.depthwise_conv_shifted),
            outputs_and_grads(depthwise.depthwise_conv_lax),
        )
    )
    shifted, lax_conv = both()
    for got, want in zip(shifted, lax_conv, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_depthwise_impl_options_give_the_same_output():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 4)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 1, 4)), jnp.float32)
    # A float ConvBN site, as the model's option.
    shifted_bn = ConvBN(4, (3, 3), strides=2, feature_group_count=4, depthwise_impl="shifted")
    variables = jax.jit(shifted_bn.init)(jax.random.key(2), x)
    variables["params"]["conv"]["kernel"] = kernel
    np.testing.assert_allclose(
        shifted_bn.apply(variables, x),
        shifted_bn.clone(depthwise_impl="lax").apply(variables, x),
        rtol=1e-5,
        atol=1e-6,
    )
    # A quantized nn.Conv, as quantize_model's option.
    conv = nn.Conv(4, (3, 3), strides=2, feature_group_count=4, use_bias=False)
    rules = (QuantRule(".*", weight_bits=4, act_bits=4),)
    shifted = quantize_model(conv, rules, depthwise_impl="shifted")
    variables = jax.jit(shifted.init)(jax.random.key(2), x)
    variables = shifted.calibrate(
        {**variables, "params": {**variables["params"], "kernel": kernel}}, [x]
    )
    lax_conv = quantize_model(conv, rules, depthwise_impl="lax")
    np.testing.assert_allclose(
        shifted.apply(variables, x), lax_conv.apply(variables, x), rtol=1e-5, atol=1e-6
    )


def test_auto_resolves_by_backend():
    expected = "shifted" if jax.default_backend() == "cpu" else "lax"
    assert depthwise.resolve_impl("auto") == expected
    assert depthwise.resolve_impl("lax") == "lax"


def test_bad_arguments_raise():
    x = jnp.zeros((1, 5, 5, 3))
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        depthwise.depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), impl="fft")
    with pytest.raises(ValueError, match="must have shape"):
        depthwise.depthwise_conv_shifted(x, jnp.zeros((3, 3, 3, 3)), strides=(1, 1), padding="SAME")
    with pytest.raises(ValueError, match="padding must be"):
        depthwise.depthwise_conv_shifted(x, jnp.zeros((3, 3, 1, 3)), strides=(1, 1), padding="FULL")
    with pytest.raises(ValueError, match="does not fit"):
        depthwise.depthwise_conv_shifted(
            x, jnp.zeros((7, 7, 1, 3)), strides=(1, 1), padding="VALID"
        )
