"""What the user sees of a run: a metrics log (JSON lines and TensorBoard), a progress bar, a table.

``workdir/metrics.jsonl`` holds one JSON object per :meth:`MetricWriter.write` call::

    {"step": 1000, "time": 1718000000.5, "qat/loss": 0.731, "qat/top1": "NaN"}

``time`` is the Unix time in seconds. Metric values are Python floats; the non-finite ones,
which strict JSON cannot hold, are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
(the tokens Python's ``json`` reads), and :func:`read_metrics` turns them back into floats.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class MetricWriter:
    """Appends scalar metrics to ``workdir/metrics.jsonl`` and ``workdir/tensorboard/``.

    With ``enabled=False`` (processes other than 0 in a multi-host run) nothing is created or
    written. A resumed run appends to the same files.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        # A run killed mid-line leaves no newline; start on a fresh line so one row is lost, not two.
        needs_newline = os.path.exists(path) and _last_byte(path) not in (b"", b"\n")
        self._jsonl = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._jsonl.write("\n")
        # Imported here: tensorboardX imports torch when it is installed, which takes seconds.
        import tensorboardX

        self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(
        self,
        step: int,
        metrics: Mapping[str, float | np.ndarray | jax.Array],
        prefix: str = "",
    ) -> None:
        """Logs ``metrics`` (scalars: Python, NumPy or JAX, one element each) at ``step``.

        Keys become ``f"{prefix}/{key}"`` when ``prefix`` is given.
        """
        if not self.enabled:
            return
        values = {}
        for key, value in metrics.items():
            array = np.asarray(value)
            if array.size != 1:
                raise ValueError(
                    f"Metric {key!r} must be a scalar, got an array of shape {array.shape}."
                )
            values[f"{prefix}/{key}" if prefix else key] = float(array.reshape(()))
        row = {"step": int(step), "time": time.time()}
        # Strict JSON has no NaN/Infinity: they become the strings json.dumps would print.
        row.update({k: v if math.isfinite(v) else json.dumps(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        """Flushes and closes both files (a no-op when disabled or already closed)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._jsonl = self._tensorboard = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file, non-finite values as floats again.

    A line that is not valid JSON (a run killed while writing it) is skipped with a warning.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logging.warning("Skipping line %d of %s, which is not valid JSON.", number, path)
                continue
            rows.append(
                {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
            )
    return rows


def logged_means(path: str | os.PathLike, key: str, *, up_to_step: int) -> list[float]:
    """The values of ``key`` logged at steps up to ``up_to_step``, oldest step first.

    A resumed run logs again the steps after its checkpoint; of a step logged more than once,
    the newest record counts (as :func:`read_metrics` returns them, in file order).
    """
    by_step = {}
    for row in read_metrics(path):
        if key in row and row["step"] <= up_to_step:
            by_step[row["step"]] = float(row[key])
    return [by_step[step] for step in sorted(by_step)]


def progress_bar(total: int, desc: str, initial: int = 0, *, enabled: bool = True) -> tqdm.tqdm:
    """A step progress bar with rate and ETA; show the loss with ``bar.set_postfix(loss=...)``.

    On a terminal it refreshes at most twice a second; when stderr goes to a log file it prints
    a line at most every 60 s, so logs stay readable. ``enabled=False`` shows nothing.
    """
    interactive = sys.stderr.isatty()
    return tqdm.tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit="step",
        dynamic_ncols=interactive,
        mininterval=0.5 if interactive else 60.0,
        disable=not enabled,
    )


def format_table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """A two-column text table, labels left-aligned and values right-aligned.

    For example
    ``format_table([("float accuracy", "99.4 %"), ("wall time", "312 s")], title="Summary")``
    gives::

        Summary
        =======================
        float accuracy | 99.4 %
        wall time      |  312 s
    """
    label_width = max((len(label) for label, _ in rows), default=0)
    value_width = max((len(value) for _, value in rows), default=0)
    width = max(label_width + value_width + 3, len(title or ""))
    lines = [] if title is None else [title, "=" * width]
    lines += [f"{label:<{label_width}} | {value:>{value_width}}" for label, value in rows]
    return "\n".join(lines)


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return b""
        f.seek(-1, os.SEEK_END)
        return f.read(1)
