"""What the phases of one run share, and how a run opens: config checked, cluster joined,
data opened, mesh built, metrics writer ready.

Every random stream of a run is derived from ``config.seed`` here (:data:`SEED_OFFSETS`), so
a study that repeats part of a run (e.g. BN re-estimation on the same batches) asks this
module instead of copying a number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

import jax
import ml_collections
import numpy as np

from oscqat_jax.training import build, data, metrics, models, peers
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.forward import Forward

SEED_OFFSETS = {
    "float_state": 1,  # dropout key of the float phase's train state
    "qat_state": 2,  # dropout key of the QAT train state
    "calibration_init": 3,  # initialisers of the quantizer variables
    "bn_batches": 10_007,  # training batches of BN re-estimation
    "calibration_batches": 20_011,  # training batches of range initialisation
}
"""Added to ``config.seed`` for each random stream of a run besides the training batches."""


@dataclasses.dataclass
class Context:
    """What the phases of one run share."""

    config: ml_collections.ConfigDict
    workdir: str
    source: data.Source
    sharded: step_lib.Sharded
    writer: metrics.MetricWriter
    lock: WorkdirLock | None = None
    forward: Forward | None = None  # the model as the steps call it (:mod:`.forward`)

    def seed(self, stream: str) -> int:
        """The seed of one of the run's random streams (see :data:`SEED_OFFSETS`)."""
        return self.config.seed + SEED_OFFSETS[stream]

    @property
    def steps_per_epoch(self) -> int:
        return data.steps_per_epoch(self.source, self.config.data.batch_size)

    def train_batches(self, start_step: int, stream: str | None = None):
        """This process's rows of the global training batches from ``start_step`` on (of the
        training order, or of another random stream of :data:`SEED_OFFSETS`)."""
        return self.source.train_batches(
            start_step,
            batch_size=self.config.data.batch_size,
            seed=self.config.seed if stream is None else self.seed(stream),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the global training batch of ``step`` alone."""
        return next(self.train_batches(step))

    def eval_batches(self):
        """This process's rows of the padded validation batches ``(images, labels, mask)``."""
        return self.source.eval_batches(
            batch_size=self.config.data.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins the multi-host run described by ``config.distributed``, if any.

    Must run before anything touches a device. With a coordinator address every process
    passes it with the process count and its own id; with ``auto`` the platform (TPU pod,
    SLURM, ...) supplies them. A single-host run does nothing. When a process of the run
    dies, the others end within about ``distributed.heartbeat_timeout_s`` seconds with one
    sentence naming it (:mod:`.peers`).
    """
    d = config.distributed
    if not (d.coordinator_address or d.auto):
        return
    if jax.distributed.is_initialized():
        return
    peers.initialize(
        heartbeat_timeout_s=d.heartbeat_timeout_s,
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes,
        process_id=d.process_id,
    )


def _check_batch_sizes(config, sharded: step_lib.Sharded) -> None:
    for field in ("batch_size", "eval_batch_size"):
        size = config.data[field]
        if size % sharded.num_devices:
            raise ValueError(
                f"config.data.{field} = {size} does not divide over {sharded.num_devices} "
                "devices; use a multiple of the device count."
            )


LOCK_FILE = "run.lock"


class WorkdirLock:
    """An exclusive lock on a workdir for the run that writes it: ``<workdir>/run.lock``
    holds the host, process id and start time of its holder, and is created atomically.

    A second run on the same workdir is refused with one sentence naming the holder. A lock
    left by a process that no longer runs on this host (a killed run) is stale and taken
    over; a lock of another host cannot be checked, so it is refused until removed.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_stale():
                    raise RuntimeError(self._refusal()) from None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(holder, f)
            self.held = True
            return
        raise RuntimeError(self._refusal())

    def _holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _take_over_stale(self) -> bool:
        holder = self._holder()
        if holder is None or holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            print(
                f"Removing the stale lock {self.path} of process {holder['pid']}, which has ended."
            )
            os.remove(self.path)
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return False

    def _refusal(self) -> str:
        holder = self._holder()
        who = (
            f"process {holder.get('pid')} on {holder.get('host')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}"
            if holder
            else "an unknown process"
        )
        return (
            f"The workdir {os.path.dirname(self.path)} is in use by {who} ({self.path}); wait "
            "for that run to end, use another --workdir, or delete the lock file if that run "
            "is gone."
        )

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def open_run(config: ml_collections.ConfigDict, workdir: str, *, write_metrics: bool) -> Context:
    """Validates the config, joins the cluster, opens the data, builds the model's forward
    (:func:`.models.forward_of`, which refuses an own model that does not fit) and the mesh
    of all devices.

    A run that writes (``write_metrics``) takes the workdir's :class:`WorkdirLock` on process
    0 before it writes anything there (release it with :func:`close_run`); evaluation and
    export only read, take no lock and create nothing.
    """
    build.validate(config)
    initialize_distributed(config)
    peers.note(workdir=workdir)
    source = data.load_dataset(config.data)
    lock = None
    try:
        forward = models.forward_of(config, source)  # an own model is checked before any work
        sharded = step_lib.Sharded.over_all_devices(fast_compile=config.train.fast_compile)
        _check_batch_sizes(config, sharded)
        if write_metrics:
            os.makedirs(workdir, exist_ok=True)
            if jax.process_index() == 0:
                lock = WorkdirLock(workdir)
                lock.acquire()
    except BaseException:
        source.close()
        raise
    writer = metrics.MetricWriter(workdir, enabled=write_metrics and jax.process_index() == 0)
    return Context(config, workdir, source, sharded, writer, lock, forward)


def close_run(ctx: Context) -> None:
    """Closes the data and the metrics writer and releases the workdir lock."""
    try:
        ctx.writer.close()
        ctx.source.close()
    finally:
        if ctx.lock is not None:
            ctx.lock.release()
