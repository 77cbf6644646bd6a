"""Shared test set-up: the two tiers, a persistent XLA compilation cache, and the trained runs
that several test files read (``digits_run``, ``tiny_run``, ``two_process_run``).

Tiers: ``python -m pytest -q -m "not slow"`` is the quick run (unit tests and small
integration tests of every module, about 5 minutes on two cores); ``python -m pytest -q`` the
full suite, which adds the tests marked ``slow`` (many training steps, notebooks, subprocess
pipelines, full-size networks).

Compilation cache: most of the suite's time is XLA compiling small programs, and the same
programs are compiled by every run of the suite. Compiled executables are kept in
``$XDG_CACHE_HOME/oscqat_jax/tests-xla`` (``~/.cache/...`` by default), shared by the test
workers, the subprocesses the tests start (through ``JAX_COMPILATION_CACHE_DIR``) and later
runs. Sharing is safe: an entry's key hashes the program, the compile options, the device and
the jax/jaxlib version, so a changed source or a new jax misses instead of reading a stale
executable; the cache is size-bounded (least recently used entries go first) and locked while
written. ``--no-compile-cache`` runs cold (no cache at all), e.g. to time the suite as a fresh
machine sees it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

CACHE_MAX_BYTES = 2 * 1024**3
# Compiles shorter than this are not worth a file: reading it costs about as much.
CACHE_MIN_COMPILE_S = 0.2


def suite_cache_dir() -> pathlib.Path:
    """The persistent compilation cache of the test suite (created on first use)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "oscqat_jax" / "tests-xla"


def pytest_addoption(parser):
    parser.addoption(
        "--no-compile-cache",
        action="store_true",
        default=False,
        help="Run without the suite's persistent XLA compilation cache (a cold run, as on a "
        "fresh machine).",
    )


def pytest_configure(config):
    if config.getoption("--no-compile-cache"):
        # Nothing persistent, in subprocesses and notebook kernels either.
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        jax.config.update("jax_compilation_cache_dir", None)
        return
    cache = suite_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a per-run cache still shares compiles between tests
        cache = pathlib.Path(tempfile.mkdtemp(prefix="oscqat_jax_tests_xla_"))
    settings = {
        "jax_compilation_cache_dir": str(cache),
        "jax_persistent_cache_min_compile_time_secs": CACHE_MIN_COMPILE_S,
        "jax_compilation_cache_max_size": CACHE_MAX_BYTES,
    }
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # subprocesses and notebook kernels


@pytest.fixture(scope="session")
def compile_cache_dir() -> str:
    """The suite's compilation cache directory, or "" under ``--no-compile-cache``: what a
    test hands to ``train.py --compilation_cache=`` or a subprocess it starts."""
    return jax.config.jax_compilation_cache_dir or ""


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished ``python train.py`` run: its config, workdir and what it printed.

    The workdir is shared by every test of the session: read it, and write exports and copies
    elsewhere (``tmp_path``).
    """

    config: object
    workdir: pathlib.Path
    stdout: str
    stderr: str  # the progress bars


def _shared_dir(tmp_path_factory) -> pathlib.Path:
    """A directory every xdist worker of this test session sees (pytest's own otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, build) -> tuple[pathlib.Path, pathlib.Path]:
    """``(workdir, done)`` of the shared run ``name``: the first xdist worker to ask calls
    ``build(workdir, done)``, which must write the marker ``done`` last, while the others wait
    on a file lock; a workdir that a failed worker left half way is removed first."""
    import filelock

    shared = _shared_dir(tmp_path_factory)
    workdir, done = shared / name, shared / f"{name}.done"
    with filelock.FileLock(str(shared / f"{name}.lock"), timeout=1200):
        if not done.exists():
            if workdir.exists():  # a worker that failed half way
                shutil.rmtree(workdir)
            build(workdir, done)
    return workdir, done


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, compile_cache_dir) -> TrainedRun:
    """testkit's digits run, trained once per test session by ``python train.py`` (the first
    worker to ask trains it while the others wait on a file lock, then all read it)."""
    import filelock
    from testkit import DIGITS_RUN_FLAGS, ROOT, digits_run_config

    shared = _shared_dir(tmp_path_factory)
    workdir, done = shared / "digits_run", shared / "digits_run.ok"
    out, err = shared / "digits_run.stdout", shared / "digits_run.stderr"
    with filelock.FileLock(str(shared / "digits_run.lock"), timeout=1200):
        if not done.exists():
            result = subprocess.run(
                [
                    sys.executable,
                    "train.py",
                    *DIGITS_RUN_FLAGS,
                    f"--workdir={workdir}",
                    f"--compilation_cache={compile_cache_dir}",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            out.write_text(result.stdout)
            err.write_text(result.stderr)
            done.touch()
    return TrainedRun(digits_run_config(), workdir, out.read_text(), err.read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
    """The workdir of testkit's uninterrupted tiny run (:data:`testkit.TINY_RUN`), trained once
    per test session in the process of the first worker to ask (the others wait on a file
    lock). Shared: read it, or copy it (``shutil.copytree``) before training on it."""
    from testkit import tiny_run_config

    from oscqat_jax.training import trainer

    def build(workdir, done):
        trainer.train_and_evaluate(tiny_run_config(), str(workdir))
        done.touch()

    workdir, _ = _once(tmp_path_factory, "tiny_run", build)
    return str(workdir)


@dataclasses.dataclass(frozen=True)
class TwoProcessRun:
    """testkit's uninterrupted two-process run: its workdir and what each process reported
    (``testkit.DISTRIBUTED_WORKER``'s RESULT), process 0 first. Read it; write elsewhere."""

    workdir: str
    results: list


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> TwoProcessRun:
    """testkit's :data:`~testkit.TWO_PROCESS_RUN`, trained once per test session (the first
    worker to ask starts both processes while the others wait on a file lock)."""
    import json

    from testkit import distributed_result, free_port, launch_distributed

    def build(workdir, done):
        coordinator = f"localhost:{free_port()}"
        procs = [
            launch_distributed(
                str(workdir),
                process_id=i,
                num_processes=2,
                local_devices=2,
                coordinator=coordinator,
            )
            for i in range(2)
        ]
        done.write_text(json.dumps([distributed_result(p) for p in procs]))

    workdir, done = _once(tmp_path_factory, "two_process_run", build)
    return TwoProcessRun(str(workdir), json.loads(done.read_text()))
