"""Tests of oscqat_jax.training.checkpoint: bit-exact round trips, retention, fingerprints
(fixed fields refused, tunable ones reported), checksums (any flipped byte is damage, and the
fallback), failed saves that end the process, and sharded restores."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from testkit import tiny_config

from oscqat_jax.training import build, checksums
from oscqat_jax.training.checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    CheckpointSaveError,
    Fingerprint,
    UnreadableCheckpointError,
)

# Failed restores of damaged files can leave tensorstore callbacks that fire on a closed
# asyncio loop; Python reports them as unraisable exceptions, which are harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

METADATA = {"model": "resnet18", "n_bits": 4, "quant": {"setup": "LSQ", "per_channel": True}}


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    batch_stats: dict
    oscillation: dict
    quant_stats: dict
    opt_state: optax.OptState
    rng: jax.Array
    raw_rng: jax.Array


def make_state(seed: int) -> State:
    """A small state shaped like the trainer's: two optimizers, bool/int8 tracking, PRNG keys."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)},
        "quant": {"weight_scale": jnp.asarray(rng.uniform(0.1, 1.0, size=(4,)), jnp.float32)},
    }
    labels = {
        "conv": {"kernel": "sgd"},
        "dense": {"kernel": "sgd"},
        "quant": {"weight_scale": "adam"},
    }
    tx = optax.multi_transform(
        {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-5)}, labels
    )
    opt_state = tx.init(params)
    # One update so that momentum, mu, nu and the Adam count are non-trivial.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = tx.update(grads, opt_state, params)
    shape = (3, 3, 2, 4)
    return State(
        step=jnp.int32(100 + seed),
        params=params,
        batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}},
        oscillation={
            "conv": {
                "frozen": jnp.asarray(rng.uniform(size=shape) < 0.3),
                "prev_dir": jnp.asarray(rng.integers(-1, 2, size=shape), jnp.int8),
                "ema_osc": jnp.asarray(rng.uniform(size=shape), jnp.float32),
            }
        },
        quant_stats={},
        opt_state=opt_state,
        rng=jax.random.key(seed),
        raw_rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


def raw(x) -> np.ndarray:
    """The bits of an array (a typed PRNG key's key data)."""
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_bit_equal(a: State, b: State):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert [x.dtype for x in jax.tree.leaves(a)] == [x.dtype for x in jax.tree.leaves(b)]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert raw(x).tobytes() == raw(y).tobytes()


def step_dirs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def save_steps(directory, steps, metadata=METADATA, **kwargs) -> Checkpointer:
    ckpt = Checkpointer(directory, metadata=metadata, **kwargs)
    for step in steps:
        assert ckpt.save(step, make_state(step), force=True)
    ckpt.wait()
    return ckpt


def test_round_trip_is_bit_exact(tmp_path):
    state = make_state(7)
    save_steps(tmp_path, [7]).close()
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    assert ckpt.latest_step() == 7
    restored = ckpt.restore(make_state(2))
    assert_bit_equal(restored, state)
    assert isinstance(restored.opt_state[0]["adam"], optax.MaskedState)
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    # A typed key restored from the checkpoint continues the same random stream.
    np.testing.assert_array_equal(
        jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,))
    )


def test_keeps_the_newest_max_to_keep(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=2).close()
    assert step_dirs(tmp_path) == ["3", "4"]
    assert_bit_equal(
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0), 3), make_state(3)
    )


