"""Tests of oscqat_jax.oscillation on hand-written integer sequences (docs/method.md §5-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax import oscillation


def run(sequence, *, momentum, thresholds=None, use_ema=True):
    """Feeds integer weights step by step; returns the used integers and the states after each step."""
    seq = [jnp.asarray(v, jnp.float32) for v in sequence]
    thresholds = thresholds if thresholds is not None else [0.0] * (len(seq) - 1)
    state = oscillation.init(seq[0])
    used, states = [], []
    for w_int, f_th in zip(seq[1:], thresholds, strict=True):
        w_used, state = oscillation.update(
            state, w_int, momentum=momentum, freeze_threshold=f_th, use_ema=use_ema
        )
        used.append(np.asarray(w_used))
        states.append(state)
    return used, states


def test_alternating_flips_count_and_pauses_keep_the_direction():
    # init at 0, then 0, 1, 0, 1, 1, 0: the first change (0 -> 1) never counts; each reversal
    # does, also after a pause (1 -> 1) because the last non-zero direction is kept.
    _, states = run([0, 0, 1, 0, 1, 1, 0], momentum=0.5)
    ema = [float(s.ema_osc) for s in states]
    np.testing.assert_allclose(ema, [0, 0, 0.5, 0.75, 0.375, 0.6875])
    assert [int(s.prev_dir) for s in states] == [0, -1, 1, -1, -1, 1]


def test_monotone_drift_never_counts():
    _, states = run([0, 1, 2, 3, 4, 4, 5, 7], momentum=0.5)
    assert float(states[-1].ema_osc) == 0.0
    _, states = run([3, 2, 1, 1, 0, -1], momentum=0.5)
    assert float(states[-1].ema_osc) == 0.0


def test_elements_are_tracked_independently():
    _, states = run([[0, 0], [1, 1], [0, 2], [1, 3]], momentum=0.5)
    np.testing.assert_allclose(states[-1].ema_osc, [0.75, 0.0])


def test_freeze_takes_effect_one_call_later_with_the_ema_from_before_the_update():
    # momentum 0.6, threshold 0.4 from the start: ema_int is 0 after step 1 and 0.6 after
    # step 2; at step 3 the reversal gives ema_osc 0.6 > 0.4, so the weight freezes to
    # round(0.6) = 1 (after this step's update ema_int would be 0.24 -> 0).
    used, states = run([0, 0, 1, 0, 0, 0], momentum=0.6, thresholds=[0.4, 0.4, 0.4, 0.0, 0.0])
    assert not bool(states[1].frozen) and bool(states[2].frozen)
    assert float(states[2].frozen_int) == 1.0
    assert float(used[2]) == 0.0  # the step that decides the freeze still uses its own value
    assert [float(u) for u in used[3:]] == [1.0, 1.0]  # from the next call on: the frozen value


def test_frozen_value_follows_the_ema_while_the_frequency_stays_above_the_threshold():
    # docs/method.md §6 / the reference: every weight with ema_osc > f_th gets
    # frozen_int = round(ema_int), frozen or not. Above, step 3 updated ema_int to 0.24, and the
    # switch to the frozen value at step 4 is itself a reversal (ema_osc 0.84 > 0.4), so
    # frozen_int becomes round(0.24) = 0.
    used, states = run([0, 0, 1, 0, 0, 0], momentum=0.6, thresholds=[0.4] * 5)
    assert float(states[3].frozen_int) == 0.0
    assert [float(u) for u in used[3:]] == [1.0, 0.0]


def test_a_frequency_equal_to_the_threshold_does_not_freeze():
    # docs/method.md §6 freezes when ema_osc > f_th, strictly. Momentum 0.5 keeps every EMA
    # exact in float32: the reversal at step 3 gives ema_osc 0.5, the pause at step 4 halves it
    # to 0.25, the reversal at step 5 gives 0.625.
    _, states = run([0, 0, 1, 0, 0, 1], momentum=0.5, thresholds=[0.5] * 5)
    assert [bool(s.frozen) for s in states] == [False, False, False, False, True]
    assert [float(s.ema_osc) for s in states] == [0.0, 0.0, 0.5, 0.25, 0.625]
    # On the decaying side: 0.25 at step 4 against a threshold of 0.25 (inactive before).
    _, states = run([0, 0, 1, 0, 0], momentum=0.5, thresholds=[0.0, 0.0, 0.0, 0.25])
    assert float(states[3].ema_osc) == 0.25 and not bool(states[3].frozen)
    # The next float32 below the threshold freezes at the same step.
    below = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
    _, states = run([0, 0, 1, 0], momentum=0.5, thresholds=[below] * 3)
    assert bool(states[2].frozen) and float(states[2].frozen_int) == 0.0


def test_freeze_without_ema_uses_the_current_integer():
    used, states = run([0, 0, 1, 0, 0], momentum=0.6, thresholds=[0.4] * 4, use_ema=False)
    assert bool(states[2].frozen) and float(states[2].frozen_int) == 0.0
    assert float(used[3]) == 0.0


def test_nothing_unfreezes():
    thresholds = [0.4, 0.4, 0.4] + [0.0] * 10 + [0.9] * 3
    _, states = run([0, 0, 1, 0] + [5] * 13, momentum=0.6, thresholds=thresholds)
    assert all(bool(s.frozen) for s in states[2:])
    assert float(states[-1].ema_osc) < 0.4  # its frequency has decayed, it stays frozen anyway


def test_ema_int_starts_at_the_first_positive_threshold_and_only_advances_then():
    thresholds = [0.0, 0.0, 0.9, 0.9, 0.0, 0.9]
    _, states = run([0, 2, 4, 6, 8, 10, 12], momentum=0.5, thresholds=thresholds)
    assert not bool(states[1].freezing_started) and bool(states[2].freezing_started)
    # step 3 (w=6) starts the EMA at 6; step 4 (w=8): 7; step 5 has threshold 0: stays 7;
    # step 6 (w=12): 0.5 * 12 + 0.5 * 7 = 9.5.
    assert [float(s.ema_int) for s in states[2:]] == [6.0, 7.0, 7.0, 9.5]


def test_frozen_entries_get_no_gradient():
    state = oscillation.init(jnp.zeros(3))
    state = state._replace(frozen=jnp.asarray([True, False, True]), frozen_int=jnp.full(3, 2.0))

    def f(w_int):
        w_used, _ = oscillation.update(state, w_int, momentum=0.1, freeze_threshold=0.0)
        return jnp.sum(w_used * jnp.asarray([1.0, 2.0, 3.0]))

    w = jnp.asarray([5.0, 5.0, 5.0])
    np.testing.assert_array_equal(jax.grad(f)(w), [0.0, 2.0, 0.0])
    np.testing.assert_array_equal(oscillation.apply_frozen(state, w), [2.0, 5.0, 2.0])


def test_state_under_jit_and_scan_equals_eager():
    rng = np.random.default_rng(0)
    seq = np.cumsum(rng.integers(-1, 2, size=(40, 16)), axis=0).astype(np.float32)
    thresholds = np.where(np.arange(39) < 10, 0.0, 0.15).astype(np.float32)
    used_eager, states_eager = run(list(seq), momentum=0.2, thresholds=list(thresholds))

    @jax.jit
    def scan(seq, thresholds):
        def step(state, inputs):
            w_int, f_th = inputs
            w_used, state = oscillation.update(state, w_int, momentum=0.2, freeze_threshold=f_th)
            return state, w_used

        return jax.lax.scan(step, oscillation.init(seq[0]), (seq[1:], thresholds))

    final, used = scan(jnp.asarray(seq), jnp.asarray(thresholds))
    np.testing.assert_array_equal(used, np.stack(used_eager))
    for name, a, b in zip(final._fields, final, states_eager[-1], strict=True):
        if name.startswith("ema"):  # XLA may fuse the EMA into an FMA: equal up to rounding
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        else:
            np.testing.assert_array_equal(a, b)
    assert bool(jnp.any(final.frozen))  # the sequence exercises freezing


def test_init_dtypes():
    state = oscillation.init(jnp.ones((2, 3)))
    assert state.prev_int.dtype == jnp.float32 and state.prev_dir.dtype == jnp.int8
    assert state.frozen.dtype == jnp.bool_ and state.freezing_started.shape == ()
    assert not state.ema_osc.weak_type


def test_mismatched_shapes_are_rejected():
    state = oscillation.init(jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"w_int has shape \(9,\)"):
        oscillation.update(state, jnp.zeros(9), momentum=0.1, freeze_threshold=0.0)
    with pytest.raises(ValueError, match="OscillationState"):
        oscillation.update((1, 2), jnp.zeros(9), momentum=0.1, freeze_threshold=0.0)


def test_summary_of_one_state_and_of_a_tree():
    a = oscillation.init(jnp.zeros(4))._replace(
        ema_osc=jnp.asarray([0.0, 0.01, 0.002, 0.03]), frozen=jnp.asarray([0, 0, 0, 1], bool)
    )
    b = oscillation.init(jnp.zeros((2, 2)))._replace(ema_osc=jnp.full((2, 2), 0.1))
    one = oscillation.summary(a, level=0.005)
    np.testing.assert_allclose(one["oscillating"], 0.5)
    np.testing.assert_allclose(one["frozen"], 0.25)
    np.testing.assert_allclose(one["mean_frequency"], 0.042 / 4, rtol=1e-6)
    both = oscillation.summary({"conv": a, "dense": {"w": b}}, level=0.005)
    np.testing.assert_allclose(both["oscillating"], 6 / 8)
    np.testing.assert_allclose(both["frozen"], 1 / 8)
    assert int(both["num_weights"]) == 8
    with pytest.raises(ValueError, match="OscillationState"):
        oscillation.summary({"x": jnp.zeros(3)})
