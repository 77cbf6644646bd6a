"""What the processes of a multi-process run do when one of them dies: end within a bounded
time, each with one sentence naming the lost process.

Every process runs a :class:`PeerWatch` thread that writes a heartbeat (a counter) into the
key-value store of ``jax.distributed``'s coordination service every :data:`BEAT_S` seconds and
reads the others'. A process whose counter has not moved for ``distributed.heartbeat_timeout_s``
seconds is lost: the watch prints one sentence naming it, what this process was doing and
where the run resumes from, and ends the process at once with :data:`EXIT_STATUS`. It cannot
unwind: the main thread may be blocked in a collective or a checkpoint barrier with the dead
process, which never returns. A process that ends on its own (normally or with its own error)
says so at exit, so the others do not count it as lost.

JAX has a heartbeat of its own, whose timeout aborts the surviving processes with a
multi-line log message (its callback cannot be replaced from Python: jaxlib cannot pass the
status to a Python callable). Its timeout is set well above the watch's, so the watch speaks
first. One case is left to JAX: when process 0 dies, the coordination service it runs dies
with it, and JAX ends the other processes within a second with its own message, which names
"the leader task".

Nothing is left that a restart would trust: a checkpoint is renamed into place only after
every process has written its part (:mod:`.checkpoint`), and the temporary directory of an
unfinished one is removed when the run restarts.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time

import jax

EXIT_STATUS = 75
"""The exit status of a process that ends because another one was lost (``EX_TEMPFAIL``:
re-running the same command resumes the run)."""
BEAT_S = 1.0
"""Seconds between two heartbeats of a process's watch."""
VERDICT_MARGIN_S = 15
"""How long after the heartbeat timeout :func:`await_verdict` still waits for the watch."""
_ALIVE = "oscqat_jax/alive/"
_ENDED = "ended"


def jax_heartbeat_timeout(heartbeat_timeout_s: int) -> int:
    """JAX's own heartbeat timeout for a watch of ``heartbeat_timeout_s`` seconds: long
    enough that the watch always decides first."""
    return 2 * heartbeat_timeout_s + 10


@dataclasses.dataclass
class PeerWatch:
    """The heartbeat watch of one process (there is one per process, as there is one
    distributed client): the training loop updates ``phase`` and ``step``."""

    process_id: int
    num_processes: int
    heartbeat_timeout_s: int
    workdir: str = ""
    phase: str = ""
    step: int = 0

    def __post_init__(self):
        self._ended = threading.Event()

    def sentence(self, lost: list[int]) -> str:
        """The one sentence said when the processes ``lost`` sent no heartbeat in time."""
        who = f"Process {lost[0]}" if len(lost) == 1 else f"Processes {lost}"
        where = f" (at {self.phase} step {self.step})" if self.phase else ""
        checkpoints = os.path.join(self.workdir, "checkpoints") if self.workdir else "the workdir"
        return (
            f"Error: {who} of this {self.num_processes}-process run sent no heartbeat for "
            f"{self.heartbeat_timeout_s} s, so process {self.process_id} stops too{where}; "
            "re-run the same command on every process to resume from the newest complete "
            f"checkpoint in {checkpoints}."
        )

    def beats(self, client) -> None:
        """The thread's loop: beats, and ends the process when another one is lost."""
        others = [p for p in range(self.num_processes) if p != self.process_id]
        now = time.monotonic()
        seen = {p: (None, now) for p in others}  # the last counter read, and when it moved
        beat = 0
        while not self._ended.is_set():
            beat += 1
            try:
                client.key_value_set(f"{_ALIVE}{self.process_id}", str(beat), allow_overwrite=True)
                values = dict(client.key_value_dir_get(_ALIVE))
            except Exception:  # noqa: BLE001 -- the service is gone: JAX ends the process
                values = {}
            now = time.monotonic()
            for p in others:
                value = values.get(f"{_ALIVE}{p}")
                if value == _ENDED:
                    seen[p] = (value, float("inf"))
                elif value is not None and value != seen[p][0]:
                    seen[p] = (value, now)
            lost = [p for p in others if now - seen[p][1] > self.heartbeat_timeout_s]
            if lost and not self._ended.is_set():
                self._stop_process(self.sentence(lost))
            time.sleep(BEAT_S)

    def end(self, client) -> None:
        """Tells the others that this process ends on its own (at exit)."""
        self._ended.set()
        try:
            client.key_value_set(f"{_ALIVE}{self.process_id}", _ENDED, allow_overwrite=True)
        except Exception:  # noqa: BLE001 -- nothing to tell when the service is gone
            pass

    @staticmethod
    def _stop_process(sentence: str) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 -- the sentence matters, not the flush
                pass
        os.write(2, (sentence + "\n").encode())
        os._exit(EXIT_STATUS)


_WATCH: PeerWatch | None = None
"""This process's watch (its thread runs as long as the process)."""


def initialize(
    *,
    heartbeat_timeout_s: int,
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` (``coordinator_address`` empty: the platform describes
    the cluster) and this process's :class:`PeerWatch`."""
    global _WATCH
    from jax._src import distributed as jax_distributed  # the client lives there

    kwargs = {"heartbeat_timeout_seconds": jax_heartbeat_timeout(heartbeat_timeout_s)}
    if coordinator_address:
        kwargs.update(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    state = jax_distributed.global_state
    # Read from jax's state, not jax.process_index(): that would start the backend here.
    watch = PeerWatch(state.process_id, state.num_processes, heartbeat_timeout_s)
    if watch.num_processes < 2:
        return
    threading.Thread(
        target=watch.beats, args=(state.client,), name="oscqat_jax-peer-watch", daemon=True
    ).start()
    # Registered after jax's own clean-up, so it runs first, while the client is connected.
    atexit.register(watch.end, state.client)
    _WATCH = watch


def note(*, workdir: str | None = None, phase: str | None = None, step: int | None = None):
    """Records where this process is, for the sentence of a lost process (a no-op in a
    single-process run)."""
    if _WATCH is None:
        return
    if workdir is not None:
        _WATCH.workdir = workdir
    if phase is not None:
        _WATCH.phase = phase
    if step is not None:
        _WATCH.step = step


def await_verdict(err: BaseException) -> None:
    """Waits, in a multi-process run, for the watch to decide whether a process was lost,
    when ``err`` is a runtime error: a collective whose peer has died fails (gloo: "Connection
    closed by peer") before the heartbeat timeout, and the run should end with the sentence
    naming that process (the watch ends this one during the wait), not with this error.
    Returns at once for other errors, or after the wait when no process was lost."""
    if _WATCH is None or not isinstance(err, jax.errors.JaxRuntimeError):
        return
    time.sleep(_WATCH.heartbeat_timeout_s + VERDICT_MARGIN_S)
