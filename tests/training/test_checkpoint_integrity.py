"""A training run that never lies about its state, end to end with the real trainer: a bit
flip in the newest checkpoint is reported and resumed past (ending bit-identical to an
uninterrupted run), a checkpoint directory that stops taking writes ends the process at once
with one sentence (the earlier checkpoint intact and resumable), and a resume with another
config refuses the fields the saved state depends on and names the ones it may change."""

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
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

from oscqat_jax.training import checkpoint, checksums, trainer

# The suite's uninterrupted tiny run (conftest's ``tiny_run``): 2 epochs of 6 steps, a
# checkpoint every 2 steps, every step logged.
OVERRIDES = TINY_RUN
QAT_STEPS = TINY_RUN_QAT_STEPS


@pytest.fixture
def uninterrupted(tiny_run):
    return tiny_run


def copy_of(workdir: str, destination) -> str:
    shutil.copytree(workdir, destination)
    return str(destination)


FLIP_AT = (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875)
"""Where in a data file the probes flip bytes (fractions of its length), in order: the
layout of an OCDBT data file (array chunks beside CRC-checked b-tree nodes) varies between
runs, so one place is not always array data."""


def flip_16_bytes(path: str, at: float = 0.5) -> bytes:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        start = int(len(data) * at)
        data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
        f.seek(0)
        f.write(data)
    return bytes(data)


def data_files(step_dir: str) -> list[str]:
    """The files holding array data (``state/.../d/<hash>``), relative to the step, largest
    first."""
    names = [
        os.path.relpath(os.path.join(root, name), step_dir)
        for root, _, files in os.walk(step_dir)
        for name in files
        if os.path.basename(root) == "d"
    ]
    return sorted(names, key=lambda name: -os.path.getsize(os.path.join(step_dir, name)))


def largest_data_file_orbax_reads(workdir: str, config, scratch) -> tuple[str, float, dict]:
    """The largest data file of the newest checkpoint, and a place in it (:data:`FLIP_AT`),
    whose flipped bytes orbax restores without a complaint as other values, and that state.
    (OCDBT's data files also keep the b-tree nodes of superseded versions, which a restore
    never reads; the nodes it reads carry their own CRC-32C.)"""
    _, expected = restore_final(workdir, config)
    step_dir = os.path.join(workdir, "checkpoints", str(QAT_STEPS))
    probes = 0
    for name in data_files(step_dir):
        for at in FLIP_AT:
            probe = os.path.join(scratch, str(probes), "checkpoints", str(QAT_STEPS))
            probes += 1
            shutil.copytree(step_dir, probe)
            flip_16_bytes(os.path.join(probe, name), at)
            try:
                _, state = restore_final(os.path.dirname(os.path.dirname(probe)), config)
                assert_trees_equal(state, expected)
            except AssertionError:
                return name, at, state
            except Exception:  # a node with a CRC-32C: orbax notices this one itself
                continue
    raise AssertionError(f"no data file of {step_dir} is read unchecked")


@pytest.mark.slow
def test_a_bit_flip_in_the_newest_checkpoint_is_reported_and_resumed_past(
    uninterrupted, tmp_path, caplog, capsys
):
    config = tiny_config(**OVERRIDES)
    workdir = copy_of(uninterrupted, tmp_path / "flipped")
    checkpoints = os.path.join(workdir, "checkpoints")
    # Negative control: read without the checksums, the flipped step is another state.
    name, at, silently_read = largest_data_file_orbax_reads(workdir, config, tmp_path / "probes")
    _, expected = restore_final(uninterrupted, config)
    with pytest.raises(AssertionError):
        assert_trees_equal(silently_read, expected)
    flipped = flip_16_bytes(os.path.join(checkpoints, str(QAT_STEPS), name), at)

    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(config, workdir)
    (aside,) = [d for d in os.listdir(checkpoints) if d.startswith(f"{QAT_STEPS}.unreadable-")]
    reports = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert reports == [
        f"The checkpoint of step {QAT_STEPS} in {checkpoints} is damaged: {name} differs from "
        f"the checksum written with it; moved it to {os.path.join(checkpoints, aside)} and "
        f"restored step {QAT_STEPS - 2} instead."
    ]
    assert f"Resuming QAT from step {QAT_STEPS - 2} of {QAT_STEPS}" in capsys.readouterr().out
    # The damaged step is kept as it was, beside the one trained again.
    with open(os.path.join(checkpoints, aside, name), "rb") as f:
        assert f.read() == flipped
    step_b, state_b = restore_final(workdir, config)
    assert step_b == QAT_STEPS
    assert set(state_b) == set(expected)
    assert_trees_equal(state_b, expected)  # every leaf, bit for bit


