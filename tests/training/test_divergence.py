"""Divergence judged against the run's own history, and checkpoints judged by the losses that
follow them: a stop names (and a re-run resumes from) only a checkpoint from which training
went on sanely, and a resumed run stops where the uninterrupted one would."""

import os

import numpy as np
import pytest
from testkit import (
    assert_trees_equal,
    qat_schedules_with_model_lr,
    restore_final,
    tiny_config,
    tiny_run_config,
)

from oscqat_jax.training import build, checkpoint, loop, metrics, trainer

# --------------------------------------------------------------------------- the level


def _monitor_decisions(means, factor=10.0, history=()):
    """Feeds one interval of each mean to a PendingMetrics (seeded with ``history``); the
    index of the first interval it stops at, or None."""
    pending = loop.PendingMetrics(divergence_factor=factor, history=history)
    for i, mean in enumerate(means):
        pending.add(i + 1, {"loss": np.float32(mean), "top1": np.float32(0.5)})
        if pending.flush().problem is not None:
            return i
    return None


# (interval means, the index of the interval that must stop the run or None). In each, the
# recent level and the phase's first interval disagree about the last interval.
SEQUENCES = {
    # The example: 50x the recent level, 2.5x the first interval.
    "high_start_real_divergence": ([2.0, 0.1, 0.1, 0.1, 5.0], 4),
    # 25x the recent level but below a high first interval: compared with the start as well,
    # this passed.
    "below_a_high_start": ([2.3, 0.02, 0.02, 0.02, 0.5], 4),
    # Within 10x of the recent level, 50x the first interval: no divergence.
    "low_start_loss_rose_slowly": ([0.1, 0.5, 1.0, 2.0, 2.0, 2.0, 5.0], None),
    # The level is the median: one earlier spike (accepted, 9x) does not raise it.
    "median_not_last": ([1.0, 1.0, 1.0, 1.0, 1.0, 9.0, 9.5, 10.5], 7),
    # ... over the last ten intervals only: an old high level is forgotten.
    "window_of_ten": ([100.0] * 15 + [1.0] * 10 + [11.0], 25),
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_an_interval_is_judged_against_the_median_of_the_recent_ten(name):
    means, stop = SEQUENCES[name]
    assert _monitor_decisions(means) == stop


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_a_resumed_monitor_decides_as_the_uninterrupted_one(name):
    """Resumed after any interval with the means logged before it as its history."""
    means, stop = SEQUENCES[name]
    for resume_at in range(1, len(means)):
        if stop is not None and resume_at > stop:
            break
        later = _monitor_decisions(means[resume_at:], history=means[:resume_at])
        assert (None if later is None else later + resume_at) == stop, resume_at


def test_the_stop_sentence_names_the_interval_and_the_level():
    pending = loop.PendingMetrics(divergence_factor=10.0, history=[1.0, 2.0, 1.5])
    for step in (20, 21, 22):
        pending.add(step, {"loss": np.float32(2e6), "top1": np.float32(0.5)})
    interval = pending.flush()
    assert interval.problem == (
        "The training loss rose to 2e+06 (mean of steps 20-22), more than "
        "train.divergence_factor = 10 times its recent level 1.5; stopping as diverged"
    )
    assert interval.losses == {20: 2e6, 21: 2e6, 22: 2e6}
    assert pending.levels == [1.0, 2.0, 1.5]  # a diverged interval does not join the level
    off = loop.PendingMetrics(divergence_factor=0.0, history=[0.01])
    off.add(1, {"loss": np.float32(1e9), "top1": np.float32(0.5)})
    assert off.flush().problem is None  # a factor of 0 switches the check off


def test_the_history_is_the_newest_record_of_each_step_up_to_the_resumed_one(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    for step, loss in [(2, 1.0), (4, 0.5), (6, 9.0), (8, 0.7)]:  # a first invocation
        writer.write(step, {"loss": loss}, prefix="qat")
    writer.write(5, {"top1": 0.1}, prefix="eval")
    for step, loss in [(6, 0.6), (8, 0.4)]:  # resumed from step 4, logs 6 and 8 again
        writer.write(step, {"loss": loss}, prefix="qat")
    writer.close()
    path = tmp_path / metrics.METRICS_FILE
    assert metrics.logged_means(path, "qat/loss", up_to_step=6) == [1.0, 0.5, 0.6]
    assert metrics.logged_means(path, "qat/loss", up_to_step=3) == [1.0]
    assert metrics.logged_means(path, "float/loss", up_to_step=8) == []


# --------------------------------------------------------------------------- the judge


def _interval(pending, losses):
    for step, loss in losses.items():
        pending.add(step, {"loss": np.float32(loss), "top1": np.float32(0.5)})
    return pending.flush()


def test_a_provisional_checkpoint_is_kept_out_until_the_loss_after_it_is_seen(tmp_path):
    """With one checkpoint kept, the newest one judged good survives the save of a newer
    one; a stop moves the unconfirmed newer one aside and names the good one."""
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", metadata={"run": 1}, max_to_keep=1)
    state = {"w": np.ones(3, np.float32)}
    judge = loop.CheckpointJudge(ckpt, start=0)
    pending = loop.PendingMetrics(divergence_factor=10.0)
    judge.judge(_interval(pending, {1: 1.0, 2: 1.0}), pending)
    ckpt.save(2, state, force=True)
    judge.saved(2)
    judge.judge(_interval(pending, {3: 1.1, 4: 0.9}), pending)  # step 3 follows checkpoint 2
    assert judge.last_good == 2 and judge.provisional is None
    ckpt.save(4, state, force=True)
    judge.saved(4)
    ckpt.wait()
    assert ckpt.steps() == [2, 4]  # 2 kept beyond max_to_keep: 4 is not judged yet
    # The loss right after checkpoint 4 explodes: the weights it holds are ruined.
    interval = _interval(pending, {5: 1e30, 6: 1e31})
    judge.judge(interval, pending)
    error = judge.stop(interval.problem, 6, "/w")
    text = str(error)
    assert text.startswith("The training loss rose to 5.5e+30 (mean of steps 5-6)"), text
    assert "the last good checkpoint (step 2) in /w is kept, and a re-run resumes from it" in text
    aside = os.path.join(ckpt.directory, "4.diverged-at-6")
    assert (
        f"the checkpoint of step 4, which the loss after it did not confirm, is moved to {aside}"
        in text
    )
    assert "\n" not in text and os.path.isdir(aside)
    assert ckpt.steps() == [2] and ckpt.latest_step() == 2
    ckpt.close()


def test_a_stop_whose_first_step_is_sane_confirms_the_checkpoint_before_it(tmp_path):
    """A run resumed with an absurd rate from a good checkpoint: the step after it computes a
    sane loss from its weights, so it is kept even though the interval diverges."""
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", metadata={"run": 1}, max_to_keep=3)
    ckpt.save(4, {"w": np.ones(3, np.float32)}, force=True)
    ckpt.wait()
    judge = loop.CheckpointJudge(ckpt, start=4)  # resumed from step 4
    assert judge.last_good is None and judge.provisional == 4
    pending = loop.PendingMetrics(divergence_factor=10.0, history=[1.2, 1.0])
    interval = _interval(pending, {5: 1.1, 6: 1e9})
    judge.judge(interval, pending)
    text = str(judge.stop(interval.problem, 6, "/w"))
    assert "(the last good checkpoint (step 4) in /w is kept)" in text, text
    assert ckpt.steps() == [4]
    # A NaN right after it, and no older checkpoint: nothing good is left, and it says so.
    judge = loop.CheckpointJudge(ckpt, start=4)
    interval = _interval(pending, {5: np.nan})
    judge.judge(interval, pending)
    text = str(judge.stop(interval.problem, 5, "/w"))
    assert text.startswith("The training loss became nan at step 5; stopping (no checkpoint")
    assert "a re-run starts over" in text and ckpt.steps() == []
    ckpt.close()


# --------------------------------------------------------------------------- training

# checkpoint_every=2, log_every=2: the update of step 6 (0-based 5) is absurd; checkpoint 6
# holds its ruined, finite weights, and the loss of step 7 explodes.
RUINED_STEP = 6
OVERRIDES = {
    "train__checkpoint_every": 2,
    "train__log_every": 2,
    "train__keep_checkpoints": 1,  # the rotation must not delete the last good one
}


def _absurd_rate_at(step):
    """``build.qat_schedules`` whose model learning rate at 1-based ``step`` is 1e30: finite
    weights afterwards (the state check passes), ruined."""
    return qat_schedules_with_model_lr(step - 1, 1e30)


@pytest.fixture
def uninterrupted(tiny_run):
    """The suite's uninterrupted tiny run (conftest's ``tiny_run``): the same 12 steps with
    checkpoints and logs at other steps, which leave the state as it is."""
    return restore_final(tiny_run, tiny_run_config())


def _assert_resumes_to(workdir, uninterrupted, capsys, resumed_from):
    capsys.readouterr()
    trainer.train_and_evaluate(tiny_config(**OVERRIDES), workdir)
    assert f"Resuming QAT from step {resumed_from} " in capsys.readouterr().out
    step, state = restore_final(workdir, tiny_config(**OVERRIDES))
    assert step == uninterrupted[0] == 12
    assert_trees_equal(state, uninterrupted[1])


def _moved_aside(workdir):
    return sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "diverged" in n)


@pytest.mark.slow
def test_a_finite_but_ruined_checkpoint_is_never_named_or_resumed_from(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(build, "qat_schedules", _absurd_rate_at(RUINED_STEP))
        with pytest.raises(loop.TrainingStopped) as stopped:
            trainer.train_and_evaluate(tiny_config(**OVERRIDES), workdir)
    text = str(stopped.value)
    assert "\n" not in text
    assert "the last good checkpoint (step 4)" in text, text
    assert _moved_aside(workdir) == ["6.diverged-at-8"]
    # The same command with the sane rate resumes from step 4 and ends where an
    # uninterrupted run ends, bit for bit.
    _assert_resumes_to(workdir, uninterrupted, capsys, resumed_from=4)


@pytest.mark.slow
def test_a_run_resumed_from_a_ruined_checkpoint_is_judged_by_its_history(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    """Stopped right after the ruined checkpoint was written (as a preemption would), the
    re-run's first interval is its only one: the level comes from metrics.jsonl."""
    workdir = str(tmp_path / "run")
    config = tiny_config(**OVERRIDES, train__stop_at_step=RUINED_STEP)
    with monkeypatch.context() as patch:
        patch.setattr(build, "qat_schedules", _absurd_rate_at(RUINED_STEP))
        trainer.train_and_evaluate(config, workdir)
    assert restore_final(workdir, config)[0] == RUINED_STEP
    with pytest.raises(loop.TrainingStopped) as stopped:
        trainer.train_and_evaluate(tiny_config(**OVERRIDES), workdir)
    text = str(stopped.value)
    assert "the last good checkpoint (step 4)" in text, text
    assert _moved_aside(workdir) == ["6.diverged-at-8"]
    _assert_resumes_to(workdir, uninterrupted, capsys, resumed_from=4)
