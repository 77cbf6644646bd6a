"""The training loop shared by the float and QAT phases: steps, logging, checkpoints, and the
deferred check of the loss.

Step metrics stay on the device until a flush (every ``train.log_every`` steps, at the end of
an epoch and before a checkpoint), so the loop never waits for the device in between; a
non-finite loss, or an interval whose mean loss is far above the run's recent level
(``train.divergence_factor``), is therefore noticed at the next flush. The recent level comes
from the run's own history: a resumed run reads the interval means it logged before its
checkpoint back from ``metrics.jsonl``, so it judges its losses as the uninterrupted run does.

A checkpoint is judged by the losses that follow it. The checkpoint of step ``s`` holds the
parameters that step ``s + 1`` computes its loss from, so it is *provisional* until the flush
that holds step ``s + 1``: when that flush finds nothing wrong, the checkpoint is good; when it
stops the run, the checkpoint is good only if the loss of step ``s + 1`` was sane itself
(finite, and within the factor of the recent level). A stop names the newest good checkpoint
and moves every newer one aside (``<step>.diverged-at-<stop step>``, never deleted), so a
re-run resumes from the newest good one; rotation (``train.keep_checkpoints``) never deletes
it. Before a checkpoint is written, the state is also checked to be finite (the loss of a step
is computed from the parameters before its update, the checkpoint holds those after it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from oscqat_jax.nn import collect
from oscqat_jax.training import calls, checkpoint, metrics, peers
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context


class TrainingStopped(FloatingPointError):
    """The loss or the state went bad; the message names the newest good checkpoint."""


def _kept(last_good: int | None, workdir: str) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint (step {last_good}) in {workdir} is kept"


@dataclasses.dataclass(frozen=True)
class Interval:
    """The metrics of one flush interval, fetched from the device."""

    means: dict[str, float]
    """Each metric's mean over the interval's steps (empty when the loss is not finite)."""
    losses: dict[int, float]
    """Each step's loss, by the number of the step (1-based: steps done)."""
    level: float | None
    """The recent level the interval was measured against (``None``: no history yet)."""
    problem: str | None
    """Why the run must stop, the start of a sentence (``"... at step 8; stopping"``);
    ``None`` when nothing is wrong."""


class PendingMetrics:
    """Step metrics kept on device until the next flush (no host sync every step), and the
    loss levels that divergence is measured against.

    An interval has diverged when its mean loss exceeds ``divergence_factor`` times the
    median of the last :attr:`HISTORY` interval means before it, the run's own history
    (``history``: the means a resumed run logged before its checkpoint, oldest first). No
    other condition lets an interval pass: comparing with the phase's first interval as
    well let a real divergence through whenever that interval was high, and a resumed run
    does not see the uninterrupted run's first interval.
    """

    HISTORY = 10

    def __init__(self, divergence_factor: float = 0.0, history: Sequence[float] = ()):
        self.rows: list[tuple[int, int, dict]] = []
        self.divergence_factor = divergence_factor
        self.levels: list[float] = [float(v) for v in history][-self.HISTORY :]

    def add(self, step: int, step_metrics: dict) -> None:
        self.rows.append((step, 0, step_metrics))

    def add_stacked(self, first_step: int, count: int, stacked: dict) -> None:
        """The metrics of steps ``first_step .. first_step + count - 1`` (1-based), each
        metric an array whose first ``count`` rows are theirs (a multi-step call's)."""
        self.rows.append((first_step, count, stacked))

    def _fetch(self) -> list[tuple[int, dict]]:
        rows = []
        for step, count, values in self.rows:
            values = jax.device_get(values)
            if not count:
                rows.append((step, values))
                continue
            rows += [(step + i, {k: v[i] for k, v in values.items()}) for i in range(count)]
        self.rows = []
        return rows

    def level(self) -> float | None:
        """The recent level: the median of the last interval means (``None`` without any)."""
        return float(np.median(self.levels)) if self.levels else None

    def is_sane(self, loss: float, level: float | None) -> bool:
        """Whether ``loss`` is finite and, when divergence is checked against a known
        ``level``, at most ``divergence_factor`` times it."""
        if not np.isfinite(loss):
            return False
        if not self.divergence_factor or level is None:
            return True
        return loss <= self.divergence_factor * level

    def flush(self) -> Interval:
        """Fetches the metrics and measures the interval's loss against the recent level;
        a sane interval's mean joins the levels."""
        rows = self._fetch()
        level = self.level()
        losses = {s: float(m["loss"]) for s, m in rows}
        for s, loss in losses.items():
            if not np.isfinite(loss):
                problem = f"The training loss became {loss} at step {s}; stopping"
                return Interval({}, losses, level, problem)
        if not rows:
            return Interval({}, {}, level, None)
        means = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}
        loss = means["loss"]
        if not self.is_sane(loss, level):
            return Interval(
                means,
                losses,
                level,
                f"The training loss rose to {loss:.4g} (mean of steps {rows[0][0]}-"
                f"{rows[-1][0]}), more than train.divergence_factor = "
                f"{self.divergence_factor:g} times its recent level {level:.4g}; stopping as "
                "diverged",
            )
        self.levels = (self.levels + [loss])[-self.HISTORY :]
        return Interval(means, losses, level, None)


