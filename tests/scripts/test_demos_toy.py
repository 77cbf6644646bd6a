"""The toy-regression demo (demos/toy_regression.py): its numbers, computed in-process."""

import numpy as np
import pytest
from testkit import load_script

demo = load_script("demos/toy_regression.py", "toy_regression_demo")
UPPER, LOWER = 11 / 15, 10 / 15


def test_steady_state_leaves_out_the_drift():
    q = np.array([3.0, 3.0, 3.0, 2.0, 3.0, 3.0, 2.0])
    assert demo.first_change(q) == 3
    np.testing.assert_array_equal(demo.steady_state(q), q[2:])
    assert demo.first_change(np.ones(4)) == 4


def test_reference_run_holds_the_upper_level_then_cycles_with_period_three():
    q = np.asarray(demo.run().q)
    summary = demo.reference_summary(long_run_steps=20_000)
    first = summary["first_lower_step"]
    # 0.737 drifts down by 0.14 * (11/15 - 0.7107) = 0.00317 a step: below 0.70 after 12.
    assert first == 12
    np.testing.assert_allclose(q[:first], UPPER)
    # From two steps before the first lower step: (upper, upper, lower) for ten periods.
    cycle = q[first - 2 : first + 28].reshape(10, 3)
    np.testing.assert_allclose(cycle, np.tile([UPPER, UPPER, LOWER], (10, 1)), rtol=1e-6)
    assert summary["cycle"] == [0.7333, 0.7333, 0.6667]
    assert summary["flips_per_step"] == pytest.approx(0.679, abs=0.02)
    long_run = summary["long_run"]
    assert long_run["flips_per_step"] == pytest.approx(0.679, rel=0.002)
    assert long_run["mean_q"] == pytest.approx(0.7107, abs=1e-4)


def test_flip_frequency_follows_two_d_over_s_whatever_the_learning_rate():
    sweep = demo.flip_law_sweep()
    assert sweep.flips.shape == (3, 19) and sweep.law.shape == (19,)
    # Across the whole bin, from 0.1 flips per step near a level to 1 at the threshold.
    assert sweep.law.min() == pytest.approx(0.1) and sweep.law.max() == pytest.approx(1.0)
    assert np.max(np.abs(sweep.relative_error)) < 0.02
    # The learning rates (0.01 to 0.14) agree with each other as closely as with the law.
    assert np.max(np.ptp(sweep.flips, axis=0) / sweep.law) < 0.02
    # The balance of the pushes makes the long-run mean of q(w) the optimum.
    np.testing.assert_allclose(sweep.mean_q, np.broadcast_to(sweep.w_star, (3, 19)), atol=1e-4)


@pytest.fixture(scope="module")
def remedies():
    runs = demo.remedy_runs()
    return runs, {name: demo.remedy_summary(t) for name, t in runs.items()}


def test_without_a_remedy_the_weight_flips_to_the_end(remedies):
    _, stats = remedies
    assert stats["plain"]["flips_last_steps"] >= 30  # 0.68 per step over 50 steps
    assert stats["plain"]["last_flip_step"] >= demo.REMEDY_STEPS - 3


@pytest.mark.parametrize("name", ["freezing", "dampening"])
def test_each_remedy_ends_the_oscillation_at_the_nearest_level(remedies, name):
    runs, stats = remedies
    s = stats[name]
    start = int(demo.REMEDY_START * demo.REMEDY_STEPS)
    q = np.asarray(runs[name].q)
    # Identical to the plain run until the remedy starts, and still flipping for a while.
    np.testing.assert_array_equal(q[:start], np.asarray(runs["plain"].q)[:start])
    assert start < s["last_flip_step"] < demo.REMEDY_STEPS - 50
    assert s["flips_last_steps"] == 0 and np.count_nonzero(np.diff(q[s["last_flip_step"] :])) == 0
    # It settles at 11/15, the level nearest w* = 0.7107: the error is d = 0.0226.
    assert s["final_level"] == 11
    assert s["error"] == pytest.approx(UPPER - 0.7107, abs=1e-6)


def test_freezing_freezes_once_the_threshold_falls_below_the_frequency(remedies):
    runs, stats = remedies
    s = stats["freezing"]
    frozen = np.asarray(runs["freezing"].frozen)
    assert frozen[-1] and not frozen[: s["frozen_at_step"] + 1].any()
    # The threshold started at 0.9, above the frequency (~0.68), and was just below it.
    assert 0.6 < s["freeze_threshold_then"] < 0.75


def test_dampening_stops_the_flipping_once_lambda_exceeds_d_over_s(remedies):
    runs, stats = remedies
    s = stats["dampening"]
    lam = np.asarray(runs["dampening"].dampening_weight)
    q = np.asarray(runs["dampening"].q)
    flips = np.flatnonzero(np.diff(q)) + 1
    # Every flip happens while lambda < d / s = 0.3395, where the task's pull d beats the
    # dampening's lambda * s at the threshold; none once lambda is past it.
    assert s["dampening_weight_law"] == pytest.approx(0.3395, abs=1e-6)
    assert np.all(lam[flips] < s["dampening_weight_law"])
    assert s["dampening_weight_at_last_flip"] > 0.25
    # The latent weight rests inside the upper bin, d / (2 lambda) below 11/15 (lambda = 1).
    assert float(runs["dampening"].w[-1]) == pytest.approx(UPPER - (UPPER - 0.7107) / 2, abs=2e-4)