def test_save_every_steps_and_force(tmp_path):
    ckpt = Checkpointer(tmp_path, metadata=METADATA, save_every_steps=2)
    state = make_state(0)
    assert [ckpt.save(s, state) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert ckpt.save(5, state, force=True)
    # A step already on disk is not written twice (e.g. a forced save at the end).
    assert not ckpt.save(4, state, force=True)
    ckpt.close()
    assert step_dirs(tmp_path) == ["2", "4", "5"]
    only_forced = Checkpointer(tmp_path / "forced", metadata=METADATA)
    assert not only_forced.save(10, state)
    assert only_forced.latest_step() is None


# --------------------------------------------------------------------------- fingerprints


def test_a_changed_fixed_field_is_refused_naming_old_and_new(tmp_path):
    save_steps(tmp_path, [1]).close()
    other = dict(METADATA, model="mobilenet_v2", quant={"setup": "LSQ", "per_channel": False})
    with pytest.raises(ValueError) as info:
        Checkpointer(tmp_path, metadata=other).restore(make_state(0))
    assert str(info.value) == (
        f"The checkpoint of step 1 in {tmp_path} cannot be used with this config, which "
        "changes model resnet18 → mobilenet_v2, quant.per_channel true → false: settings the "
        "saved state depends on; use another --workdir, or set them back."
    )
    with pytest.raises(ValueError, match=r"changes n_bits_act \(not recorded\) → 4:"):
        Checkpointer(tmp_path, metadata=dict(METADATA, n_bits_act=4)).restore(make_state(0))
    # Refused, not damaged: nothing is moved aside, and the same fingerprint still restores.
    assert step_dirs(tmp_path) == ["1"]
    assert_bit_equal(
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0)), make_state(1)
    )


def _rewrite_metadata(step_dir, edit) -> None:
    """``edit(metadata)`` written back into a step's metadata, its checksums renewed (as the
    program that wrote such metadata would have left them)."""
    item = os.path.join(step_dir, "metadata")
    with open(os.path.join(item, "metadata")) as f:
        metadata = json.load(f)
    with open(os.path.join(item, "metadata"), "w") as f:
        json.dump(edit(metadata), f)
    os.remove(os.path.join(item, checksums.CHECKSUMS))
    checksums.write_checksums(epath.Path(item))


def _current(metadata: dict) -> dict:
    """Metadata of the current format with the fields of any of the edited ones below."""
    fields = metadata if "fixed" in metadata else {"fixed": metadata, "tunable": {}}
    return {**fields, "format_version": FORMAT_VERSION}


def _tree_bytes(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.mark.parametrize(
    "edit, written",
    [
        # What the program wrote before the format was recorded (the ctx models' paths).
        (lambda m: {k: v for k, v in m.items() if k != "format_version"}, 1),
        (lambda m: m["fixed"], 1),  # older still: the fixed fields alone
        (lambda m: dict(m, format_version=FORMAT_VERSION + 1), FORMAT_VERSION + 1),
    ],
    ids=["unversioned", "fixed_fields_only", "newer"],
)
def test_a_checkpoint_of_another_format_is_refused_in_one_sentence_and_left_alone(
    tmp_path, edit, written
):
    save_steps(tmp_path, [1, 2]).close()
    with open(os.path.join(tmp_path, "2", "metadata", "metadata")) as f:
        assert json.load(f)["format_version"] == FORMAT_VERSION == 2
    for step in ("1", "2"):
        _rewrite_metadata(os.path.join(tmp_path, step), edit)
    before = _tree_bytes(tmp_path)
    with pytest.raises(ValueError) as info:
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0))
    message = str(info.value)
    assert message.startswith(
        f"The checkpoint of step 2 in {tmp_path} has checkpoint format {written} and this "
        f"program reads format {FORMAT_VERSION} ("
    )
    assert message.endswith(
        "; train again in another --workdir, or use the oscqat_jax version that wrote it."
    )
    assert message.count(". ") == 0 and "\n" not in message
    # Refused, not damaged: nothing is moved aside or rewritten.
    assert _tree_bytes(tmp_path) == before
    with pytest.raises(ValueError, match="has checkpoint format"):
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0), step=1)
    # The control: the current format restores.
    _rewrite_metadata(os.path.join(tmp_path, "1"), _current)
    assert_bit_equal(
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0), step=1), make_state(1)
    )


TUNABLE = {"seed": 0, "train.epochs": 2, "optimizer.lr": 0.1}


