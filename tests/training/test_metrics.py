"""Tests of oscqat_jax.training.metrics: the JSONL log, TensorBoard events, the table, the bar."""

import glob
import json
import math
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from oscqat_jax.training import metrics


def read_events(directory) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in the TFRecord event files under ``directory``."""
    scalars = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            # TFRecord: uint64 length, uint32 crc of the length, payload, uint32 crc.
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return scalars


def test_jsonl_rows_types_and_non_finite_values(tmp_path):
    before = time.time()
    writer = metrics.MetricWriter(tmp_path)
    writer.write(
        10, {"loss": jnp.float32(0.25), "top1": np.float64(97.5), "lr": 0.01}, prefix="qat"
    )
    writer.write(20, {"loss": jnp.array([math.nan]), "grad": math.inf, "neg": -math.inf})
    writer.close()
    lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"step", "time", "qat/loss", "qat/top1", "qat/lr"}
    assert first["step"] == 10 and isinstance(first["step"], int)
    assert isinstance(first["time"], float) and before <= first["time"] <= time.time()
    assert (first["qat/loss"], first["qat/top1"], first["qat/lr"]) == (0.25, 97.5, 0.01)
    assert type(first["qat/loss"]) is float
    assert (second["loss"], second["grad"], second["neg"]) == ("NaN", "Infinity", "-Infinity")
    read = metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
    assert (
        math.isnan(read[1]["loss"]) and read[1]["grad"] == math.inf and read[1]["neg"] == -math.inf
    )
    assert read[0] == first


def test_tensorboard_scalars_are_readable(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    writer.write(5, {"loss": 1.5}, prefix="float")
    writer.write(6, {"loss": 0.5}, prefix="float")
    writer.close()
    assert read_events(tmp_path / metrics.TENSORBOARD_DIR) == [
        (5, "float/loss", 1.5),
        (6, "float/loss", 0.5),
    ]


def test_resumed_run_appends_after_a_cut_line(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "time": 0.0, "loss": 2.0}\n{"step": 2, "ti')
    writer = metrics.MetricWriter(tmp_path)
    writer.write(3, {"loss": 1.0})
    writer.close()
    assert [row["step"] for row in metrics.read_metrics(path)] == [1, 3]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "run", enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_non_scalar_metric_is_refused(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    with pytest.raises(ValueError, match="Metric 'loss' must be a scalar, got an array of shape"):
        writer.write(1, {"loss": np.ones(3)})
    writer.close()


def test_format_table():
    rows = [("float accuracy", "99.4 %"), ("wall time", "312 s")]
    assert metrics.format_table(rows, title="Summary") == (
        "Summary\n=======================\nfloat accuracy | 99.4 %\nwall time      |  312 s"
    )
    assert metrics.format_table([("a", "1")], title="Long title") == "Long title\n==========\na | 1"
    assert metrics.format_table([("a", "1")]) == "a | 1"


def test_progress_bar_counts_from_initial_and_shows_the_loss():
    bar = metrics.progress_bar(10, desc="qat", initial=4)
    bar.update(2)
    bar.set_postfix(loss="0.123")
    assert bar.n == 6 and bar.total == 10
    assert "qat" in str(bar) and "loss=0.123" in str(bar) and "6/10" in str(bar)
    bar.close()
    assert metrics.progress_bar(10, desc="qat", enabled=False).disable
