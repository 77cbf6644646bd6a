"""Tests of oscqat_jax.dampening against the closed form of docs/method.md §7."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oscqat_jax import dampening, oscillation, quant

# A (in=2, out=3) dense kernel on the 3-bit signed grid with scale 0.25: bounds [-1, 0.75].
W = np.array([[0.1, -0.3, 0.9], [-1.4, 0.62, 0.2]], np.float32)
S = 0.25
GRID = dict(n_bits=3, signed=True)


def closed_form():
    w_q = S * np.clip(np.round(W / S), -4, 3)
    inside = (np.round(W / S) >= -4) & (np.round(W / S) <= 3)
    per_element = np.where(inside, (w_q - W) ** 2, 0.0)
    grad = np.where(inside, -2 * (w_q - W), 0.0)
    return per_element, grad


@pytest.mark.parametrize(
    "aggregation, reduce, grad_factor",
    [
        (
            "kernel_mean",
            lambda e: e.sum(-1).mean(),
            1 / 2,
        ),  # sum over the 3 outputs, mean over 2 inputs
        ("sum", np.sum, 1.0),
        ("mean", np.mean, 1 / 6),
    ],
)
def test_value_and_gradient_match_the_closed_form(aggregation, reduce, grad_factor):
    per_element, grad = closed_form()
    f = lambda w: dampening.dampening_loss(w, jnp.float32(S), **GRID, aggregation=aggregation)  # noqa: E731
    np.testing.assert_allclose(f(jnp.asarray(W)), reduce(per_element), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(f)(jnp.asarray(W)), grad * grad_factor, rtol=1e-5, atol=1e-7
    )


def test_clipped_weights_contribute_nothing_and_the_scale_gets_no_gradient():
    w = jnp.asarray([[2.0, -3.0], [0.9, -1.2]], jnp.float32)  # all beyond [-1, 0.75]
    value, grads = jax.value_and_grad(
        lambda w, s: dampening.dampening_loss(w, s, **GRID, aggregation="sum"), argnums=(0, 1)
    )(w, jnp.float32(S))
    assert float(value) == 0.0
    np.testing.assert_array_equal(grads[0], 0.0)
    assert float(grads[1]) == 0.0


def test_no_gradient_flows_into_the_quantized_target():
    w = jnp.asarray(W)
    w_q = quant.fake_quant(w, S, **GRID)
    # Pass a target that depends on w: only the latent side may carry gradient.
    grad = jax.grad(
        lambda w: dampening.dampening_loss_from_quantized(w, 3.0 * w, S, **GRID, aggregation="sum")
    )(w)
    inside = np.abs(np.clip(W, -1, 0.75) - W) == 0
    np.testing.assert_allclose(grad, np.where(inside, -2 * (3 * W - W), 0.0), rtol=1e-5)
    # With the forward's own quantized weight it equals dampening_loss.
    np.testing.assert_allclose(
        dampening.dampening_loss_from_quantized(w, w_q, S, **GRID),
        dampening.dampening_loss(w, S, **GRID),
        rtol=1e-6,
    )


def test_frozen_weights_are_pulled_to_their_frozen_value():
    frozen = jnp.asarray([[True, False, False], [False, False, False]])
    frozen_int = jnp.full(W.shape, 2.0)
    got = dampening.dampening_loss(
        jnp.asarray(W), S, **GRID, aggregation="sum", frozen=frozen, frozen_int=frozen_int
    )
    per_element, _ = closed_form()
    per_element[0, 0] = (0.5 - W[0, 0]) ** 2  # frozen at integer 2 -> 0.5
    np.testing.assert_allclose(got, per_element.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="together"):
        dampening.dampening_loss(jnp.asarray(W), S, **GRID, frozen=frozen)


def test_per_channel_scales_and_asymmetric_grids():
    scale = jnp.asarray([[0.25, 0.5, 0.125]], jnp.float32)
    got = dampening.dampening_loss(jnp.asarray(W), scale, **GRID, aggregation="sum")
    s = np.asarray(scale)
    w_int = np.round(W / s)
    inside = (w_int >= -4) & (w_int <= 3)
    expected = np.where(inside, (s * np.clip(w_int, -4, 3) - W) ** 2, 0.0).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Asymmetric: zero point 2 on [0, 7] with scale 0.25 gives bounds [-0.5, 1.25].
    got = dampening.dampening_loss(
        jnp.asarray(W), S, 2.0, n_bits=3, signed=False, aggregation="sum"
    )
    v = np.round(W / S) + 2
    inside = (v >= 0) & (v <= 7)
    expected = np.where(inside, (S * (np.clip(v, 0, 7) - 2) - W) ** 2, 0.0).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        dampening.dampening_loss(jnp.asarray(W), S, **GRID, aggregation="median")


def test_tree_helper_sums_layers_and_works_as_an_optax_loss_term():
    rng = np.random.default_rng(0)
    params = {
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32),
        "dense": jnp.asarray(rng.normal(size=(4, 5)) * 0.3, jnp.float32),
    }
    scales = {"conv": jnp.float32(0.1), "dense": jnp.full((1, 5), 0.2, jnp.float32)}
    state = oscillation.init(quant.to_int(params["dense"], scales["dense"], n_bits=4, signed=True))

    def damp(params):
        tree = {
            "conv": dampening.DampeningTarget(params["conv"], scales["conv"], n_bits=4),
            "head": [
                dampening.DampeningTarget(
                    params["dense"],
                    scales["dense"],
                    frozen=state.frozen,
                    frozen_int=state.frozen_int,
                    n_bits=4,
                )
            ],
        }
        return dampening.tree_dampening_loss(tree)

    expected = dampening.dampening_loss(params["conv"], scales["conv"], n_bits=4, signed=True) + (
        dampening.dampening_loss(params["dense"], scales["dense"], n_bits=4, signed=True)
    )
    np.testing.assert_allclose(damp(params), expected, rtol=1e-6)

    x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    target = x @ params["dense"]  # the task loss starts at its minimum

    def loss(params, weight):
        task = jnp.mean((x @ params["dense"] - target) ** 2)
        return task + weight * damp(params)

    opt = optax.sgd(0.05)
    opt_state = opt.init(params)
    before = float(damp(params))
    step = jax.jit(lambda p, s, lam: _sgd_step(opt, loss, p, s, lam))
    for _ in range(20):
        params, opt_state = step(params, opt_state, jnp.float32(1.0))
    assert float(damp(params)) < 0.5 * before


def _sgd_step(opt, loss, params, opt_state, weight):
    grads = jax.grad(loss)(params, weight)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