def test_changed_tunable_fields_restore_and_are_printed_in_one_line(tmp_path, capsys):
    written = Fingerprint(fixed=METADATA, tunable=TUNABLE)
    save_steps(tmp_path, [1], metadata=written).close()
    capsys.readouterr()
    same = Checkpointer(tmp_path, metadata=written).restore(make_state(0))
    assert capsys.readouterr().out == ""  # negative control: nothing changed, nothing printed
    changed = Fingerprint(fixed=METADATA, tunable=dict(TUNABLE, seed=1, **{"train.epochs": 3}))
    restored = Checkpointer(tmp_path, metadata=changed).restore(make_state(0))
    assert capsys.readouterr().out == (
        "The checkpoint of step 1 was written with other settings, safe to change: "
        "seed 0 → 1, train.epochs 2 → 3.\n"
    )
    assert_bit_equal(restored, same)
    # A fixed change refuses even with tunable ones beside it, and names only the fixed.
    both = Fingerprint(fixed=dict(METADATA, n_bits=3), tunable=changed.tunable)
    with pytest.raises(ValueError) as info:
        Checkpointer(tmp_path, metadata=both).restore(make_state(0))
    assert "changes n_bits 4 → 3:" in str(info.value) and "seed" not in str(info.value)


def test_run_metadata_refuses_other_classes_or_bits_and_reports_seed_and_epochs(tmp_path, capsys):
    config = tiny_config()
    save_steps(tmp_path, [1], metadata=build.run_metadata(config, "qat", 4)).close()
    capsys.readouterr()

    def restore(num_classes=4, seed=0, **overrides):
        config = tiny_config(**overrides)
        config.seed = seed
        metadata = build.run_metadata(config, "qat", num_classes)
        return Checkpointer(tmp_path, metadata=metadata).restore(make_state(0))

    with pytest.raises(ValueError) as info:
        restore(num_classes=5, osc_freeze__max_bits=3)
    message = str(info.value)
    assert "changes data.num_classes 4 → 5, osc_freeze.max_bits 4 → 3:" in message
    assert "strict" not in message and "\n" not in message
    for field, value in [
        ("quant__n_bits", 4),
        ("quant__per_channel", True),
        ("model__fold_bn", True),
    ]:
        with pytest.raises(ValueError, match=field.replace("__", ".")):
            restore(**{field: value})
    assert capsys.readouterr().out == ""
    # How an invocation runs (logging, checkpoint cadence, a stop) is not recorded at all.
    restore(train__log_every=1, train__checkpoint_every=1, train__stop_at_step=3)
    assert capsys.readouterr().out == ""
    restore(seed=1, train__epochs=3, optimizer__lr=0.5, osc_freeze__threshold=0.3)
    assert capsys.readouterr().out == (
        "The checkpoint of step 1 was written with other settings, safe to change: "
        "optimizer.lr 0.05 → 0.5, osc_freeze.threshold 0.2 → 0.3, seed 0 → 1, "
        "train.epochs 2 → 3.\n"
    )
    # The float-model cache is reused only for the seed and epochs it was trained with.
    float_config = tiny_config(float_train__epochs=1)
    float_meta = build.run_metadata(float_config, "float", 4)
    assert float_meta.fixed["seed"] == 0 and float_meta.fixed["float_train.epochs"] == 1
    assert "quant.n_bits" not in float_meta.fixed | float_meta.tunable


def test_a_state_of_another_shape_is_refused_naming_the_leaf(tmp_path):
    save_steps(tmp_path, [1, 2]).close()
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    wrong = make_state(0).replace(batch_stats={"bn": {"mean": jnp.zeros(5)}})
    with pytest.raises(ValueError) as info:
        ckpt.restore(wrong)
    assert str(info.value) == (
        f"The checkpoint of step 2 in {tmp_path} holds a state that does not fit this config "
        "(batch_stats.bn.mean: float32[4] saved, float32[5] wanted); use another --workdir, "
        "or the config it was written with."
    )
    extra = make_state(0).replace(quant_stats={"act": {"scale": jnp.ones(2)}})
    with pytest.raises(ValueError, match=r"quant_stats.act.scale: absent saved, float32\[2\]"):
        ckpt.restore(extra)
    # Not damage: every checkpoint stays where it is.
    assert step_dirs(tmp_path) == ["1", "2"]


# --------------------------------------------------------------------------- checksums


