"""The training loop shared by the float and QAT phases: steps, logging, checkpoints, and the
deferred check of the loss.

Step metrics stay on the device until a flush (every ``train.log_every`` steps, at the end of
an epoch and before a checkpoint), so the loop never waits for the device in between; a
non-finite loss, or a finite one far above its recent level (``train.divergence_factor``), is
therefore noticed at the next flush. Before a checkpoint is written, the state itself is
checked to be finite (the loss of a step is computed from the parameters before its update,
the checkpoint holds those after it), so every checkpoint the loop writes is a good one, and
the error names the newest of them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.nn import collect
from oscqat_jax.training import checkpoint, metrics
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context


class TrainingStopped(FloatingPointError):
    """The loss or the state went bad; the message names the newest good checkpoint."""


def _kept(last_good: int | None, workdir: str) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint (step {last_good}) in {workdir} is kept"


class PendingMetrics:
    """Step metrics kept on device until the next flush (no host sync every step), and the
    loss levels that divergence is measured against.

    A phase has diverged when the mean loss of a flush interval exceeds
    ``divergence_factor`` times the median of the last :attr:`HISTORY` interval means and is
    above the first interval's mean: a loss still below where the phase started is noise
    (a loss near zero may jump many times over from one interval to the next), not divergence.
    """

    HISTORY = 10

    def __init__(self, divergence_factor: float = 0.0):
        self.rows: list[tuple[int, dict]] = []
        self.divergence_factor = divergence_factor
        self.levels: list[float] = []
        self.first_level: float | None = None

    def add(self, step: int, step_metrics: dict) -> None:
        self.rows.append((step, step_metrics))

    def flush(self, last_good: int | None, workdir: str) -> dict[str, float]:
        """Fetches the metrics, stops on a non-finite or diverging loss, returns the
        interval's means."""
        rows = [(s, jax.device_get(m)) for s, m in self.rows]
        self.rows = []
        for s, m in rows:
            if not np.isfinite(m["loss"]):
                raise TrainingStopped(
                    f"The training loss became {float(m['loss'])} at step {s}; stopping "
                    f"({_kept(last_good, workdir)})."
                )
        if not rows:
            return {}
        means = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}
        loss = means["loss"]
        if self.divergence_factor and self.levels:
            level = float(np.median(self.levels))
            if loss > self.divergence_factor * level and loss > self.first_level:
                raise TrainingStopped(
                    f"The training loss rose to {loss:.4g} (mean of steps {rows[0][0]}-"
                    f"{rows[-1][0]}), more than train.divergence_factor = "
                    f"{self.divergence_factor:g} times its recent level {level:.4g}; stopping "
                    f"as diverged ({_kept(last_good, workdir)})."
                )
        if self.first_level is None:
            self.first_level = loss
        self.levels = (self.levels + [loss])[-self.HISTORY :]
        return means


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_finite(state: step_lib.TrainState, step: int, last_good: int | None, workdir: str):
    """Raises :class:`TrainingStopped` unless every floating value of ``state`` is finite."""
    if not bool(_all_finite(state)):
        raise TrainingStopped(
            f"The train state after step {step} holds non-finite values, so it was not saved; "
            f"stopping ({_kept(last_good, workdir)})."
        )


EpochEnd = Callable[[int, step_lib.TrainState], step_lib.TrainState]


def train_phase(
    ctx: Context,
    *,
    state: step_lib.TrainState,
    train_step: Callable,
    table: dict[str, np.ndarray],
    total_steps: int,
    prefix: str,
    ckpt: checkpoint.Checkpointer | None,
    on_epoch_end: EpochEnd | None,
    stop_at: int = 0,
) -> tuple[step_lib.TrainState, bool]:
    """Runs ``train_step`` from ``state.step`` to ``total_steps`` (or ``stop_at``) with logging
    and checkpoints; returns the state and whether the phase is complete."""
    per_epoch = ctx.steps_per_epoch
    log_every = ctx.config.train.log_every
    pending = PendingMetrics(ctx.config.train.divergence_factor)
    start = int(state.step)
    last_good = start if ckpt is not None and ckpt.latest_step() is not None else None
    bar = None
    try:
        batches = ctx.train_batches(start)
        for step in range(start, total_steps):
            batch = ctx.sharded.put_batch(next(batches))
            if bar is None:
                print(f"{prefix}: compiling the train step ...", flush=True)
            state, step_metrics = train_step(state, batch, step_lib.hparams_at(table, step))
            if bar is None:
                # The first call returns once compiled: the bar's rate leaves compilation out.
                bar = metrics.progress_bar(total_steps, desc=prefix, initial=step + 1)
            pending.add(step + 1, step_metrics)
            done = step + 1
            end_of_epoch = done % per_epoch == 0 or done == total_steps
            stopping = done == stop_at and done < total_steps
            save = ckpt is not None and (
                done % ctx.config.train.checkpoint_every == 0 or done == total_steps or stopping
            )
            if done % log_every == 0 or end_of_epoch or save:
                means = pending.flush(last_good, ctx.workdir)
                if "osc/oscillating" in means:
                    groups = collect.oscillation_groups(
                        state.oscillation, ctx.config.train.osc_level
                    )
                    means.update({f"osc/{k}": v for k, v in groups.items()})
                means.update({f"data/{k}": v for k, v in ctx.source.stats().items()})
                ctx.writer.write(done, means, prefix=prefix)
                bar.set_postfix(loss=f"{means['loss']:.3f}")
            if step > start:
                bar.update(1)
            if end_of_epoch:
                epoch = -(-done // per_epoch)
                _print_epoch(bar, prefix, epoch, means)
                if on_epoch_end is not None:
                    state = on_epoch_end(epoch, state)
            if save:
                check_finite(state, done, last_good, ctx.workdir)
                ckpt.save(done, state, force=True)
                last_good = done
            if stopping:
                bar.close()
                return state, False
        if bar is not None:
            bar.close()
        return state, True
    except BaseException:
        if bar is not None:
            bar.close()
        # A checkpoint still being written (e.g. the last good one before a NaN) is
        # completed before the error reaches the user.
        if ckpt is not None:
            ckpt.wait()
        raise


def _print_epoch(bar, prefix: str, epoch: int, means: dict[str, float]) -> None:
    osc = (
        f", oscillating {100 * means['osc/oscillating']:.2f} %"
        if "osc/oscillating" in means
        else ""
    )
    bar.write(
        f"{prefix} epoch {epoch}: loss {means['loss']:.4f}, "
        f"batch top-1 {100 * means['top1']:.1f} %{osc}"
    )