# One command, as a user would run it; after the first QAT checkpoint (step 2) is on disk,
# the checkpoints directory stops taking writes: creating a directory fails (in save) or the
# final renames fail (in the background thread). chmod would not stop root, whom tests may
# run as, so the failure is injected where orbax calls the file system.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    from etils import epath
    from testkit import tiny_config
    from oscqat_jax.training import checkpoint, trainer

    workdir, injection = sys.argv[1], sys.argv[2]
    checkpoints = os.path.join(workdir, "checkpoints")
    path_cls = type(epath.Path(checkpoints))

    def failing(original):
        def method(self, *args, **kwargs):
            if str(self).startswith(checkpoints + os.sep):
                with open(os.path.join(workdir, "failed_at"), "w") as f:
                    f.write(repr(time.time()))
                raise PermissionError(13, "Permission denied", str(self))
            return original(self, *args, **kwargs)
        return method

    save = checkpoint.Checkpointer.save

    def save_then_break(self, step, state, *, force=False):
        started = save(self, step, state, force=force)
        if self.directory == checkpoints and step == 2:
            self.wait()
            setattr(path_cls, injection, failing(getattr(path_cls, injection)))
        return started

    checkpoint.Checkpointer.save = save_then_break
    trainer.train_and_evaluate(tiny_config(**{overrides!r}), workdir)
    print("FINISHED")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("injection", ["mkdir", "rename"])
def test_a_checkpoint_directory_that_stops_taking_writes_ends_the_run(
    uninterrupted, tmp_path, injection
):
    workdir = str(tmp_path / "run")
    cache = jax.config.jax_compilation_cache_dir or str(tmp_path / "xla_cache")
    script = WORKER.format(root=ROOT, tests=TESTS, cache=cache, overrides=OVERRIDES)
    run = subprocess.run(
        [sys.executable, "-c", script, workdir, injection],
        capture_output=True,
        text=True,
        timeout=900,
    )
    ended = time.time()
    assert run.returncode == 1 and "FINISHED" not in run.stdout, run.stderr[-3000:]
    with open(os.path.join(workdir, "failed_at")) as f:
        assert ended - float(f.read()) < 60  # seconds from the failed write to the exit
    checkpoints = os.path.join(workdir, "checkpoints")
    raised = "oscqat_jax.training.checkpoint.CheckpointSaveError: "
    (sentence,) = [line for line in run.stderr.splitlines() if line.startswith(raised)]
    assert sentence.startswith(
        f"{raised}Saving the checkpoint of step 4 in {checkpoints} failed (PermissionError: "
        "[Errno 13] Permission denied: "
    ), run.stderr[-3000:]
    assert sentence.endswith(
        "; the complete checkpoints there (steps [2]) are untouched, and re-running the same "
        "command once it can write there resumes from step 2."
    )
    # The earlier checkpoint is complete and matches its checksums.
    assert "2" in os.listdir(checkpoints) and "4" not in os.listdir(checkpoints)
    for item in ("state", "metadata"):
        assert checksums.verify_checksums(checkpoint.epath.Path(checkpoints, "2", item)) is None
    step, _ = restore_final(workdir, tiny_config(**OVERRIDES))
    assert step == 2
    if injection == "rename":
        # The same command, once the directory takes writes again, ends where an
        # uninterrupted run ends (the unfinished step 4 is cleaned up, not read).
        trainer.train_and_evaluate(tiny_config(**OVERRIDES), workdir)
        config = tiny_config(**OVERRIDES)
        step_a, state_a = restore_final(uninterrupted, config)
        step_b, state_b = restore_final(workdir, config)
        assert step_a == step_b == QAT_STEPS
        assert_trees_equal(state_a, state_b)


def test_a_resume_with_other_classes_or_bits_is_refused_naming_them(uninterrupted, tmp_path):
    workdir = copy_of(uninterrupted, tmp_path / "other_model")
    checkpoints = os.path.join(workdir, "checkpoints")
    before = sorted(os.listdir(checkpoints))
    config = tiny_config(**OVERRIDES, data__num_classes=5, osc_freeze__max_bits=3)
    with pytest.raises(ValueError) as info:
        trainer.train_and_evaluate(config, workdir)
    assert str(info.value) == (
        f"The checkpoint of step {QAT_STEPS} in {checkpoints} cannot be used with this config, "
        "which changes data.num_classes 4 → 5, osc_freeze.max_bits 4 → 3: settings the saved "
        "state depends on; use another --workdir, or set them back."
    )
    assert sorted(os.listdir(checkpoints)) == before  # refused, not damaged: nothing moved


@pytest.mark.slow
def test_a_resume_with_another_seed_and_more_epochs_goes_on_and_says_so(
    uninterrupted, tmp_path, capsys
):
    workdir = copy_of(uninterrupted, tmp_path / "longer")
    config = tiny_config(**OVERRIDES, train__epochs=3)
    config.seed = 1
    capsys.readouterr()
    trainer.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if "other settings" in line]
    assert changed == [
        f"The checkpoint of step {QAT_STEPS} was written with other settings, safe to change: "
        "seed 0 → 1, train.epochs 2 → 3."
    ]
    assert f"Resuming QAT from step {QAT_STEPS} of {QAT_STEPS + 6}" in out
    step, state = restore_final(workdir, config)
    assert step == QAT_STEPS + 6
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
