"""Helpers shared by the test folders: the repository root, loading a script of the
repository as a module, the tiny config of ``configs/tiny.py``, the suite's trained digits run
and uninterrupted tiny and two-process runs, and comparing trees."""

from __future__ import annotations

import ast
import collections
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def load_script(relative_path: str, module_name: str):
    """The repository file ``relative_path`` (e.g. ``demos/reproduce.py``) imported as a module."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_tiny = load_script("configs/tiny.py", "tiny_config_file")
TEST_BLOCKS = _tiny.TEST_BLOCKS


def tiny_config(**overrides):
    """``configs/tiny.py``'s test config with ``group__field=value`` overrides."""
    c = _tiny.get_config("test")
    for key, value in overrides.items():
        group, field = key.split("__")
        c[group][field] = value
    return c


# The one trained run of the suite: configs/tiny.py on the real digits (16x16, one channel;
# 1437 training images, 22 steps per epoch; 360 validation images in three batches of 120), two
# float epochs and one QAT epoch, so its accuracy is far above chance. It is trained once per
# test session by ``python train.py`` (tests/conftest.py's ``digits_run``) and read by the tests
# that need a trained checkpoint: the end-to-end run, the exports and the export check.
DIGITS_RUN = {
    "data.name": "digits",
    "data.image_size": 16,
    "data.batch_size": 64,
    "data.eval_batch_size": 120,
    "float_train.epochs": 2,
    "train.epochs": 1,
    "train.log_every": 11,
    "train.checkpoint_every": 1000,
    "eval.bn_batches": 4,
}
DIGITS_RUN_FLAGS = [
    f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
    *(f"--config.{k}={v}" for k, v in DIGITS_RUN.items()),
]
DIGITS_IMAGE_SHAPE = (16, 16, 1)


def digits_run_config():
    """The config of :data:`DIGITS_RUN` (what ``train.py`` with :data:`DIGITS_RUN_FLAGS` runs)."""
    return tiny_config(**{k.replace(".", "__"): v for k, v in DIGITS_RUN.items()})


# The suite's one uninterrupted tiny run: configs/tiny.py (two QAT epochs of 6 steps) with a
# checkpoint every 2 steps (all kept) and every step logged, trained once per test session
# (tests/conftest.py's ``tiny_run``). The preemption, checkpoint-integrity and divergence tests
# compare their interrupted, damaged or diverged runs with it: they run these overrides (the
# divergence tests their own checkpointing and logging, which must not change the state).
TINY_RUN = {"train__checkpoint_every": 2, "train__log_every": 1}
TINY_RUN_QAT_STEPS = 12


def tiny_run_config():
    """The config of :data:`TINY_RUN`."""
    return tiny_config(**TINY_RUN)


# The suite's one uninterrupted two-process run (jax.distributed on CPU, localhost; two
# devices per process): configs/tiny.py for one QAT epoch of 6 steps with seed 2, every step
# logged, a checkpoint every 2 steps, trained once per test session by two ``python -c
# DISTRIBUTED_WORKER`` processes (tests/conftest.py's ``two_process_run``). test_multihost.py
# compares a one-process run with it; test_dead_peer.py a killed and resumed run.
TWO_PROCESS_RUN = {"train__epochs": 1, "train__log_every": 1, "train__checkpoint_every": 2}
TWO_PROCESS_SEED = 2
TWO_PROCESS_QAT_STEPS = 6


def two_process_run_config():
    """The config of :data:`TWO_PROCESS_RUN` (and of the one-process run compared with it)."""
    config = tiny_config(**TWO_PROCESS_RUN)
    config.seed = TWO_PROCESS_SEED
    return config


