"""Preemption: a run killed with SIGKILL, more than once, then re-run with the same command,
ends exactly where an uninterrupted run ends (state and metrics)."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
from testkit import (
    ROOT,
    TESTS,
    TINY_RUN,
    TINY_RUN_QAT_STEPS,
    assert_trees_equal,
    restore_final,
    tiny_config,
)

from oscqat_jax.training import metrics

# One command, as a user would re-run it. KILL_AFTER_SAVE makes the process SIGKILL itself
# right after a QAT checkpoint save has started (the files are still being written by the
# background thread), which is the worst moment to be preempted.
WORKER = textwrap.dedent(
    """
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    from testkit import tiny_config
    from oscqat_jax.training import checkpoint, trainer

    kill_after_save = int(os.environ.get("KILL_AFTER_SAVE", "0"))
    if kill_after_save:
        save = checkpoint.Checkpointer.save

        def save_then_die(self, step, state, *, force=False):
            started = save(self, step, state, force=force)
            if step == kill_after_save and self.directory.endswith("checkpoints"):
                os.kill(os.getpid(), signal.SIGKILL)
            return started

        checkpoint.Checkpointer.save = save_then_die
    trainer.train_and_evaluate(tiny_config(**{overrides!r}), {workdir!r})
    print("FINISHED")
    """
)
# The suite's uninterrupted tiny run (conftest's ``tiny_run``): 2 epochs of 6 steps, a
# checkpoint every 2 steps, every step logged.
OVERRIDES = TINY_RUN
QAT_STEPS = TINY_RUN_QAT_STEPS


def _command(workdir: str, cache: str) -> list[str]:
    script = WORKER.format(
        root=ROOT,
        tests=TESTS,
        cache=cache,
        overrides=OVERRIDES,
        workdir=workdir,
    )
    return [sys.executable, "-c", script]


def _qat_steps_logged(workdir: str) -> int:
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.exists(path):
        return 0
    return max((r["step"] for r in metrics.read_metrics(path) if "qat/loss" in r), default=0)


def _latest_by_step(workdir: str) -> dict[int, dict]:
    """The newest record of each (step, kind of record): a resumed run logs again the
    steps after its checkpoint, and the newest record is the one that counts."""
    out = {}
    for row in metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE)):
        kind = tuple(sorted(k for k in row if k not in ("step", "time")))
        out[(row["step"], kind)] = {k: v for k, v in row.items() if k != "time"}
    return out


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_uninterrupted_result(tiny_run, tmp_path):
    uninterrupted = tiny_run
    rng = random.Random(20261128)
    cache = jax.config.jax_compilation_cache_dir or str(tmp_path / "xla_cache")
    workdir = str(tmp_path / "preempted")
    command = _command(workdir, cache)

    # Preemption 1: in the middle of writing a checkpoint, at a random even step.
    save_step = rng.choice([2, 4, 6])
    first = subprocess.run(
        command,
        env=dict(os.environ, KILL_AFTER_SAVE=str(save_step)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "FINISHED" not in first.stdout

    # Preemption 2: from outside, once the re-run has logged a random later step.
    kill_step = rng.randint(save_step + 2, QAT_STEPS - 2)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while proc.poll() is None and _qat_steps_logged(workdir) < kill_step:
        assert time.time() < deadline, "the re-run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert "FINISHED" not in out

    # The same command again runs to the end.
    last = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "Resuming QAT from step" in last.stdout

    config = tiny_config(**OVERRIDES)
    step_a, state_a = restore_final(uninterrupted, config)
    step_b, state_b = restore_final(workdir, config)
    assert step_a == step_b == QAT_STEPS
    # Bit for bit: parameters, BN statistics, oscillation state, optimizer states, step.
    assert set(state_a) == set(state_b)
    assert_trees_equal(state_a, state_b)
    # Every metric record of the uninterrupted run, as the preempted run last wrote it.
    expected, got = _latest_by_step(uninterrupted), _latest_by_step(workdir)
    assert expected.keys() == got.keys()
    for key, row in expected.items():
        assert got[key] == row, key
