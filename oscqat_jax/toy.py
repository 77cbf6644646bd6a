"""The paper's 1-D toy regression (docs/method.md §1), solved with the functional core.

``min_w  E[x^2] / 2 * (q(w) - w_star)^2`` by plain gradient descent with the STE, where
``q`` is the project's fake quantizer with a fixed scale. The optimum ``w_star`` lies
between two grid points, so the latent weight hovers at the rounding threshold and the
quantized weight flips between the two neighbours about ``2 d / s`` times per step
(``d``: distance from ``w_star`` to its nearest grid point, ``s``: the grid step). Optional
freezing and dampening show how each remedy stops the flipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax import dampening, oscillation, quant


class ToyTrajectory(NamedTuple):
    """Per-step record of a toy run; every field has shape ``(num_steps,)``.

    ``w`` and ``q`` are the latent and quantized weight used at the step (before its
    update), ``grad`` the total gradient applied, ``frozen`` whether the weight was frozen,
    ``dampening_weight`` and ``freeze_threshold`` the values of ``lambda`` and ``f_th`` in
    force at the step.
    """

    w: jax.Array
    q: jax.Array
    grad: jax.Array
    frozen: jax.Array
    dampening_weight: jax.Array
    freeze_threshold: jax.Array


Schedule = Callable[[jax.Array], jax.Array]
"""A step -> value callable, e.g. an ``optax.Schedule`` from :mod:`oscqat_jax.schedules`."""


def _as_schedule(value: float | Schedule) -> Schedule:
    if callable(value):
        return value
    constant = jnp.asarray(value, jnp.float32)
    return lambda step: constant


def toy_regression(
    w_star: float,
    w_init: float,
    *,
    lr: float = 0.14,
    num_steps: int = 60,
    scale: float = 1 / 15,
    n_bits: int = 4,
    signed: bool = False,
    ex2: float = 1.0,
    dampening_weight: float | Schedule = 0.0,
    freeze_threshold: float | Schedule = 0.0,
    momentum: float = 0.01,
) -> ToyTrajectory:
    """Runs ``num_steps`` of gradient descent on the toy problem under ``jax.lax.scan``.

    Defaults are the reference animation's: a 4-bit unsigned grid of step 1/15 on [0, 1]
    and ``lr * E[x^2] = 0.14``. ``dampening_weight`` adds ``lambda * L_d``;
    ``freeze_threshold`` > 0 turns on iterative freezing with EMA ``momentum``. Both take a
    number or a schedule evaluated at the 0-based step index, e.g.
    ``schedules.freeze_threshold_schedule(0.5, 0.1, total_steps=num_steps)``.
    """
    f32 = jnp.float32
    s = jnp.asarray(scale, f32)
    target = jnp.asarray(w_star, f32)
    coeff = jnp.asarray(ex2, f32)
    lam_at = _as_schedule(dampening_weight)
    f_th_at = _as_schedule(freeze_threshold)
    step_size = jnp.asarray(lr, f32)
    grid = dict(n_bits=n_bits, signed=signed)

    def loss_fn(w, state, lam, f_th):
        w_int, new_state = oscillation.update(
            state, quant.to_int(w, s, **grid), momentum=momentum, freeze_threshold=f_th
        )
        q = quant.dequantize(w_int, s, **grid)
        damp = dampening.dampening_loss_from_quantized(w, q, s, **grid, aggregation="sum")
        return 0.5 * coeff * (q - target) ** 2 + lam * damp, (q, new_state)

    def step(carry, t):
        w, state = carry
        lam = jnp.asarray(lam_at(t), f32)
        f_th = jnp.asarray(f_th_at(t), f32)
        grad, (q, new_state) = jax.grad(loss_fn, has_aux=True)(w, state, lam, f_th)
        record = ToyTrajectory(
            w=w, q=q, grad=grad, frozen=state.frozen, dampening_weight=lam, freeze_threshold=f_th
        )
        return (w - step_size * grad, new_state), record

    w0 = jnp.asarray(w_init, f32)
    state0 = oscillation.init(quant.to_int(w0, s, **grid))
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    _, trajectory = jax.lax.scan(step, (w0, state0), steps)
    return trajectory


def flips_per_step(q) -> float:
    """How often the quantized weight changes value, per step, over a trajectory's ``q``."""
    q = np.asarray(q)
    return float(np.count_nonzero(np.diff(q))) / max(len(q) - 1, 1)


def predicted_flips_per_step(w_star, scale: float):
    """The law ``2 d / s``: ``d`` is the distance from ``w_star`` to its nearest grid point.

    ``w_star`` is a number (a float is returned) or an array of optima (an array is returned).
    """
    u = np.asarray(w_star, np.float64) / scale
    flips = 2.0 * np.abs(u - np.round(u))
    return float(flips) if flips.ndim == 0 else flips
