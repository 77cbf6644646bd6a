"""Tests of oscqat_jax.quant: exact values, the grid and the STE gradients of docs/method.md §2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oscqat_jax import quant


def f32(values):
    return jnp.asarray(values, jnp.float32)


# ---------------------------------------------------------------- integer grid and rounding


@pytest.mark.parametrize(
    "n_bits, signed, expected",
    [
        (3, True, (-4, 3)),
        (4, True, (-8, 7)),
        (3, False, (0, 7)),
        (4, False, (0, 15)),
        (8, True, (-128, 127)),
    ],
)
def test_int_range(n_bits, signed, expected):
    assert quant.int_range(n_bits, signed) == expected


@pytest.mark.parametrize("bad", [1, 17, 0, 3.0, True, "4", None])
def test_int_range_rejects_bad_n_bits(bad):
    with pytest.raises(ValueError, match="n_bits"):
        quant.int_range(bad, True)


def test_round_ste_rounds_half_to_even_and_passes_gradient():
    x = f32([-2.5, -1.5, -0.5, 0.5, 1.5, 2.4, 2.6])
    np.testing.assert_array_equal(quant.round_ste(x), [-2, -2, -0, 0, 2, 2, 3])
    grad = jax.grad(lambda v: jnp.sum(quant.round_ste(v) * jnp.arange(7.0)))(x)
    np.testing.assert_array_equal(grad, np.arange(7.0))


# ---------------------------------------------------------------- exact forward values


def test_signed_3bit_per_tensor_by_hand():
    # x/s = [-4.8, -4, -1.04, -0.5, 0.5, 0.96, 1.5, 3.2, 8]
    # round (half to even) = [-5, -4, -1, 0, 0, 1, 2, 3, 8]; clip to [-4, 3].
    x = f32([-1.2, -1.0, -0.26, -0.125, 0.125, 0.24, 0.375, 0.8, 2.0])
    x_int = quant.to_int(x, 0.25, n_bits=3, signed=True)
    np.testing.assert_array_equal(x_int, [-4, -4, -1, 0, 0, 1, 2, 3, 3])
    x_q = quant.fake_quant(x, 0.25, n_bits=3, signed=True)
    np.testing.assert_array_equal(x_q, [-1, -1, -0.25, 0, 0, 0.25, 0.5, 0.75, 0.75])


def test_unsigned_4bit_per_tensor_by_hand():
    # x/s = [-3, 0.4, 0.5, 1.5, 7, 14.8, 16] -> round [-3, 0, 0, 2, 7, 15, 16] -> clip [0, 15]
    x = f32([-0.75, 0.1, 0.125, 0.375, 1.75, 3.7, 4.0])
    np.testing.assert_array_equal(
        quant.to_int(x, 0.25, n_bits=4, signed=False), [0, 0, 0, 2, 7, 15, 15]
    )
    np.testing.assert_array_equal(
        quant.fake_quant(x, 0.25, n_bits=4, signed=False), [0, 0, 0, 0.5, 1.75, 3.75, 3.75]
    )


def test_signed_4bit_by_hand():
    # x/s = [-9, -8.5, -2.5, 6.5, 7.49] -> round [-9, -8, -2, 6, 7] -> clip [-8, 7]
    x = f32([-4.5, -4.25, -1.25, 3.25, 3.745])
    np.testing.assert_array_equal(quant.to_int(x, 0.5, n_bits=4, signed=True), [-8, -8, -2, 6, 7])


def test_asymmetric_unsigned_3bit_by_hand():
    # zero point 2.4 -> 2; x/s = [-4, -2, -0.6, 1.2, 4.8, 6] -> round [-4, -2, -1, 1, 5, 6]
    # + zp = [-2, 0, 1, 3, 7, 8] -> clip [0, 7] -> x_q = 0.5 * (x_int - 2)
    x = f32([-2.0, -1.0, -0.3, 0.6, 2.4, 3.0])
    x_int = quant.to_int(x, 0.5, 2.4, n_bits=3, signed=False)
    np.testing.assert_array_equal(x_int, [0, 0, 1, 3, 7, 7])
    x_q = quant.fake_quant(x, 0.5, 2.4, n_bits=3, signed=False)
    np.testing.assert_array_equal(x_q, [-1, -1, -0.5, 0.5, 2.5, 2.5])


def test_asymmetric_signed_4bit_and_zero_point_clipping():
    # signed 4-bit grid [-8, 7]; zero point -1.6 -> -2; x/s = [-7, 0, 9.5] -> round [-7, 0, 10]
    # + zp -> [-9, -2, 8] -> clip [-8, 7] -> x_q = 0.25 * (x_int + 2)
    x = f32([-1.75, 0.0, 2.375])
    x_q = quant.fake_quant(x, 0.25, -1.6, n_bits=4, signed=True)
    np.testing.assert_array_equal(x_q, [-1.5, 0.0, 2.25])
    # A zero point beyond the grid is clipped to it: 9.3 -> 9 -> 7 on [0, 7].
    x_int = quant.to_int(f32([0.0]), 1.0, 9.3, n_bits=3, signed=False)
    np.testing.assert_array_equal(x_int, [7])


def test_per_channel_last_axis_and_first_axis():
    x = f32([[0.3, 0.3, 0.3], [-2.0, 1.2, 9.0]])
    scale = f32([[0.25, 0.5, 1.0]])  # (1, C): one scale per column
    # column 0: x/s = [1.2, -8] -> [1, -4]; column 1: [0.6, 2.4] -> [1, 2]; column 2: [0.3, 9] -> [0, 3]
    np.testing.assert_array_equal(
        quant.fake_quant(x, scale, n_bits=3, signed=True), [[0.25, 0.5, 0.0], [-1.0, 1.0, 3.0]]
    )
    scale_rows = f32([[0.25], [1.0]])  # (C, 1): one scale per row
    # row 0: x/s = 1.2 -> 1; row 1: [-2, 1.2, 9] -> [-2, 1, 3]
    np.testing.assert_array_equal(
        quant.fake_quant(x, scale_rows, n_bits=3, signed=True),
        [[0.25, 0.25, 0.25], [-2.0, 1.0, 3.0]],
    )


def test_scale_is_floored_at_eps():
    x = f32([1e-9, 3e-8])
    # A negative learnt scale behaves as SCALE_EPS: x / 1e-8 = [0.1, 3] -> [0, 3].
    np.testing.assert_array_equal(quant.to_int(x, -0.5, n_bits=4, signed=True), [0, 3])


def test_scale_shape_must_broadcast_against_x():
    with pytest.raises(ValueError, match="scale has shape"):
        quant.fake_quant(jnp.ones((2, 4)), jnp.ones((3,)), n_bits=4, signed=True)
    with pytest.raises(ValueError, match="scale has shape"):
        quant.fake_quant(jnp.ones((4,)), jnp.ones((2, 4)), n_bits=4, signed=True)


def test_traced_signedness_matches_static():
    x = f32([-1.3, -0.2, 0.4, 2.2])
    for signed in (True, False):
        static = quant.fake_quant(x, 0.25, n_bits=3, signed=signed)
        traced = jax.jit(lambda s: quant.fake_quant(x, 0.25, n_bits=3, signed=s))(
            jnp.asarray(signed)
        )
        np.testing.assert_array_equal(static, traced)


# ---------------------------------------------------------------- grid properties


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=16),
    log_scale=st.floats(-4, 1),
    n_bits=st.sampled_from([2, 3, 4, 8]),
    signed=st.booleans(),
)
def test_outputs_lie_on_the_grid_and_in_range_errors_are_at_most_half_a_step(
    values, log_scale, n_bits, signed
):
    x = np.asarray(values, np.float32)
    s = np.float32(10.0**log_scale)
    x_q = np.asarray(quant.fake_quant(jnp.asarray(x), jnp.asarray(s), n_bits=n_bits, signed=signed))
    int_min, int_max = quant.int_range(n_bits, signed)
    levels = x_q / s
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.all(levels >= int_min - 1e-3) and np.all(levels <= int_max + 1e-3)
    inside = (x >= s * int_min) & (x <= s * int_max)
    assert np.all(np.abs(x_q - x)[inside] <= s / 2 * (1 + 1e-5) + 1e-6)


# ---------------------------------------------------------------- gradients (docs/method.md §2)


def _grads(x, scale, zero_point, cot, **grid):
    def f(x, s, z):
        return jnp.sum(cot * quant.fake_quant(x, s, z, **grid))

    argnums = (0, 1, 2) if zero_point is not None else (0, 1)
    return jax.grad(f, argnums=argnums)(x, scale, zero_point)


def test_symmetric_gradients_match_closed_form_at_and_past_the_bounds():
    s = 0.25
    # x/s: inside, exactly at both bounds, rounding onto a bound (3.4 -> 3, -4.4 -> -4, and
    # -4.5 -> -4 by half-to-even), just past (3.5 -> 4, 3.6 -> 4, -4.6 -> -5), far outside.
    ratios = np.array([0.3, -1.7, 3.0, -4.0, 3.4, -4.4, -4.5, 3.5, 3.6, -4.6, 10.0], np.float32)
    x = f32(ratios * s)
    cot = f32(np.linspace(0.5, 1.5, ratios.size))
    gx, gs = _grads(x, f32(s), None, cot, n_bits=3, signed=True)
    rounded = np.round(ratios)
    inside = (rounded >= -4) & (rounded <= 3)
    np.testing.assert_array_equal(inside, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(gx, np.asarray(cot) * inside, rtol=1e-6)
    bound = np.where(rounded > 3, 3.0, -4.0)
    expected_gs = np.sum(np.asarray(cot) * np.where(inside, rounded - ratios, bound))
    np.testing.assert_allclose(gs, expected_gs, rtol=1e-5)


def test_asymmetric_gradients_match_closed_form():
    s, z = 0.5, 2.3  # zero point rounds to 2 (inside the 3-bit unsigned grid)
    ratios = np.array([-2.0, -2.5, -2.6, 0.2, 4.9, 5.0, 5.6, 8.0], np.float32)  # x / s
    x = f32(ratios * s)
    cot = f32(np.linspace(1.0, 2.0, ratios.size))
    gx, gs, gz = _grads(x, f32(s), f32(z), cot, n_bits=3, signed=False)
    v = np.round(ratios) + 2
    inside = (v >= 0) & (v <= 7)
    # -2 -> 0 (at the bound), -2.5 -> -2 (half to even) -> 0, -2.6 -> -1 (outside),
    # 5 -> 7 (at the bound), 5.6 -> 8 (outside)
    np.testing.assert_array_equal(inside, [1, 1, 0, 1, 1, 1, 0, 0])
    c = np.asarray(cot)
    np.testing.assert_allclose(gx, c * inside, rtol=1e-6)
    bound = np.where(v > 7, 7.0, 0.0)
    np.testing.assert_allclose(
        gs, np.sum(c * np.where(inside, np.round(ratios) - ratios, bound - 2)), rtol=1e-5
    )
    np.testing.assert_allclose(gz, np.sum(c * np.where(inside, 0.0, -s)), rtol=1e-6)


def test_zero_point_outside_the_grid_gets_no_gradient():
    x = f32([0.1, 5.0])
    _, _, gz = _grads(x, f32(0.5), f32(9.2), jnp.ones(2), n_bits=3, signed=False)
    assert float(gz) == 0.0


def test_per_channel_scale_gradient_is_per_channel():
    x = f32([[0.3, 1.1], [0.9, -0.2]])
    scale = f32([[0.5, 0.25]])
    gs = jax.grad(lambda s: jnp.sum(quant.fake_quant(x, s, n_bits=3, signed=True)))(scale)
    ratios = np.asarray(x) / np.asarray(scale)
    rounded = np.round(ratios)
    inside = (rounded >= -4) & (rounded <= 3)
    expected = np.where(inside, rounded - ratios, np.where(rounded > 3, 3.0, -4.0)).sum(
        0, keepdims=True
    )
    np.testing.assert_allclose(gs, expected, rtol=1e-5)


def test_lsq_gradient_scaling():
    x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float32)
    scale = f32(0.3)

    def g(grad_scale, s):
        return jax.grad(
            lambda s: jnp.sum(quant.fake_quant(x, s, n_bits=4, signed=True, grad_scale=grad_scale))
        )(s)

    plain = g(False, scale)
    np.testing.assert_allclose(g(True, scale), plain / np.sqrt(7 * 30), rtol=1e-6)
    np.testing.assert_allclose(g(0.5, scale), plain * 0.5, rtol=1e-6)
    per_channel = f32(np.full((1, 5), 0.3))
    plain_pc = g(False, per_channel)
    np.testing.assert_allclose(g(True, per_channel), plain_pc / np.sqrt(7 * 6), rtol=1e-6)
    # The forward value is unchanged by gradient scaling.
    np.testing.assert_array_equal(
        quant.fake_quant(x, scale, n_bits=4, signed=True, grad_scale=True),
        quant.fake_quant(x, scale, n_bits=4, signed=True),
    )


def test_composes_with_jit_and_vmap():
    x = jax.random.normal(jax.random.key(1), (8,), jnp.float32)
    scales = f32([0.1, 0.2, 0.4])
    fq = lambda s: quant.fake_quant(x, s, n_bits=4, signed=True)  # noqa: E731
    batched = jax.jit(jax.vmap(fq))(scales)
    for i, s in enumerate(scales):
        np.testing.assert_array_equal(batched[i], fq(s))
    grads = jax.vmap(jax.grad(lambda s: jnp.sum(fq(s))))(scales)
    assert grads.shape == (3,) and bool(jnp.all(jnp.isfinite(grads)))


# ---------------------------------------------------------------- initialisers


def test_symmetric_scale_from_range():
    np.testing.assert_allclose(quant.symmetric_scale(-0.5, 2.1, n_bits=3, signed=True), 0.7)
    np.testing.assert_allclose(quant.symmetric_scale(-3.0, 1.0, n_bits=4, signed=True), 3.0 / 7)
    np.testing.assert_allclose(quant.symmetric_scale(0.0, 1.5, n_bits=4, signed=False), 0.1)
    # x_min > 0 is widened to 0, so the result is the same as for [0, 1.5].
    np.testing.assert_allclose(quant.symmetric_scale(0.2, 1.5, n_bits=4, signed=False), 0.1)
    # An all-zero range still gives a positive scale.
    assert float(quant.symmetric_scale(0.0, 0.0, n_bits=4, signed=True)) > 0
    per_channel = quant.symmetric_scale(
        f32([[-1.0, -0.2]]), f32([[0.5, 0.7]]), n_bits=3, signed=True
    )
    np.testing.assert_allclose(per_channel, [[1 / 3, 0.7 / 3]], rtol=1e-6)


def test_asymmetric_scale_from_range():
    scale, zp = quant.asymmetric_scale(-1.0, 2.5, n_bits=3)
    np.testing.assert_allclose(scale, 0.5)
    np.testing.assert_allclose(zp, 2.0)
    # The range maps onto the whole grid: x_min -> int_min and x_max -> int_max.
    x = f32([-1.0, 2.5])
    np.testing.assert_array_equal(quant.to_int(x, scale, zp, n_bits=3, signed=False), [0, 7])
    scale, zp = quant.asymmetric_scale(-1.0, 2.75, n_bits=4, signed=True)
    np.testing.assert_array_equal(
        quant.to_int(f32([-1.0, 2.75]), scale, zp, n_bits=4, signed=True), [-8, 7]
    )


def test_initialisers_return_strong_float32():
    s = quant.symmetric_scale(-1.0, 1.0, n_bits=4, signed=True)
    assert s.dtype == jnp.float32 and not s.weak_type
    s, zp = quant.asymmetric_scale(-1.0, 1.0, n_bits=4)
    assert not s.weak_type and not zp.weak_type
    init = quant.scale_initializer(0.05)
    value = init(jax.random.key(0), (1, 4))
    assert value.shape == (1, 4) and value.dtype == jnp.float32 and not value.weak_type


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), "0.1"])
def test_scale_initializer_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="scale must be a positive"):
        quant.scale_initializer(bad)


def test_range_initialiser_rejects_inverted_range():
    with pytest.raises(ValueError, match="x_min must not exceed x_max"):
        quant.symmetric_scale(1.0, -1.0, n_bits=4, signed=True)


def test_threshold_distance_by_hand():
    # x = w / s: thresholds at half-integers; negative below the nearest one, positive above.
    x = np.array([1.5, 1.2, 1.8, 2.0, -1.2, -1.5, 0.0, 0.49])
    expected = np.array([0.0, -0.3, 0.3, 0.5, 0.3, 0.0, 0.5, -0.01])
    np.testing.assert_allclose(quant.threshold_distance(x, 1.0), expected, atol=1e-12)
    # The same weights with per-channel scales (broadcast over the last axis).
    scale = np.array([0.5, 0.25])
    w = np.array([[0.75, 0.3], [1.0, -0.3]])  # x = [[1.5, 1.2], [2.0, -1.2]]
    np.testing.assert_allclose(
        quant.threshold_distance(w, scale), [[0.0, -0.3], [0.5, 0.3]], atol=1e-12
    )
