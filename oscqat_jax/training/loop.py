"""The training loop shared by the float and QAT phases: steps, logging, checkpoints, and the
deferred check of the loss.

Step metrics stay on the device until a flush (every ``train.log_every`` steps, at the end of
an epoch and before a checkpoint), so the loop never waits for the device in between; a
non-finite loss is therefore noticed at the next flush, and the error names the newest
checkpoint written before it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from oscqat_jax.nn import collect
from oscqat_jax.training import checkpoint, metrics
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context


class PendingMetrics:
    """Step metrics kept on device until the next flush (no host sync every step)."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def add(self, step: int, step_metrics: dict) -> None:
        self.rows.append((step, step_metrics))

    def flush(self, last_good: int | None, workdir: str) -> dict[str, float]:
        """Fetches the metrics, stops on a non-finite loss, returns the interval's means."""
        rows = [(s, jax.device_get(m)) for s, m in self.rows]
        self.rows = []
        for s, m in rows:
            if not np.isfinite(m["loss"]):
                kept = (
                    f"the last good checkpoint (step {last_good}) in {workdir} is kept"
                    if last_good is not None
                    else "no checkpoint was written"
                )
                raise FloatingPointError(
                    f"The training loss became {float(m['loss'])} at step {s}; stopping ({kept})."
                )
        if not rows:
            return {}
        return {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}


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
    pending = PendingMetrics()
    start = int(state.step)
    last_good = start if ckpt is not None and ckpt.latest_step() is not None else None
    bar = metrics.progress_bar(total_steps, desc=prefix, initial=start)
    try:
        batches = ctx.train_batches(start)
        for step in range(start, total_steps):
            batch = ctx.sharded.put_batch(next(batches))
            state, step_metrics = train_step(state, batch, step_lib.hparams_at(table, step))
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
            bar.update(1)
            if end_of_epoch:
                epoch = -(-done // per_epoch)
                _print_epoch(bar, prefix, epoch, means)
                if on_epoch_end is not None:
                    state = on_epoch_end(epoch, state)
            if save:
                ckpt.save(done, state, force=True)
                last_good = done
            if stopping:
                bar.close()
                return state, False
        bar.close()
        return state, True
    except BaseException:
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
