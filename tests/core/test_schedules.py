"""Tests of oscqat_jax.schedules at their boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax import schedules


def test_cosine_anneal_boundaries():
    f = schedules.cosine_anneal(0.1, 0.01, total_steps=100, anneal_start=0.25, before_start=0.0)
    assert float(f(0)) == 0.0 and float(f(24)) == 0.0  # before t0 = 25
    np.testing.assert_allclose(f(25), 0.1, rtol=1e-6)  # the start value at t0
    np.testing.assert_allclose(f(62.5), 0.055, rtol=1e-6)  # half way: the mean
    np.testing.assert_allclose(f(100), 0.01, rtol=1e-6)  # the final value at T
    np.testing.assert_allclose(f(150), 0.01, rtol=1e-6)  # held afterwards
    assert f(jnp.asarray(30)).dtype == jnp.float32


def test_cosine_anneal_is_jittable_with_a_traced_step():
    f = schedules.cosine_anneal(1.0, 0.0, total_steps=10, anneal_start=0.0)
    values = jax.jit(jax.vmap(f))(jnp.arange(11))
    expected = 0.5 * (1 + np.cos(np.pi * np.arange(11) / 10))
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_freeze_threshold_schedule():
    f = schedules.freeze_threshold_schedule(0.1, 0.011, total_steps=1000)
    assert float(f(0)) == 0.0 and float(f(249)) == 0.0
    np.testing.assert_allclose([f(250), f(1000)], [0.1, 0.011], rtol=1e-6)
    constant = schedules.freeze_threshold_schedule(0.04)
    assert float(constant(0)) == pytest.approx(0.04) and float(constant(10**6)) == pytest.approx(
        0.04
    )


def test_dampening_weight_schedule():
    f = schedules.dampening_weight_schedule(0.0, 0.1, total_steps=400, anneal_start=0.25)
    assert float(f(0)) == 0.0 and float(f(99)) == 0.0
    np.testing.assert_allclose([f(100), f(250), f(400)], [0.0, 0.05, 0.1], atol=1e-7)
    # The value before the anneal start is the start weight (in force from the beginning).
    g = schedules.dampening_weight_schedule(0.02, 0.1, total_steps=400)
    np.testing.assert_allclose([g(0), g(100), g(400)], [0.02, 0.02, 0.1], rtol=1e-6)
    np.testing.assert_allclose(schedules.dampening_weight_schedule(0.3)(123), 0.3, rtol=1e-6)


def test_cosine_lr():
    f = schedules.cosine_lr(0.01, 100)
    np.testing.assert_allclose([f(0), f(50), f(100)], [0.01, 0.005, 0.0], atol=1e-8)
    floor = schedules.cosine_lr(0.01, 100, final_lr=0.002)
    np.testing.assert_allclose([floor(0), floor(100)], [0.01, 0.002], rtol=1e-6)
    warm = schedules.cosine_lr(0.01, 110, warmup_steps=10)
    np.testing.assert_allclose(
        [warm(0), warm(5), warm(10), warm(110)], [0.0, 0.005, 0.01, 0.0], atol=1e-8
    )
    per_epoch = schedules.cosine_lr(0.01, 100, steps_per_epoch=25)
    np.testing.assert_allclose([per_epoch(0), per_epoch(24)], [0.01, 0.01])
    np.testing.assert_allclose(per_epoch(25), 0.005 * (1 + np.cos(np.pi / 4)), rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedules.cosine_anneal(0.1, 0.01, 100, anneal_start=1.0), "anneal_start"),
        (lambda: schedules.cosine_anneal(0.1, 0.01, 0), "total_steps"),
        (lambda: schedules.freeze_threshold_schedule(-0.1), "freeze_threshold"),
        (lambda: schedules.freeze_threshold_schedule(0.1, 0.01), "total_steps is required"),
        (lambda: schedules.dampening_weight_schedule(0.0, -1.0, 10), "dampening_weight_final"),
        (lambda: schedules.cosine_lr(0.1, 10, warmup_steps=10), "warmup_steps"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
