"""Schedules as plain ``optax.Schedule`` callables (step -> float32 scalar), jit-friendly.

Values enter a jitted training step as arrays, so changing them never recompiles it.
The reference evaluates its schedules at the 1-based iteration number; a trainer that
counts updates from 0 passes ``step + 1`` to reproduce it exactly.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import optax


def _check_number(value, name: str, *, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return float(value)


def _check_total_steps(total_steps) -> int:
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, numbers.Integral)
        or total_steps < 1
    ):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
    return int(total_steps)


def _check_anneal_start(anneal_start) -> float:
    anneal_start = _check_number(anneal_start, "anneal_start")
    if not 0.0 <= anneal_start < 1.0:
        raise ValueError(f"anneal_start must be in [0, 1), got {anneal_start}.")
    return anneal_start


def constant(value: float) -> optax.Schedule:
    """A schedule that always returns ``value`` (as a float32 scalar)."""
    value = _check_number(value, "value")
    return lambda step: jnp.full((), value, jnp.float32)


def cosine_anneal(
    start: float,
    final: float,
    total_steps: int,
    anneal_start: float = 0.25,
    *,
    before_start: float = 0.0,
) -> optax.Schedule:
    """Cosine from ``start`` to ``final`` between ``anneal_start * total_steps`` and ``total_steps``.

    ``f(t) = final + (start - final) * (1 + cos(pi * (t - t0) / (T - t0))) / 2`` for
    ``t0 <= t <= T`` (held at ``final`` after T), and ``before_start`` for ``t < t0``: 0 for the
    freezing threshold (tracking runs meanwhile, nothing freezes), the start value for a
    dampening weight that should be in force from the beginning.
    """
    start = _check_number(start, "start")
    final = _check_number(final, "final")
    before_start = _check_number(before_start, "before_start")
    total = _check_total_steps(total_steps)
    t0 = _check_anneal_start(anneal_start) * total

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        rel = jnp.clip((t - t0) / (total - t0), 0.0, 1.0)
        annealed = final + 0.5 * (start - final) * (1.0 + jnp.cos(jnp.pi * rel))
        return jnp.where(t < t0, before_start, annealed).astype(jnp.float32)

    return schedule


def freeze_threshold_schedule(
    threshold: float,
    threshold_final: float | None = None,
    total_steps: int | None = None,
    anneal_start: float = 0.25,
) -> optax.Schedule:
    """The freezing threshold ``f_th(t)`` of docs/method.md §6.

    Without ``threshold_final`` the threshold is ``threshold`` from the first step; with it,
    0 (no freezing) until ``anneal_start * total_steps``, then cosine to ``threshold_final``.
    """
    threshold = _check_number(threshold, "freeze_threshold", non_negative=True)
    if threshold_final is None:
        return constant(threshold)
    threshold_final = _check_number(threshold_final, "freeze_threshold_final", non_negative=True)
    if total_steps is None:
        raise ValueError("total_steps is required when threshold_final is set.")
    return cosine_anneal(threshold, threshold_final, total_steps, anneal_start, before_start=0.0)


def dampening_weight_schedule(
    weight: float,
    weight_final: float | None = None,
    total_steps: int | None = None,
    anneal_start: float = 0.25,
) -> optax.Schedule:
    """The dampening weight ``lambda(t)`` of docs/method.md §7.

    Without ``weight_final`` it is ``weight`` throughout; with it, ``weight`` until
    ``anneal_start * total_steps`` (0 in the recipes), then cosine to ``weight_final``.
    """
    weight = _check_number(weight, "dampening_weight", non_negative=True)
    if weight_final is None:
        return constant(weight)
    weight_final = _check_number(weight_final, "dampening_weight_final", non_negative=True)
    if total_steps is None:
        raise ValueError("total_steps is required when weight_final is set.")
    return cosine_anneal(weight, weight_final, total_steps, anneal_start, before_start=weight)


def cosine_lr(
    base_lr: float,
    total_steps: int,
    *,
    final_lr: float = 0.0,
    warmup_steps: int = 0,
    steps_per_epoch: int | None = None,
) -> optax.Schedule:
    """Cosine learning-rate decay from ``base_lr`` to ``final_lr`` over ``total_steps``.

    ``final_lr`` > 0 keeps a floor (short runs use one so oscillations stay visible).
    ``warmup_steps`` ramps linearly from 0 first. With ``steps_per_epoch`` the rate changes
    once per epoch, as an epoch-stepped PyTorch scheduler does.
    """
    base_lr = _check_number(base_lr, "base_lr", non_negative=True)
    final_lr = _check_number(final_lr, "final_lr", non_negative=True)
    total = _check_total_steps(total_steps)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral):
        raise ValueError(f"warmup_steps must be an int, got {warmup_steps!r}.")
    if not 0 <= warmup_steps < total:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}.")
    if steps_per_epoch is not None and (
        not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1
    ):
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}.")

    decay_steps = total - warmup_steps

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        decay_t = t - warmup_steps
        if steps_per_epoch is not None:
            decay_t = jnp.floor(decay_t / steps_per_epoch) * steps_per_epoch
        rel = jnp.clip(decay_t / decay_steps, 0.0, 1.0)
        lr = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + jnp.cos(jnp.pi * rel))
        if warmup_steps:
            lr = jnp.where(t < warmup_steps, base_lr * t / warmup_steps, lr)
        return lr.astype(jnp.float32)

    return schedule
