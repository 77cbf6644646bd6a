"""A two-process run (jax.distributed on CPU, localhost) against a one-process run.

Both see four devices and read the same global batches: the two processes hold two devices
each and read half of every batch. The runs must end in the same state, and only process 0
writes the metrics.
"""

import json
import os

import numpy as np
import pytest
from testkit import (
    TWO_PROCESS_QAT_STEPS,
    assert_trees_equal,
    distributed_result,
    launch_distributed,
    restore_final,
    two_process_run_config,
)

# The two-process run is the suite's (conftest's ``two_process_run``: testkit's
# DISTRIBUTED_WORKER, one QAT epoch of 6 steps, every step's loss logged, the tiny config's
# tracking freezing a few weights). Its seed, 2, is one whose epoch freezes weights and rounds
# every value alike in both runs: with the plain models' initial values seed 0's six steps
# freeze none, and seeds 1 and 4 round one value differently (a 3-bit network's legitimate
# parting, as in test_training's device test).


def _oscillation_states(collection) -> list[dict]:
    """Every tracked weight's state (a dict holding ``frozen``) in an oscillation collection."""
    if "frozen" in collection:
        return [collection]
    return [s for child in collection.values() for s in _oscillation_states(child)]


def _step_losses(workdir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["qat/loss"]) for r in rows if "qat/loss" in r]


@pytest.mark.slow
def test_two_processes_end_in_the_state_of_one_process(request, tmp_path):
    single_dir = str(tmp_path / "single")
    # Started first: it runs beside the two processes when this test is the first to ask for
    # them (each process waits on its peers and the file system a good part of the time).
    single_process = launch_distributed(single_dir, process_id=0, num_processes=1, local_devices=4)
    two_process_run = request.getfixturevalue("two_process_run")
    multi_dir, multi = two_process_run.workdir, two_process_run.results
    single = distributed_result(single_process)

    assert [m["process"] for m in multi] == [0, 1]
    assert all(m["processes"] == 2 and m["devices"] == 4 for m in multi)
    assert single["processes"] == 1 and single["devices"] == 4
    # Each process feeds its half of every global batch of 8, split over its two devices:
    # four quarters in all, as the one process splits its whole batch over its four.
    assert [(m["local_rows"], m["global_rows"]) for m in multi] == [(4, 8), (4, 8)]
    assert [[s[1:] for s in m["shards"]] for m in multi] == [
        [[0, 2, 2], [2, 4, 2]],
        [[4, 6, 2], [6, 8, 2]],
    ]
    assert len({s[0] for m in multi for s in m["shards"]}) == 4
    assert (single["local_rows"], single["global_rows"]) == (8, 8)
    assert [s[1:] for s in single["shards"]] == [[r, r + 2, 2] for r in range(0, 8, 2)]

    config = two_process_run_config()
    step_s, state_s = restore_final(single_dir, config)
    step_m, state_m = restore_final(multi_dir, config)
    assert step_s == step_m == TWO_PROCESS_QAT_STEPS == 6
    frozen = [
        sum(int(np.sum(s["frozen"])) for s in _oscillation_states(state["oscillation"]))
        for state in (state_s, state_m)
    ]
    assert frozen[0] == frozen[1] > 0, frozen  # freezing took part in both runs
    # The same program over the same four devices; only the all-reduce runs across
    # processes, which may add in another order: float32 rounding that six steps carry
    # into parameters and BN statistics (values up to ~1) at about 1e-7. Integer and boolean
    # tracking state (frozen, frozen_int, prev_dir) must agree exactly, as these enforce.
    for part in ("params", "batch_stats", "oscillation"):
        assert_trees_equal(state_s[part], state_m[part], atol=1e-6)
    # Range initialisation's MSE search losses are sums of up to ~400: the same rounding,
    # relative.
    assert_trees_equal(state_s["quant_stats"], state_m["quant_stats"], atol=1e-6, rtol=1e-6)
    # The optimizers' moments: relative rounding on values up to ~40 (Adam's second moments
    # of the scales), and absolute on a scale's gradient, a sum of thousands of terms of
    # ~1 that largely cancel (the classifier's weight scale: ~0.013, seen off by 1.5e-5).
    assert_trees_equal(state_s["opt_state"], state_m["opt_state"], atol=1e-4, rtol=1e-5)
    losses = [_step_losses(workdir) for workdir in (single_dir, multi_dir)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, 7))
    np.testing.assert_allclose(
        [v for _, v in losses[1]], [v for _, v in losses[0]], rtol=1e-6, err_msg="qat/loss"
    )
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
