"""Tests of oscqat_jax.ranges: min/max estimators and the MSE grid search against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oscqat_jax import ranges


def test_current_minmax_per_tensor_and_per_channel():
    x = jnp.asarray([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], jnp.float32)
    lo, hi = ranges.current_minmax(x)
    assert (float(lo), float(hi)) == (-2.0, 3.0) and lo.shape == ()
    lo, hi = ranges.current_minmax(x, channel_axis=-1)
    np.testing.assert_array_equal(lo, [[1.0, -2.0, -0.25]])
    np.testing.assert_array_equal(hi, [[3.0, 0.0, 0.5]])
    lo, hi = ranges.current_minmax(x, channel_axis=0)
    np.testing.assert_array_equal(lo, [[-2.0], [-0.25]])
    with pytest.raises(ValueError, match="channel_axis"):
        ranges.current_minmax(x, channel_axis=2)


def test_running_minmax_first_batch_sets_then_momentum():
    b1 = jnp.asarray([-1.0, 2.0], jnp.float32)
    b2 = jnp.asarray([-3.0, 4.0], jnp.float32)
    r1 = ranges.running_minmax(b1)
    assert (float(r1[0]), float(r1[1])) == (-1.0, 2.0)
    r2 = ranges.running_minmax(b2, r1)
    np.testing.assert_allclose(r2, [0.9 * -1 + 0.1 * -3, 0.9 * 2 + 0.1 * 4], rtol=1e-6)
    r2b = ranges.running_minmax(b2, r1, momentum=0.5)
    np.testing.assert_allclose(r2b, [-2.0, 3.0])
    # A jitted caller with fixed-shape storage marks the first batch with a traced flag.
    step = jax.jit(lambda x, prev, first: ranges.running_minmax(x, prev, is_first=first))
    zeros = (jnp.zeros(()), jnp.zeros(()))
    np.testing.assert_allclose(step(b1, zeros, jnp.asarray(True)), r1)
    np.testing.assert_allclose(step(b2, r1, jnp.asarray(False)), r2, rtol=1e-6)
    with pytest.raises(ValueError, match="prev range has shapes"):
        ranges.running_minmax(
            jnp.ones((2, 3)), (jnp.zeros((1, 2)), jnp.zeros((1, 2))), channel_axis=-1
        )


# ---------------------------------------------------------------- brute-force MSE reference


def _np_quantize(x, lo, hi, n_bits, symmetric, signed):
    """NumPy float32 re-derivation of the reference quantizer for a candidate range."""
    f = np.float32
    lo, hi = min(lo, f(0)), max(hi, f(1e-8))
    if symmetric:
        grid_signed = lo < 0 if signed is None else signed
        int_min, int_max = (
            (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1) if grid_signed else (0, 2**n_bits - 1)
        )
        s, zp = f(max(abs(lo), hi) / f(int_max)), f(0)
    else:
        int_min, int_max = 0, 2**n_bits - 1
        s = f((hi - lo) / f(int_max))
        zp = f(np.clip(np.round(-(lo / s)), int_min, int_max))
    s = max(s, f(1e-8))
    x_int = np.clip(np.round(x / s) + zp, int_min, int_max).astype(f)
    return s * (x_int - zp)


def _brute_force_mse(x, n_bits, symmetric, signed=None, per_channel=False, k=100, margin=0.5):
    """Candidate loop in plain Python (float32 like the reference), per channel (last axis) if asked."""
    f = np.float32
    x = np.asarray(x, f)
    one_sided = x.min() >= 0
    if symmetric or one_sided:
        step = f((max(abs(x.min()), x.max()) + f(margin)) / f(k))
        cands = [(f(0) if one_sided else -f(step * f(i)), f(step * f(i))) for i in range(1, k + 1)]
    else:
        pos, neg = f(x.max() + f(margin)), f(x.min() - f(margin))
        step = f(max(abs(pos), abs(neg)) / f(k))
        cands = []
        for i in range(1, k + 1):
            magnitude = f(step * f(i))
            delta = f(f(2) * magnitude / f(2**n_bits - 1))
            for shift in range(2**n_bits // 4):
                for sign in (1, -1):
                    skew = f(f(sign * shift) * delta)
                    cands.append((max(f(-magnitude + skew), neg), min(f(magnitude + skew), pos)))
    columns = [x[..., c] for c in range(x.shape[-1])] if per_channel else [x]
    best = []
    for col in columns:
        losses = [
            np.sum(
                (col - _np_quantize(col, lo, hi, n_bits, symmetric, signed)).astype(np.float64) ** 2
            )
            for lo, hi in cands
        ]
        best.append(cands[int(np.argmin(losses))])
    return np.array([b[0] for b in best]), np.array([b[1] for b in best])


@pytest.mark.parametrize(
    "kind, n_bits, symmetric, per_channel",
    [
        ("signed", 3, True, False),
        ("signed", 4, True, True),
        ("relu", 4, True, False),
        ("skewed", 3, False, False),
        ("skewed", 4, False, True),
        ("relu", 3, False, False),
    ],
)
def test_mse_range_matches_brute_force(kind, n_bits, symmetric, per_channel):
    rng = np.random.default_rng(n_bits + 10 * per_channel)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    if kind == "relu":
        x = np.maximum(x, 0)
    elif kind == "skewed":
        x = x * 0.7 + np.array([0.8, -0.3, 1.5], np.float32)
    lo, hi = ranges.mse_range(
        jnp.asarray(x), n_bits=n_bits, symmetric=symmetric, channel_axis=-1 if per_channel else None
    )
    exp_lo, exp_hi = _brute_force_mse(x, n_bits, symmetric, per_channel=per_channel)
    np.testing.assert_allclose(np.ravel(lo), exp_lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.ravel(hi), exp_hi, rtol=1e-5, atol=1e-6)
    if per_channel:
        assert lo.shape == (1, 3)
    else:
        assert lo.shape == ()


def test_mse_accumulator_over_batches_equals_one_call_on_concatenated_data():
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(32, 4)).astype(np.float32) for _ in range(3)]
    # The grid comes from the first batch, so give it the extreme value of all data.
    batches[0][0, 0] = 1.1 * max(np.abs(b).max() for b in batches)
    for symmetric in (True, False):
        kwargs = dict(n_bits=4, symmetric=symmetric, channel_axis=-1)
        state = ranges.mse_range_init(jnp.asarray(batches[0]), **kwargs)
        accumulate = jax.jit(ranges.mse_range_accumulate)
        for b in batches:
            state = accumulate(state, jnp.asarray(b))
        assert int(state.num_batches) == 3
        got = ranges.mse_range_result(state)
        want = ranges.mse_range(jnp.asarray(np.concatenate(batches)), **kwargs)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_mse_candidates_are_vectorised():
    # No Python loop over candidates: the traced program does not grow with their number.
    x = jnp.ones((16, 4), jnp.float32)

    def program_size(k):
        state = ranges.mse_range_init(x, n_bits=4, num_candidates=k)
        return len(jax.make_jaxpr(ranges.mse_range_accumulate)(state, x).eqns)

    assert program_size(10) == program_size(100)


def test_mse_rejects_mismatched_batches():
    state = ranges.mse_range_init(jnp.ones((8, 4)), n_bits=4, channel_axis=-1)
    with pytest.raises(ValueError, match="channels"):
        ranges.mse_range_accumulate(state, jnp.ones((8, 5)))
    with pytest.raises(ValueError, match="dimensions"):
        ranges.mse_range_accumulate(state, jnp.ones((8, 4, 1)))
    with pytest.raises(ValueError, match="n_bits"):
        ranges.mse_range_init(jnp.ones((8, 4)), n_bits=1)
