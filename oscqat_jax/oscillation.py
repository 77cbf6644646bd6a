"""Oscillation tracking and iterative weight freezing in the integer domain (docs/method.md §5-6).

The state of one weight tensor is an :class:`OscillationState`, a pytree of arrays shaped
like the weight (plus one scalar flag). :func:`update` is called once per *training* step
with the tensor's current integer values and returns the integers the forward pass must use
(frozen entries replaced) together with the new state. Nothing here is Flax: the Flax layers
keep these fields in their ``oscillation`` variable collection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from oscqat_jax._checks import as_float_array

EMA_MOMENTUM = 0.001
"""The paper's momentum of the oscillation-frequency and integer EMAs (docs/method.md §5, §6)."""
OSC_LEVEL = 0.005
"""The ``ema_osc`` above which summaries count a weight as oscillating."""


class OscillationState(NamedTuple):
    """Per-element tracking and freezing state of one quantized weight tensor.

    Attributes (all shaped like the weight unless stated):
      prev_int: integer value seen at the previous training step (float32).
      prev_dir: direction of the last non-zero integer change, -1, 0 or +1 (int8).
      ema_osc: exponential moving average of "this change reversed the previous one",
        i.e. the oscillation frequency per step (float32).
      ema_int: exponential moving average of the integer value, the value a weight is
        frozen to (float32); it starts at the first step with a positive threshold.
      frozen: whether the weight is frozen (bool); a frozen weight never unfreezes.
      frozen_int: the integer value a frozen weight is held at (float32).
      freezing_started: scalar bool, True once a step with a positive threshold has run
        (before that ``ema_int`` holds no average yet).
    """

    prev_int: jax.Array
    prev_dir: jax.Array
    ema_osc: jax.Array
    ema_int: jax.Array
    frozen: jax.Array
    frozen_int: jax.Array
    freezing_started: jax.Array


def init(w_int: jax.Array) -> OscillationState:
    """Fresh state for a weight whose current integer values are ``w_int``.

    ``prev_int`` starts at ``w_int`` and ``prev_dir`` at 0, so the first change never counts
    as an oscillation.
    """
    w_int = jax.lax.stop_gradient(as_float_array(w_int, "w_int")).astype(jnp.float32)
    return OscillationState(
        prev_int=w_int,
        prev_dir=jnp.zeros(w_int.shape, jnp.int8),
        ema_osc=jnp.zeros(w_int.shape, jnp.float32),
        ema_int=w_int,
        frozen=jnp.zeros(w_int.shape, jnp.bool_),
        frozen_int=jnp.zeros(w_int.shape, jnp.float32),
        freezing_started=jnp.zeros((), jnp.bool_),
    )


def _check_shapes(state: OscillationState, w_int: jax.Array) -> None:
    if not isinstance(state, OscillationState):
        raise ValueError(
            f"state must be an OscillationState (from oscillation.init), got {type(state).__name__}."
        )
    if tuple(state.prev_int.shape) != tuple(w_int.shape):
        raise ValueError(
            f"w_int has shape {tuple(w_int.shape)} but the oscillation state was created for "
            f"shape {tuple(state.prev_int.shape)}; pass the integer weights of the same tensor."
        )


def apply_frozen(state: OscillationState, w_int: jax.Array) -> jax.Array:
    """``w_int`` with frozen entries replaced by ``frozen_int`` (no gradient reaches those)."""
    _check_shapes(state, w_int)
    return jnp.where(state.frozen, state.frozen_int.astype(w_int.dtype), w_int)


def update(
    state: OscillationState,
    w_int: jax.Array,
    *,
    momentum,
    freeze_threshold,
    use_ema: bool = True,
) -> tuple[jax.Array, OscillationState]:
    """One training step of tracking and freezing.

    Args:
      state: the tensor's state.
      w_int: its current clipped integer values (floats, e.g. from ``quant.to_int``); may
        carry STE gradients, which pass through for entries that are not frozen.
      momentum: EMA momentum ``m`` (0.001 in the paper's recipes); a float or scalar array.
      freeze_threshold: ``f_th``; freezing is active only while it is > 0. A scalar array
        so that a schedule can change it without recompiling.
      use_ema: freeze to the rounded EMA of the integer value (True, the recipes) or to the
        current integer value (False).

    As docs/method.md §6 and the reference, the freeze test ``ema_osc > f_th`` applies to
    every weight: while an already-frozen weight's frequency stays above the threshold, its
    frozen value is re-set to ``round(ema_int)`` (with the recipes' slow momentum this almost
    never changes it).

    Returns:
      ``(w_int_used, new_state)``: the integers the forward pass uses (frozen entries
      replaced by their frozen value) and the state after this step. A freeze decided at
      this step takes effect from the next call.
    """
    w_used = apply_frozen(state, w_int)
    x = jax.lax.stop_gradient(w_used).astype(jnp.float32)
    m = jnp.asarray(momentum, jnp.float32)
    f_th = jnp.asarray(freeze_threshold, jnp.float32)

    delta = jnp.round(state.prev_int - x)
    direction = jnp.sign(delta).astype(jnp.int8)
    oscillated = (state.prev_dir * direction) == -1
    ema_osc = m * oscillated.astype(jnp.float32) + (1 - m) * state.ema_osc
    prev_dir = jnp.where(delta != 0, direction, state.prev_dir)

    active = f_th > 0
    newly = active & (ema_osc > f_th)
    frozen = state.frozen | newly
    if use_ema:
        ema_int_before = jnp.where(state.freezing_started, state.ema_int, x)
        frozen_int = jnp.where(newly, jnp.round(ema_int_before), state.frozen_int)
        ema_int = jnp.where(active, m * x + (1 - m) * ema_int_before, state.ema_int)
    else:
        frozen_int = jnp.where(newly, x, state.frozen_int)
        ema_int = state.ema_int

    new_state = OscillationState(
        prev_int=x,
        prev_dir=prev_dir,
        ema_osc=ema_osc,
        ema_int=ema_int,
        frozen=frozen,
        frozen_int=frozen_int,
        freezing_started=state.freezing_started | active,
    )
    return w_used, new_state


def _states(tree) -> list[OscillationState]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, OscillationState))
    states = [leaf for leaf in leaves if isinstance(leaf, OscillationState)]
    if not states:
        raise ValueError("summary needs an OscillationState or a pytree containing at least one.")
    return states


def summary(state_or_tree, level: float = OSC_LEVEL) -> dict[str, jax.Array]:
    """Fractions for logging: weights oscillating (``ema_osc > level``), frozen, mean frequency.

    Accepts one :class:`OscillationState` or any pytree of them (for example a model's whole
    ``oscillation`` collection); fractions are then over all tracked elements together.
    Returns float32 scalars under ``"oscillating"``, ``"frozen"``, ``"mean_frequency"`` and
    the element count under ``"num_weights"``.
    """
    states = _states(state_or_tree)
    count = sum(s.ema_osc.size for s in states)
    osc = sum(jnp.sum(s.ema_osc > level, dtype=jnp.float32) for s in states)
    frz = sum(jnp.sum(s.frozen, dtype=jnp.float32) for s in states)
    freq = sum(jnp.sum(s.ema_osc, dtype=jnp.float32) for s in states)
    return {
        "oscillating": osc / count,
        "frozen": frz / count,
        "mean_frequency": freq / count,
        "num_weights": jnp.asarray(count, jnp.int32),
    }