def flip_bytes(path, count=16):
    """Inverts ``count`` bytes in the middle of ``path`` (or all of a shorter file)."""
    data = bytearray(open(path, "rb").read())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def files_of(step_dir) -> list[str]:
    """Every file of a step, relative to it, but orbax's commit markers (written after the
    checksums, and not read by a restore)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), step_dir)
        for root, _, names in os.walk(step_dir)
        for name in names
        if name != "commit_success.txt" and root != str(step_dir)
    )


def test_every_file_of_each_item_is_checksummed(tmp_path):
    save_steps(tmp_path, [1]).close()
    step_dir = tmp_path / "1"
    listed = []
    for item in ("state", "metadata"):
        with open(step_dir / item / checksums.CHECKSUMS) as f:
            listed += [f"{item}/{name}" for name in json.load(f)["sha256"]]
    checksum_files = ["metadata/" + checksums.CHECKSUMS, "state/" + checksums.CHECKSUMS]
    assert sorted(listed + checksum_files) == files_of(step_dir)
    assert any(name.startswith("state/ocdbt.process_0/d/") for name in listed)


def test_a_flipped_byte_in_any_file_counts_as_damage(tmp_path, caplog):
    save_steps(tmp_path / "original", [1, 2]).close()
    names = files_of(tmp_path / "original" / "2")
    assert len(names) >= 8  # data, tree and array metadata, manifests, JSON, checksums
    for i, name in enumerate(names):
        directory = tmp_path / str(i)
        shutil.copytree(tmp_path / "original", directory)
        flip_bytes(directory / "2" / name, count=1)
        flipped = open(directory / "2" / name, "rb").read()
        ckpt = Checkpointer(directory, metadata=METADATA)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            restored = ckpt.restore(make_state(0))
        assert_bit_equal(restored, make_state(1))
        (aside,) = [d for d in step_dirs(directory) if d.startswith("2.unreadable-")]
        assert step_dirs(directory) == ["1", aside], name
        # Moved aside with the damage as it was: nothing is deleted or repaired.
        assert open(directory / aside / name, "rb").read() == flipped
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith(f"The checkpoint of step 2 in {directory} is damaged: ")
        assert warning.endswith(f"; moved it to {directory / aside} and restored step 1 instead.")
        ckpt.close()


def large_state(seed: int) -> dict:
    """Arrays above OCDBT's 1 KiB inline limit, so that their bytes sit in data files
    (smaller ones live inside b-tree nodes, which carry their own CRC-32C)."""
    rng = np.random.default_rng(seed)
    return {"kernel": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "step": jnp.int32(seed)}


def largest_data_file(step_dir) -> str:
    """The biggest of the files that hold array data (``state/.../d/<hash>``)."""
    data = [name for name in files_of(step_dir) if "/d/" in name]
    return max(data, key=lambda name: os.path.getsize(os.path.join(step_dir, name)))


def test_a_flipped_data_file_is_damage_and_without_checksums_restored_silently(
    tmp_path, monkeypatch
):
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    for step in (1, 2):
        ckpt.save(step, large_state(step), force=True)
    ckpt.close()
    name = largest_data_file(tmp_path / "2")
    flip_bytes(tmp_path / "2" / name)
    with pytest.raises(UnreadableCheckpointError) as info:
        Checkpointer(tmp_path, metadata=METADATA).restore(large_state(0), step=2)
    assert str(info.value) == (
        f"The checkpoint of step 2 in {tmp_path} is damaged: {name} differs from the "
        "checksum written with it."
    )
    # Negative control: with the verification switched off, orbax restores step 2 without
    # a complaint, holding other values.
    monkeypatch.setattr(checksums, "verify_checksums", lambda item_dir: None)
    restored = Checkpointer(tmp_path, metadata=METADATA).restore(large_state(0))
    assert step_dirs(tmp_path) == ["1", "2"] and int(restored["step"]) == 2
    assert np.sum(np.asarray(restored["kernel"]) != np.asarray(large_state(2)["kernel"])) >= 1


def truncate_array_data(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)


def corrupt_metadata_json(step_dir):
    with open(os.path.join(step_dir, "metadata", "metadata"), "w") as f:
        f.write('{"model": "resn')


def remove_tree_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def remove_checksums_and_truncate(step_dir):
    """A step as an earlier version wrote it (no checksums), then damaged."""
    for item in ("state", "metadata"):
        os.remove(os.path.join(step_dir, item, checksums.CHECKSUMS))
    truncate_array_data(step_dir)


@pytest.mark.parametrize(
    "damage",
    [
        truncate_array_data,
        corrupt_metadata_json,
        remove_tree_metadata,
        remove_checksums_and_truncate,
    ],
)
def test_damaged_newest_falls_back_to_the_previous(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2]).close()
    damage(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(make_state(0))
    assert_bit_equal(restored, make_state(1))
    assert f"The checkpoint of step 2 in {tmp_path} is damaged" in caplog.text or (
        f"of the checkpoint of step 2 in {tmp_path} cannot be read" in caplog.text
    )
    # The unreadable step is moved aside, so that training can save step 2 again.
    assert ckpt.latest_step() == 1
    assert [d.split("-")[0] for d in step_dirs(tmp_path)] == ["1", "2.unreadable"]
    assert ckpt.save(2, make_state(2), force=True)
    ckpt.close()


def test_a_step_without_checksums_is_restored_unverified(tmp_path, caplog):
    # Written by an earlier version: accepted (with a warning), not moved aside.
    save_steps(tmp_path, [1]).close()
    for item in ("state", "metadata"):
        os.remove(tmp_path / "1" / item / checksums.CHECKSUMS)
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0))
    assert_bit_equal(restored, make_state(1))
    assert "has no checksums" in caplog.text


def test_unreadable_everywhere_or_explicit_step_raises(tmp_path):
    save_steps(tmp_path, [1, 2]).close()
    truncate_array_data(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    with pytest.raises(UnreadableCheckpointError, match="checkpoint of step 2 .* is damaged"):
        ckpt.restore(make_state(0), step=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
        ckpt.restore(make_state(0), step=5)
    truncate_array_data(tmp_path / "1")
    with pytest.raises(UnreadableCheckpointError) as info:
        ckpt.restore(make_state(0))
    assert str(info.value).startswith(f"None of the checkpoints in {tmp_path} can be read (")
    assert "step 2 " in str(info.value) and "step 1 " in str(info.value)
    assert step_dirs(tmp_path) == ["1", "2"]  # nothing readable to fall back to: nothing moved
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty", metadata=METADATA).restore(make_state(0))


# --------------------------------------------------------------------------- failed saves


def test_a_failed_background_save_keeps_older_checkpoints(tmp_path, monkeypatch):
    ckpt = save_steps(tmp_path, [1, 2], max_to_keep=2)
    # Fail the final rename that completes step 3: the moment before old steps may go.
    path_cls = type(epath.Path(tmp_path))
    rename = path_cls.rename

    def failing_rename(self, target):
        if epath.Path(target).name == "3":
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(path_cls, "rename", failing_rename)
    assert ckpt.save(3, make_state(3), force=True)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.wait()
    assert str(info.value) == (
        f"Saving the checkpoint of step 3 in {tmp_path} failed (OSError: disk full); the "
        "complete checkpoints there (steps [1, 2]) are untouched, and re-running the same "
        "command once it can write there resumes from step 2."
    )
    monkeypatch.undo()
    assert ckpt.latest_step() == 2
    assert step_dirs(tmp_path)[:2] == ["1", "2"]
    assert_bit_equal(ckpt.restore(make_state(0)), make_state(2))
    # The same Checkpointer saves again once the cause is gone.
    assert ckpt.save(4, make_state(4), force=True)
    ckpt.close()
    assert_bit_equal(
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0)), make_state(4)
    )
    # The next run finds only complete checkpoints, removes the unfinished one, saves step 3.
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    assert ckpt.latest_step() == 4
    assert ckpt.save(3, make_state(3), force=True)
    ckpt.close()
    assert step_dirs(tmp_path) == ["2", "3", "4"]


def read_only_mkdir(monkeypatch, directory):
    """Makes creating directories under ``directory`` fail as on a read-only file system
    (chmod does not stop root, whom the tests may run as)."""
    path_cls = type(epath.Path(directory))
    mkdir = path_cls.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(directory)):
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(path_cls, "mkdir", failing_mkdir)


def test_a_save_that_cannot_create_its_directory_fails_in_save(tmp_path, monkeypatch):
    ckpt = save_steps(tmp_path, [1])
    read_only_mkdir(monkeypatch, tmp_path)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(2, make_state(2), force=True)
    assert str(info.value).startswith(
        f"Saving the checkpoint of step 2 in {tmp_path} failed (PermissionError: [Errno 13] "
        f"Permission denied: '{tmp_path}/2.orbax-checkpoint-tmp'); the complete checkpoints "
        "there (steps [1]) are untouched"
    )
    ckpt.wait()  # as the training loop does on its way out: nothing is pending any more
    ckpt.close()
    monkeypatch.undo()
    assert_bit_equal(
        Checkpointer(tmp_path, metadata=METADATA).restore(make_state(0)), make_state(1)
    )


EXIT_SCRIPT = """
import sys, time
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from oscqat_jax.training import checkpoint

