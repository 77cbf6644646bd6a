"""Tests of oscqat_jax.training.checkpoint: bit-exact round trips, retention, metadata checks,
damaged checkpoints and sharded restores."""

import glob
import logging
import os
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

from oscqat_jax.training.checkpoint import Checkpointer, UnreadableCheckpointError

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


def save_steps(directory, steps, **kwargs) -> Checkpointer:
    ckpt = Checkpointer(directory, metadata=METADATA, **kwargs)
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


def test_metadata_mismatch_names_the_keys(tmp_path):
    save_steps(tmp_path, [1]).close()
    other = dict(METADATA, model="mobilenet_v2", quant={"setup": "LSQ", "per_channel": False})
    with pytest.raises(ValueError) as info:
        Checkpointer(tmp_path, metadata=other).restore(make_state(0))
    assert str(info.value) == (
        f"The checkpoint in {tmp_path} was written for model=resnet18, quant.per_channel=true "
        "but the config asks for model=mobilenet_v2, quant.per_channel=false; use another "
        "--workdir or the matching config."
    )
    with pytest.raises(
        ValueError, match=r"n_bits_act=\(not set\) but the config asks for n_bits_act=4"
    ):
        Checkpointer(tmp_path, metadata=dict(METADATA, n_bits_act=4)).restore(make_state(0))


def truncate_array_data(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)


def corrupt_metadata_json(step_dir):
    with open(os.path.join(step_dir, "metadata", "metadata"), "w") as f:
        f.write('{"model": "resn')


def remove_tree_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize(
    "damage", [truncate_array_data, corrupt_metadata_json, remove_tree_metadata]
)
def test_damaged_newest_falls_back_to_the_previous(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2]).close()
    damage(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(make_state(0))
    assert_bit_equal(restored, make_state(1))
    assert "checkpoint of step 2" in caplog.text and "cannot be read" in caplog.text
    # The unreadable step is moved aside, so that training can save step 2 again.
    assert ckpt.latest_step() == 1
    assert [d.split("-")[0] for d in step_dirs(tmp_path)] == ["1", "2.unreadable"]
    assert ckpt.save(2, make_state(2), force=True)
    ckpt.close()


def test_unreadable_everywhere_or_explicit_step_raises(tmp_path):
    save_steps(tmp_path, [1, 2]).close()
    truncate_array_data(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    with pytest.raises(UnreadableCheckpointError, match="checkpoint of step 2"):
        ckpt.restore(make_state(0), step=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
        ckpt.restore(make_state(0), step=5)
    # A target of another shape cannot take any of the checkpoints.
    wrong = make_state(0).replace(batch_stats={"bn": {"mean": jnp.zeros(5)}})
    with pytest.raises(UnreadableCheckpointError, match=r"None of the checkpoints .* \[1, 2\]"):
        ckpt.restore(wrong)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty", metadata=METADATA).restore(make_state(0))


def test_failed_save_keeps_older_checkpoints(tmp_path, monkeypatch):
    ckpt = save_steps(tmp_path, [1, 2], max_to_keep=2)
    # Fail the final rename that completes step 3: the moment before old steps may go.
    path_cls = type(epath.Path(tmp_path))
    rename = path_cls.rename

    def failing_rename(self, target):
        if epath.Path(target).name == "3":
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(path_cls, "rename", failing_rename)
    ckpt.save(3, make_state(3), force=True)
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    monkeypatch.undo()
    assert ckpt.latest_step() == 2
    assert step_dirs(tmp_path)[:2] == ["1", "2"]
    assert_bit_equal(ckpt.restore(make_state(0)), make_state(2))
    ckpt.close()
    # The next run finds only complete checkpoints, removes the unfinished one, saves step 3.
    ckpt = Checkpointer(tmp_path, metadata=METADATA)
    assert ckpt.latest_step() == 2
    assert ckpt.save(3, make_state(3), force=True)
    ckpt.close()
    assert step_dirs(tmp_path) == ["1", "2", "3"]


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
