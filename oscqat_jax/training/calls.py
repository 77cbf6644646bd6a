"""How the training loop calls the device: one step per call, or up to
``train.steps_per_call`` = K steps in one compiled call.

A small model on a fast device spends most of a step in the dispatch and the host's input
(Keras's ``steps_per_execution`` answers the same problem). With K > 1 the loop calls
:func:`~oscqat_jax.training.step.make_multi_step`, a ``jax.lax.scan`` over K rows of the
schedules' table and K batches; the training images stay on the device when the source is in
memory and at most ``data.resident_max_mb`` (:mod:`.data.resident`: each step gathers its
batch there from a plan drawn on the host from ``(seed, step)``), else K host batches are
stacked and sent together. Either way each step reads the batch and the schedule values it
reads with K = 1, so a run ends in the same state, to float32 rounding.

A call ends where the loop must look at the state: at every logging flush, end of epoch,
checkpoint, ``train.stop_at_step`` and the end of the phase (:func:`call_length`); a shorter
call runs the same compiled K-step program with its last rows switched off, so nothing is
recompiled, and every phase runs exactly its steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context
from oscqat_jax.training.data import resident


def call_length(
    done: int, *, steps_per_call: int, total: int, every: Sequence[int], stop_at: int = 0
) -> int:
    """Steps of the call that starts after ``done`` steps: at most ``steps_per_call``, ending
    at the phase's ``total``, at the next multiple of each interval in ``every`` (logging,
    epoch, checkpoints) and at ``stop_at`` when it lies ahead."""
    end = min(done + steps_per_call, total)
    for interval in every:
        end = min(end, (done // interval + 1) * interval)
    if done < stop_at < end:
        end = stop_at
    return end - done


class OneStep:
    """K = 1: one jitted step per call, fed a host batch."""

    stacked = False

    def __init__(self, ctx: Context, step_fn: Callable, table: dict[str, np.ndarray], start: int):
        self.ctx, self.table = ctx, table
        self.train_step = ctx.sharded.jit_train_step(step_fn)
        self.batches = ctx.train_batches(start)

    def describe(self) -> str:
        return ""

    def __call__(self, state, step: int, count: int):
        """Runs step ``step`` (0-based; ``count`` is 1): ``(state, metrics)``."""
        batch = self.ctx.sharded.put_batch(next(self.batches))
        return self.train_step(state, batch, step_lib.hparams_at(self.table, step))


class ManySteps:
    """K > 1: up to K steps per jitted call, fed batch plans of the resident images or
    stacked host batches."""

    stacked = True

    def __init__(
        self,
        ctx: Context,
        step_fn: Callable,
        table: dict[str, np.ndarray],
        start: int,
        steps_per_call: int,
    ):
        self.ctx, self.table, self.k = ctx, table, steps_per_call
        source, config = ctx.source, ctx.config
        self.resident = resident.fits(source, config.data.resident_max_mb)
        if self.resident:
            self.data = resident.put(source, ctx.sharded.replicated)
            plans = source.train_plans(
                start,
                batch_size=config.data.batch_size,
                seed=config.seed,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            self.inputs: Iterator = map(resident.plan_arrays, plans)
            fetch = functools.partial(resident.gather, max_shift=source.max_shift, flip=source.flip)
        else:
            self.data = None
            self.inputs = ctx.train_batches(start)
            fetch = _batch_itself
        self.multi = ctx.sharded.jit_multi_step(step_fn, fetch)

    def describe(self) -> str:
        where = (
            f"the training images on the device ({resident.nbytes(self.ctx.source) / 2**20:.3g} MiB)"
            if self.resident
            else "batches from the host"
        )
        return f"up to {self.k} steps per call, {where}"

    def __call__(self, state, step: int, count: int):
        """Runs steps ``step .. step + count - 1`` (0-based) in one call: ``(state, metrics)``
        with each metric ``[K]`` (rows from ``count`` on are zeros)."""
        rows = [next(self.inputs) for _ in range(count)]
        pad = [jax.tree_util.tree_map(np.zeros_like, rows[0])] * (self.k - count)
        inputs = jax.tree_util.tree_map(lambda *r: np.stack(r), *rows, *pad)
        index = np.minimum(np.arange(step, step + self.k), len(next(iter(self.table.values()))) - 1)
        call = {
            "active": np.arange(self.k) < count,
            "hparams": {name: column[index] for name, column in self.table.items()},
            "inputs": self.ctx.sharded.put_stacked(inputs),
        }
        return self.multi(state, self.data, call)


def _batch_itself(data, batch):
    return batch


def runner(
    ctx: Context, step_fn: Callable, table: dict[str, np.ndarray], start: int
) -> OneStep | ManySteps:
    """What the loop calls to advance from step ``start``: ``run(state, step, count)``."""
    k = ctx.config.train.steps_per_call
    if k == 1:
        return OneStep(ctx, step_fn, table, start)
    return ManySteps(ctx, step_fn, table, start, k)
