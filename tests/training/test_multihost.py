"""A two-process run (jax.distributed on CPU, localhost) against a one-process run.

Both see four devices and read the same global batches: the two processes hold two devices
each and read half of every batch. The runs must end in the same state, and only process 0
writes the metrics.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
from testkit import ROOT, TESTS, assert_trees_equal, restore_final, tiny_config

WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from testkit import tiny_config
    from oscqat_jax.training import trainer

    config = tiny_config(train__epochs=1)
    config.distributed.coordinator_address = {coordinator!r}
    config.distributed.num_processes = {num_processes}
    config.distributed.process_id = {process_id}
    summary = trainer.train_and_evaluate(config, {workdir!r})
    import jax
    print("RESULT", json.dumps(dict(
        process=jax.process_index(), processes=jax.process_count(),
        devices=len(jax.devices()), summary={{k: v for k, v in summary.items()
                                              if k != "wall_time_s"}})))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, *, process_id, num_processes, local_devices, coordinator=""):
    script = WORKER.format(
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


def _result(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.split("RESULT", 1)[1])


def test_two_processes_end_in_the_state_of_one_process(tmp_path):
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    coordinator = f"localhost:{_free_port()}"
    procs = [
        _launch(multi_dir, process_id=i, num_processes=2, local_devices=2, coordinator=coordinator)
        for i in range(2)
    ]
    single = _result(_launch(single_dir, process_id=0, num_processes=1, local_devices=4))
    multi = [_result(p) for p in procs]

    assert [m["process"] for m in multi] == [0, 1]
    assert all(m["processes"] == 2 and m["devices"] == 4 for m in multi)
    assert single["processes"] == 1 and single["devices"] == 4
    config = tiny_config(train__epochs=1)
    step_s, state_s = restore_final(single_dir, config)
    step_m, state_m = restore_final(multi_dir, config)
    assert step_s == step_m == 6
    # The same program over the same four devices; only the all-reduce runs across
    # processes, which may add in another order (float rounding).
    for part in ("params", "batch_stats", "oscillation"):
        assert_trees_equal(state_s[part], state_m[part], atol=1e-5)
    # Adam's moments of the scales are sums of small gradients that partly cancel.
    assert_trees_equal(state_s["opt_state"], state_m["opt_state"], atol=1e-4, rtol=1e-4)
    for key in ("float", "qat_pre_bn", "qat_post_bn"):
        np.testing.assert_allclose(multi[0]["summary"][key], single["summary"][key], atol=1e-4)
    # Every process evaluates (the accuracy is a global reduction); only process 0 reads the
    # metrics back for the QAT history.
    assert multi[1]["summary"]["float"] == multi[0]["summary"]["float"]
    assert "qat_pre_bn" not in multi[1]["summary"]
    # One metrics file, written by process 0 alone: each step is recorded once.
    rows = [json.loads(line) for line in open(os.path.join(multi_dir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "qat/loss" in r]
    assert steps and len(steps) == len(set(steps))
