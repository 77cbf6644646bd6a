"""The toy regression of docs/method.md §1 solved with the core under jax.lax.scan."""

import numpy as np
import pytest

from oscqat_jax import schedules, toy

LOW, HIGH = 10 / 15, 11 / 15


def test_reference_animation_settings_reach_the_period_three_cycle():
    trajectory = toy.toy_regression(0.7107, 0.737, lr=0.14, num_steps=60)
    q = np.asarray(trajectory.q)
    assert np.all(q[:11] == q[0]) and np.isclose(q[0], HIGH)  # drifts down at the upper level
    first_low = int(np.argmax(np.isclose(q, LOW)))
    assert 10 <= first_low <= 13
    cycle = q[first_low - 2 : first_low + 1]
    np.testing.assert_allclose(cycle, [HIGH, HIGH, LOW], rtol=1e-6)
    # It repeats for at least ten periods; since 2 d / s = 0.679 is a little above 2/3, a
    # shorter (upper, lower) cycle slips in now and then to keep the mean of q at w*.
    tail = q[first_low - 2 :]
    np.testing.assert_allclose(tail[:30].reshape(10, 3), np.tile(cycle, (10, 1)))
    np.testing.assert_allclose(toy.flips_per_step(tail), 0.679, atol=0.03)


@pytest.mark.parametrize("w_star", [0.7107, 0.69, 0.72])
def test_long_run_mean_is_the_optimum_and_flips_follow_the_law(w_star):
    predicted = toy.predicted_flips_per_step(w_star, 1 / 15)
    for lr in (0.01, 0.05, 0.14):
        q = np.asarray(toy.toy_regression(w_star, 0.737, lr=lr, num_steps=20000).q)[2000:]
        assert abs(q.mean() - w_star) < 2e-4
        assert abs(toy.flips_per_step(q) / predicted - 1) < 0.02


def test_freezing_and_dampening_stop_the_flipping():
    frozen = toy.toy_regression(0.7107, 0.737, num_steps=400, freeze_threshold=0.02, momentum=0.05)
    assert bool(frozen.frozen[-1]) and toy.flips_per_step(frozen.q[-100:]) == 0.0
    damped = toy.toy_regression(0.7107, 0.737, num_steps=400, dampening_weight=1.0)
    assert toy.flips_per_step(damped.q[-100:]) == 0.0
    plain = toy.toy_regression(0.7107, 0.737, num_steps=400)
    assert toy.flips_per_step(plain.q[-100:]) > 0.5


def test_schedules_are_evaluated_per_step_and_recorded():
    steps = 120
    damp = schedules.dampening_weight_schedule(0.0, 1.0, total_steps=steps, anneal_start=0.25)
    freeze = schedules.freeze_threshold_schedule(0.9, 0.1, total_steps=steps, anneal_start=0.25)
    plain = toy.toy_regression(0.7107, 0.737, num_steps=steps)
    damped = toy.toy_regression(0.7107, 0.737, num_steps=steps, dampening_weight=damp)
    frozen = toy.toy_regression(
        0.7107, 0.737, num_steps=steps, freeze_threshold=freeze, momentum=0.05
    )
    t = np.arange(steps)
    np.testing.assert_allclose(damped.dampening_weight, damp(t), rtol=1e-6)
    np.testing.assert_allclose(frozen.freeze_threshold, freeze(t), rtol=1e-6)
    np.testing.assert_array_equal(plain.dampening_weight, np.zeros(steps))
    # Both schedules are 0 for the first 30 steps: the runs match the plain one there.
    for run in (damped, frozen):
        np.testing.assert_array_equal(run.w[:31], plain.w[:31])
        assert not np.array_equal(run.w, plain.w)


def test_a_constant_schedule_matches_the_number():
    number = toy.toy_regression(0.7107, 0.737, num_steps=50, dampening_weight=0.5)
    schedule = toy.toy_regression(
        0.7107, 0.737, num_steps=50, dampening_weight=schedules.constant(0.5)
    )
    for a, b in zip(number, schedule, strict=True):
        np.testing.assert_array_equal(a, b)


def test_predicted_flips_by_hand_for_numbers_and_arrays():
    # 0.7107 lies 0.0226 below 11/15: 2 * 0.0226 * 15 = 0.679.
    assert toy.predicted_flips_per_step(0.7107, 1 / 15) == pytest.approx(0.679, abs=1e-9)
    law = toy.predicted_flips_per_step(np.array([LOW, 10.25 / 15, 10.5 / 15, HIGH]), 1 / 15)
    np.testing.assert_allclose(law, [0.0, 0.5, 1.0, 0.0], atol=1e-9)