directory, mode = sys.argv[1], sys.argv[2]
if mode == "orbax_default":  # the negative control: directories created in the background
    checkpoint.ocp.AsyncOptions = lambda **kwargs: ocp.options.AsyncOptions()
ckpt = checkpoint.Checkpointer(directory, metadata={"model": "m"})
ckpt.save(1, {"w": jnp.arange(8.0)}, force=True)
ckpt.wait()
path_cls = type(epath.Path(directory))
mkdir = path_cls.mkdir
def read_only(self, *args, **kwargs):
    if str(self).startswith(directory):
        raise PermissionError(13, "Permission denied", str(self))
    return mkdir(self, *args, **kwargs)
path_cls.mkdir = read_only
print("FAILING", flush=True)
ckpt.save(2, {"w": jnp.arange(8.0)}, force=True)
ckpt.wait()
print("UNREACHABLE", flush=True)
"""


# How soon after the failed save the process must have ended: ours raises in the save, at
# once; orbax's default waits forever, which the control sees as still running after it.
PROMPT_S = 10


@pytest.mark.parametrize("mode", ["ours", pytest.param("orbax_default", marks=pytest.mark.slow)])
def test_a_process_whose_save_fails_ends_promptly(tmp_path, mode):
    process = subprocess.Popen(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), mode],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "FAILING\n"
        if mode == "orbax_default":
            # Negative control: orbax's item threads wait for a directory that never comes.
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=PROMPT_S)
            return
        out, err = process.communicate(timeout=PROMPT_S)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 1 and "UNREACHABLE" not in out
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(
        "oscqat_jax.training.checkpoint.CheckpointSaveError: Saving the checkpoint of step 2 in "
    )
    assert last_line.endswith(
        "re-running the same command once it can write there resumes from step 1."
    )
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert (
        Checkpointer(tmp_path, metadata={"model": "m"}).restore({"w": jnp.zeros(8)})["w"][7] == 7.0
    )


def test_restore_onto_a_mesh_with_named_shardings(tmp_path):
    state = make_state(3)
    save_steps(tmp_path, [3]).close()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda: state),
    )
    restored = Checkpointer(tmp_path, metadata=METADATA).restore(target)
    assert_bit_equal(restored, state)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))


MULTI_DEVICE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from oscqat_jax.training.checkpoint import Checkpointer

mesh = Mesh(np.array(jax.devices()), ("data",))
replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state = {
    "kernel": jax.device_put(jnp.arange(8.0).reshape(4, 2), replicated),
    "batch": jax.device_put(jnp.arange(4, dtype=jnp.int32), split),
    "rng": jax.device_put(jax.random.key(0), replicated),
}
ckpt = Checkpointer(sys.argv[1], metadata={"model": "m"})
ckpt.save(1, state, force=True)
ckpt.wait()
# Restore with the shardings swapped: the target decides the layout.
target = {
    "kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=split),
    "batch": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=replicated),
    "rng": jax.ShapeDtypeStruct((), state["rng"].dtype, sharding=replicated),
}
restored = ckpt.restore(target)
ckpt.close()
assert len(jax.devices()) == 2
assert restored["kernel"].sharding == split and restored["batch"].sharding == replicated
assert restored["rng"].sharding == replicated
np.testing.assert_array_equal(restored["kernel"], np.arange(8.0).reshape(4, 2))
np.testing.assert_array_equal(restored["batch"], np.arange(4))
np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(0)))
"""


def test_restore_across_two_devices_in_a_subprocess(tmp_path):
    # Fake CPU devices must be configured before JAX starts, hence a fresh interpreter.
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
