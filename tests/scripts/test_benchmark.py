"""The train-step benchmark (benchmarks/train_step.py) on a tiny MobileNetV2, in-process."""

import json

import numpy as np
import pytest
from testkit import TEST_BLOCKS, load_script

TINY_BLOCKS = TEST_BLOCKS


@pytest.mark.slow
def test_benchmark_times_each_variant_with_one_compilation(capsys):
    bench = load_script("benchmarks/train_step.py", "train_step_benchmark")
    argv = [
        "--variants=fp,freeze+dampen,rules,nnx",
        "--batch=4",
        "--resolution=16",
        "--num_classes=10",
        "--width=0.25",
        "--steps=3",
        "--warmup=1",
        "--fast_compile",
    ]
    records = bench.main(argv, overrides={"model.block_setting": TINY_BLOCKS})

    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert printed == records
    assert [r["variant"] for r in records] == ["fp", "freeze+dampen", "rules", "nnx"]
    for r in records:
        assert r["compiles"] == 1
        assert r["steps"] == 3
        assert r["batch"] == 4 and r["resolution"] == 16 and r["fast_compile"]
        assert 0 < r["min_step_s"] <= r["median_step_s"] <= r["max_step_s"]
        assert r["images_per_s"] == 4 / r["median_step_s"]
        assert r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_source"]
        assert r["xla_temp_bytes"] > 0
    fp, freeze_dampen, rules, nnx_case = records
    assert fp["round_ops"] == 0
    assert freeze_dampen["round_ops"] > 0 and freeze_dampen["conv_ops"] == fp["conv_ops"]
    # The plain model quantized by rules rounds as often and carries a state of the same
    # size as the package's model (the depth-wise convs may differ: the package slices on CPU).
    assert rules["round_ops"] == freeze_dampen["round_ops"]
    assert rules["xla_argument_bytes"] == freeze_dampen["xla_argument_bytes"]
    assert np.isfinite(rules["final_loss"])
    # The NNX model, quantized by the same rules and stepped through NNXForward, rounds as
    # often too and carries the rules case's train state (the same collections and sizes).
    assert nnx_case["round_ops"] == freeze_dampen["round_ops"]
    assert nnx_case["xla_argument_bytes"] == rules["xla_argument_bytes"]
    assert np.isfinite(nnx_case["final_loss"])


def test_variants_map_to_the_trainers_step_settings():
    bench = load_script("benchmarks/train_step.py", "train_step_benchmark")

    def settings(variant):
        config = bench.case_config(
            model="mobilenet_v2",
            variant=variant,
            resolution=32,
            batch_size=8,
            dtype="float32",
            num_classes=10,
        )
        osc = bench.build.qat_step_config(config).oscillations
        return osc.track, osc.dampen, config.osc_freeze.threshold, config.osc_damp.weight

    assert settings("lsq") == (False, False, 0.0, None)
    assert settings("freeze") == (True, False, 0.1, None)
    assert settings("dampen") == (False, True, 0.0, 0.01)
    assert settings("freeze+dampen") == (True, True, 0.1, 0.01)
    assert settings("rules") == settings("freeze+dampen")


def test_a_step_that_recompiles_is_reported(monkeypatch):
    bench = load_script("benchmarks/train_step.py", "train_step_benchmark")
    real_hparams_at = bench.step_lib.hparams_at

    def first_row_in_float16(table, step):
        row = real_hparams_at(table, step)
        return {k: v.astype(np.float16) for k, v in row.items()} if step == 0 else row

    # Hyper-parameters of another dtype in the first call: the second call compiles again.
    monkeypatch.setattr(bench.step_lib, "hparams_at", first_row_in_float16)
    argv = ["--variants=fp", "--batch=4", "--resolution=16", "--num_classes=10", "--width=0.25"]
    argv += ["--steps=2", "--warmup=0", "--fast_compile"]
    with pytest.raises(AssertionError, match="compiled 2 times"):
        bench.main(argv, overrides={"model.block_setting": TINY_BLOCKS})


@pytest.mark.slow
def test_dampening_rounds_no_weight_twice():
    bench = load_script("benchmarks/train_step.py", "train_step_benchmark")
    sharded = bench.step_lib.Sharded.over_all_devices(fast_compile=True)
    counts = {}
    for variant in ("lsq", "dampen"):
        config = bench.case_config(
            model="mobilenet_v2",
            variant=variant,
            resolution=16,
            batch_size=4,
            dtype="float32",
            num_classes=10,
            overrides={"model.width_multiplier": 0.25, "model.block_setting": TINY_BLOCKS},
        )
        train_step, state, batch, table = bench.build_case(config, variant, sharded, total=2)
        traced = train_step.trace(state, batch, bench.step_lib.hparams_at(table, 0))
        counts[variant] = bench.primitive_counts(traced.jaxpr.jaxpr)
    assert counts["dampen"]["round"] == counts["lsq"]["round"] > 0
    assert counts["dampen"]["conv_general_dilated"] == counts["lsq"]["conv_general_dilated"]
