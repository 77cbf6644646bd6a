"""A run that never lies about its state: the workdir lock, read-only modes that create
nothing, the deferred check of a non-finite loss, the finite-state check before every save,
and a damaged float-model cache that is retrained."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from testkit import restore_final, tiny_config

from oscqat_jax.training import context, loop, trainer

# --------------------------------------------------------------------------- the lock


def _write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, context.LOCK_FILE), "w", encoding="utf-8") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0, **holder}, f)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_on_a_locked_workdir_is_refused_and_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    _write_lock(workdir, pid=os.getpid(), host=socket.gethostname())  # a live holder: us
    with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}") as error:
        trainer.train_and_evaluate(tiny_config(), workdir)
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(workdir)) == [context.LOCK_FILE]  # no metrics, no checkpoints
    with open(os.path.join(workdir, context.LOCK_FILE), encoding="utf-8") as f:
        assert json.load(f)["pid"] == os.getpid()  # the holder's lock is left alone


def test_a_lock_of_another_host_is_refused_and_a_dead_process_lock_is_taken_over(tmp_path):
    other = str(tmp_path / "other")
    _write_lock(other, host="some-other-host", pid=1)
    with pytest.raises(RuntimeError, match="some-other-host"):
        context.WorkdirLock(other).acquire()

    stale = str(tmp_path / "stale")
    _write_lock(stale, pid=_dead_pid())
    lock = context.WorkdirLock(stale)
    lock.acquire()  # the holder has ended: taken over
    with open(lock.path, encoding="utf-8") as f:
        assert json.load(f)["pid"] == os.getpid()
    second = context.WorkdirLock(stale)
    with pytest.raises(RuntimeError, match="in use"):
        second.acquire()  # now held by a live process
    lock.release()
    assert not os.path.exists(lock.path)
    second.acquire()
    second.release()


def test_evaluate_and_export_on_an_empty_workdir_create_nothing(tmp_path):
    workdir = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="No QAT checkpoint"):
        trainer.evaluate_checkpoint(tiny_config(), str(workdir))
    with pytest.raises(FileNotFoundError, match="No QAT checkpoint"):
        trainer.export_checkpoint(tiny_config(), str(workdir), str(tmp_path / "m.npz"))
    assert not workdir.exists() and not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------------------- loss checks


def _fake_rows(pending, losses, first_step=1):
    for i, loss in enumerate(losses):
        pending.add(first_step + i, {"loss": np.float32(loss), "top1": np.float32(0.5)})


def test_a_non_finite_loss_stops_naming_the_step():
    pending = loop.PendingMetrics()
    _fake_rows(pending, [1.0, np.nan, 1.0], first_step=7)
    assert pending.flush().problem == "The training loss became nan at step 8; stopping"
    _fake_rows(pending, [np.inf])
    error = loop.CheckpointJudge(None, 0).stop(pending.flush().problem, 1, "/w")
    assert isinstance(error, FloatingPointError)
    expected = "The training loss became inf at step 1; stopping (no checkpoint was written)."
    assert str(error) == expected


# Divergence against the recent level, and checkpoints judged by the losses after them:
# test_divergence.py.


def test_the_state_check_finds_one_bad_value_and_ignores_integer_leaves():
    good = {
        "w": np.ones((3, 2), np.float32),
        "i": np.arange(3, dtype=np.int32),
        "b": np.array(True),
    }
    loop.check_finite(good, 4, 2, "/w")
    bad = dict(good, w=good["w"].copy())
    bad["w"][2, 1] = np.inf
    with pytest.raises(loop.TrainingStopped, match=r"after step 4 .*not saved.*step 2\)"):
        loop.check_finite(bad, 4, 2, "/w")


@pytest.fixture(scope="module", params=[0.0, 10.0], ids=["nan", "finite-divergence"])
def diverged(request, tmp_path_factory):
    """A run whose learning rate blows the state up within a few steps, saving every step.
    With ``divergence_factor`` 0 only the non-finite checks stop it: the loss of a step comes
    from the parameters before its update, so without the check of the state before each save
    the named checkpoint would hold non-finite values (checked by hand: 30 leaves). With 10 the
    finite jump of the loss stops it first. The warm-up makes the first update one at rate 0,
    so there is a good checkpoint to name (step 1)."""
    workdir = str(tmp_path_factory.mktemp("diverged"))
    config = tiny_config(
        optimizer__lr=1e12,
        optimizer__warmup_steps=2,
        train__checkpoint_every=1,
        train__log_every=1,
        train__divergence_factor=request.param,
        osc_damp__weight=None,
    )
    with pytest.raises(FloatingPointError) as error:
        trainer.train_and_evaluate(config, workdir)
    return workdir, config, str(error.value)


def test_a_diverging_run_names_a_checkpoint_that_loads_finite(diverged):
    workdir, config, message = diverged
    assert "\n" not in message
    if "no checkpoint was written" in message:
        pytest.fail(f"the run diverged before its first checkpoint; raise the steps: {message}")
    named = int(message.split("the last good checkpoint (step ")[1].split(")")[0])
    step, state = restore_final(workdir, config)
    assert step == named  # the newest checkpoint on disk is the one named
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating):
            assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    assert not os.path.exists(os.path.join(workdir, context.LOCK_FILE))  # released on error


@pytest.mark.slow
def test_the_state_check_is_what_keeps_a_bad_state_out(tmp_path, monkeypatch):
    """Negative control of the test above: without the state check (and with every checkpoint
    trusted, as before checkpoints were judged by the losses after them), the same run names a
    checkpoint holding non-finite values."""

    def trust_every_checkpoint(judge, interval, pending):
        if judge.provisional is not None:
            judge.last_good, judge.provisional = judge.provisional, None

    monkeypatch.setattr(loop, "check_finite", lambda *args: None)
    monkeypatch.setattr(loop.CheckpointJudge, "judge", trust_every_checkpoint)
    workdir = str(tmp_path / "unchecked")
    config = tiny_config(
        optimizer__lr=1e12,
        train__checkpoint_every=1,
        train__log_every=1,
        train__divergence_factor=0.0,
        osc_damp__weight=None,
    )
    with pytest.raises(FloatingPointError, match="became nan"):
        trainer.train_and_evaluate(config, workdir)
    _, state = restore_final(workdir, config)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
    assert any(np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)) for x in leaves)


# --------------------------------------------------------------------------- float cache


@pytest.mark.slow
def test_a_damaged_float_cache_is_moved_aside_and_retrained(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    config = tiny_config(float_train__epochs=1, train__stop_at_step=1)
    first = trainer.train_and_evaluate(config, workdir)
    cache = os.path.join(workdir, "float_model")
    damaged = 0
    for root, _, files in os.walk(cache):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and "metadata" not in root:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                damaged += 1
    assert damaged
    capsys.readouterr()
    second = trainer.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "cannot be read" in out and "training it again" in out
    assert any(n.startswith("float_model.unreadable-") for n in os.listdir(workdir))
    assert second["float"] == first["float"]  # retrained to the same model


def test_the_progress_bar_starts_after_compilation(digits_run):
    """The suite's ``train.py`` digits run: the bar appears only once the first step has run
    (its first state counts 1 of the 22 QAT steps done), after the compile message."""
    assert "qat: compiling the train step" in digits_run.stdout
    bars = [
        line
        for line in digits_run.stderr.replace("\r", "\n").splitlines()
        if line.startswith("qat:")
    ]
    assert bars and "1/22" in bars[0], bars[:3]