# One process of a distributed run of :func:`two_process_run_config` (``process_id`` of
# ``num_processes``, ``local_devices`` CPU devices each); it prints ``RESULT`` and a JSON of
# the run's summary and of how the trainer placed this process's rows of a global batch.
DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from testkit import two_process_run_config
    from oscqat_jax.training import data, trainer
    from oscqat_jax.training import step as step_lib

    config = two_process_run_config()
    config.distributed.coordinator_address = {coordinator!r}
    config.distributed.num_processes = {num_processes}
    config.distributed.process_id = {process_id}
    summary = trainer.train_and_evaluate(config, {workdir!r})
    import jax
    # How the trainer places this process's rows of a global batch on the mesh.
    source = data.load_dataset(config.data)
    images, _ = next(source.train_batches(
        0, batch_size=config.data.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count()))
    placed = step_lib.Sharded.over_all_devices().put_batch(images)
    shards = sorted((s.device.id, *s.index[0].indices(placed.shape[0])[:2], s.data.shape[0])
                    for s in placed.addressable_shards)
    print("RESULT", json.dumps(dict(
        process=jax.process_index(), processes=jax.process_count(),
        devices=len(jax.devices()), local_rows=len(images), global_rows=placed.shape[0],
        shards=shards, summary={{k: v for k, v in summary.items() if k != "wall_time_s"}})))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_distributed(workdir, *, process_id, num_processes, local_devices, coordinator=""):
    """Starts one :data:`DISTRIBUTED_WORKER` process (a ``subprocess.Popen``)."""
    script = DISTRIBUTED_WORKER.format(
        local_devices=local_devices,
        root=ROOT,
        tests=TESTS,
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        workdir=workdir,
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def distributed_result(proc, timeout=900) -> dict:
    """What a :data:`DISTRIBUTED_WORKER` process printed after ``RESULT``; fails the test with
    its stderr when it exits non-zero."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULT", 1)[1])


def qat_schedules_with_model_lr(index: int, value: float):
    """A stand-in for ``build.qat_schedules`` (monkeypatch it in) whose table holds ``value``
    as the model learning rate of 0-based step ``index``, every other entry unchanged: a NaN
    there makes that step's state non-finite, 1e30 makes it finite but ruined."""
    from oscqat_jax.training import build

    qat_schedules = build.qat_schedules

    class Schedules:
        def __init__(self, *args):
            self.schedules = qat_schedules(*args)

        def table(self, total_steps):
            table = dict(self.schedules.table(total_steps))
            table["model_lr"] = table["model_lr"].copy()
            table["model_lr"][index] = value
            return table

    return Schedules


def restore_final(workdir, config):
    """``(step, state)`` of a run's newest QAT checkpoint, read onto this process's first
    device whatever devices the run that wrote it had."""
    import orbax.checkpoint as ocp

    from oscqat_jax.training import build, checkpoint

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        metadata=build.run_metadata(config, "qat", config.data.num_classes),
    )
    step = ckpt.latest_step()
    path = os.path.join(ckpt.directory, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ocp.StandardCheckpointer().metadata(path).item_metadata.tree,
    )
    state = ocp.StandardCheckpointer().restore(path, target)
    ckpt.close()
    return step, state


def assert_trees_equal(a, b, atol=0.0, rtol=0.0):
    """Leaf by leaf equality of two trees of the same structure (within the tolerances)."""
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            atol=atol,
            rtol=rtol,
            err_msg=jax.tree_util.keystr(path),
        )


# The import walker (source text only, nothing imported) of test_layering.py and
# scripts/test_packaging.py.
class Import(collections.namedtuple("Import", "source target line lazy")):
    """``source`` imports ``target`` (a dotted name) at ``line``; ``lazy``: inside a function."""


def _module_name(package_dir: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside function bodies (an import there runs only when called)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def collect_imports(package_dir: pathlib.Path) -> tuple[dict[str, pathlib.Path], list[Import]]:
    """The package's modules (name -> file) and every import statement in them."""
    files = {_module_name(package_dir, p): p for p in sorted(package_dir.rglob("*.py"))}
    imports = []
    for source, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        lazy_lines = _function_lines(tree)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    if node.level - 1 >= len(parts):
                        raise ValueError(f"{path}:{node.lineno}: relative import above the package")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            lazy = node.lineno in lazy_lines
            imports += [Import(source, t, node.lineno, lazy) for t in dict.fromkeys(targets)]
    return files, imports


def run_pickling_script(code: str, output: str, *, timeout: int = 900):
    """Runs ``python -c code output`` (a script that pickles its results into the file
    ``output``, e.g. one that sets XLA flags before importing JAX) and returns what it
    pickled; fails the test with the script's stderr when it exits non-zero."""
    import pickle

    result = subprocess.run(
        [sys.executable, "-c", code, output],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, "rb") as f:
        return pickle.load(f)