class CheckpointJudge:
    """The checkpoints of one phase as the loop judges them: the newest good one (kept by
    the rotation) and the provisional one (saved, the loss after it not seen yet)."""

    def __init__(self, ckpt: checkpoint.Checkpointer | None, start: int):
        self.ckpt = ckpt
        self.last_good: int | None = None
        self.provisional: int | None = None
        if ckpt is not None:
            steps = ckpt.steps()
            # The run that saved a step older than the newest trained past it without a
            # stop (a stop moves the unconfirmed ones aside): it was judged good.
            self.last_good = max((s for s in steps if s < start), default=None)
            self.provisional = start if start in steps else None
            ckpt.keep(self.last_good)

    def saved(self, step: int) -> None:
        self.provisional = step

    def judge(self, interval: Interval, pending: PendingMetrics) -> None:
        """Judges the provisional checkpoint when ``interval`` holds the step after it."""
        if self.provisional is None or self.provisional + 1 not in interval.losses:
            return
        loss = interval.losses[self.provisional + 1]
        if interval.problem is None or pending.is_sane(loss, interval.level):
            self.last_good = self.provisional
            self.ckpt.keep(self.last_good)
        self.provisional = None

    def stop(self, problem: str, step: int, workdir: str) -> TrainingStopped:
        """The error that stops the run at ``step`` (``problem``: its start, see
        :attr:`Interval.problem`); every checkpoint newer than the newest good one is moved
        aside first, once a pending save is complete."""
        if self.ckpt is None:
            return TrainingStopped(f"{problem} ({_kept(None, workdir)}).")
        self.ckpt.wait()
        newer = [s for s in self.ckpt.steps() if self.last_good is None or s > self.last_good]
        if not newer:
            return TrainingStopped(f"{problem} ({_kept(self.last_good, workdir)}).")
        moved = self.ckpt.move_aside(newer, f"diverged-at-{step}")
        kept = (
            f"{_kept(self.last_good, workdir)}, and a re-run resumes from it"
            if self.last_good is not None
            else "no checkpoint was confirmed by the losses after it, and a re-run starts over"
        )
        steps, paths = ", ".join(map(str, moved)), ", ".join(moved.values())
        aside = (
            f"the checkpoint of step {steps}, which the loss after it did not confirm, is "
            f"moved to {paths}"
            if len(moved) == 1
            else f"the checkpoints of steps {steps}, which the losses after them did not "
            f"confirm, are moved to {paths}"
        )
        return TrainingStopped(f"{problem} ({kept}; {aside}).")


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
    step_fn: Callable,
    table: dict[str, np.ndarray],
    total_steps: int,
    prefix: str,
    ckpt: checkpoint.Checkpointer | None,
    on_epoch_end: EpochEnd | None,
    stop_at: int = 0,
) -> tuple[step_lib.TrainState, bool]:
    """Runs the train step ``step_fn`` (not jitted: :mod:`.calls` jits it for
    ``train.steps_per_call``) from ``state.step`` to ``total_steps`` (or ``stop_at``) with
    logging and checkpoints; returns the state and whether the phase is complete."""
    per_epoch = ctx.steps_per_epoch
    train = ctx.config.train
    log_every = train.log_every
    start = int(state.step)
    pending = PendingMetrics(train.divergence_factor, _loss_history(ctx, prefix, start, ckpt))
    judge = CheckpointJudge(ckpt, start)
    # Every step after which the loop looks at the state ends a call.
    every = (log_every, per_epoch) + ((train.checkpoint_every,) if ckpt is not None else ())
    bar = None
    try:
        run = calls.runner(ctx, step_fn, table, start)
        step = start
        while step < total_steps:
            count = calls.call_length(
                step,
                steps_per_call=train.steps_per_call,
                total=total_steps,
                every=every,
                stop_at=stop_at,
            )
            if bar is None:
                how = run.describe()
                print(
                    f"{prefix}: compiling the train step{f' ({how})' if how else ''} ...",
                    flush=True,
                )
            state, step_metrics = run(state, step, count)
            if bar is None:
                # The first call returns once compiled: the bar's rate leaves compilation out.
                bar = metrics.progress_bar(total_steps, desc=prefix, initial=step + count)
            else:
                bar.update(count)
            if run.stacked:
                pending.add_stacked(step + 1, count, step_metrics)
            else:
                pending.add(step + 1, step_metrics)
            step = done = step + count
            peers.note(phase=prefix, step=done)
            end_of_epoch = done % per_epoch == 0 or done == total_steps
            stopping = done == stop_at and done < total_steps
            save = ckpt is not None and (
                done % train.checkpoint_every == 0 or done == total_steps or stopping
            )
            if done % log_every == 0 or end_of_epoch or save:
                interval = pending.flush()
                judge.judge(interval, pending)
                if interval.problem is not None:
                    raise judge.stop(interval.problem, done, ctx.workdir)
                means = interval.means
                if "osc/oscillating" in means:
                    groups = collect.oscillation_groups(state.oscillation, train.osc_level)
                    means.update({f"osc/{k}": v for k, v in groups.items()})
                means.update({f"data/{k}": v for k, v in ctx.source.stats().items()})
                ctx.writer.write(done, means, prefix=prefix)
                bar.set_postfix(loss=f"{means['loss']:.3f}")
            if end_of_epoch:
                epoch = -(-done // per_epoch)
                _print_epoch(bar, prefix, epoch, means)
                if on_epoch_end is not None:
                    state = on_epoch_end(epoch, state)
            if save:
                check_finite(state, done, judge.last_good, ctx.workdir)
                ckpt.save(done, state, force=True)
                judge.saved(done)
            if stopping:
                bar.close()
                return state, False
        if bar is not None:
            bar.close()
        return state, True
    except BaseException as err:
        if bar is not None:
            bar.close()
        peers.await_verdict(err)  # a collective that failed because a process died
        # A checkpoint still being written (e.g. the last good one before a NaN) is
        # completed before the error reaches the user.
        if ckpt is not None:
            ckpt.wait()
        raise


def _loss_history(
    ctx: Context, prefix: str, start: int, ckpt: checkpoint.Checkpointer | None
) -> list[float]:
    """The last interval means of ``{prefix}/loss`` that the run logged up to ``start``, the
    step it resumes from (none for a fresh phase), as process 0 reads them from
    ``metrics.jsonl`` and hands to every process, so all stop at the same flush."""
    if ckpt is None or start == 0:
        return []
    means: list[float] = []
    path = os.path.join(ctx.workdir, metrics.METRICS_FILE)
    if jax.process_index() == 0 and os.path.exists(path):
        means = metrics.logged_means(path, f"{prefix}/loss", up_to_step=start)
        means = means[-PendingMetrics.HISTORY :]
    if jax.process_count() > 1:
        # Interval means are float32 values (means of float32 losses): sent exactly; NaN
        # marks an empty place (a logged mean is finite).
        packed = np.full(PendingMetrics.HISTORY, np.nan, np.float32)
        packed[: len(means)] = means
        packed = np.asarray(multihost_utils.broadcast_one_to_all(packed))
        means = [float(v) for v in packed if np.isfinite(v)]
    return means


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
