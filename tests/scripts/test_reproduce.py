"""The small-scale study (demos/reproduce.py): its quick version end to end, and its pieces."""

import json
import os

import pytest
from testkit import load_script

demo = load_script("demos/reproduce.py", "reproduce_demo")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quick")
    out = str(workdir / "report" / "results.md")
    os.makedirs(os.path.dirname(out))
    results = demo.run_study(demo.QUICK, str(workdir / "runs"), out)
    return workdir, out, results


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_study_writes_the_table_and_figures(quick):
    workdir, out, results = quick
    text = open(out, encoding="utf-8").read()
    header, rule, *rows = table_rows(text, "Bits")
    assert header[:5] == ["Bits", "Method", "Seeds", "Pre-BN top-1 (%)", "Post-BN top-1 (%)"]
    assert "Frozen end dw / pw (%)" in header and "BN mean shift dw / other (σ)" in header
    assert len(rule) == len(header)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("W3A3", "LSQ", "1"),
        ("W3A3", "LSQ + freezing", "1"),
    ]
    for row in rows:
        assert len(row) == len(header)
        assert 50.0 < float(row[3]) <= 100.0 and 50.0 < float(row[4]) <= 100.0
    for name in ("results_oscillations.png", "results_accuracy.png", "results_curves.png"):
        path = os.path.join(os.path.dirname(out), "figures", name)
        assert os.path.getsize(path) > 1000
        assert f"figures/{name}" in text
    assert set(results) == {"float_mobilenet_v2", "w3a3_lsq_s0", "w3a3_freeze_s0"}
    assert os.path.isfile(str(workdir / "runs" / "runs" / "float_mobilenet_v2" / "float_model.npz"))
    assert "## What the numbers say" in text and "LSQ + freezing minus LSQ" in text


@pytest.mark.slow
def test_freezing_leaves_fewer_weights_oscillating_than_lsq(quick):
    """Counted among the weights still free to move: a frozen weight's frequency EMA decays
    over a few hundred steps after it stops, longer than the quick run lasts."""
    _, _, results = quick
    lsq, freeze = results["w3a3_lsq_s0"], results["w3a3_freeze_s0"]
    assert lsq["frozen_end/all"] == 0.0
    assert freeze["frozen_end/all"] > 0.01
    assert lsq["osc_peak/all"] > 0.02  # the phenomenon is there to begin with
    assert freeze["osc_active_end/all"] < 0.5 * lsq["osc_active_end/all"]
    # Both start from the same float model and see the same batches.
    assert lsq["float"] == freeze["float"]


@pytest.mark.slow
def test_a_run_result_is_the_trainers_final_evaluation(quick):
    workdir, _, results = quick
    run_dir = str(workdir / "runs" / "runs" / "w3a3_lsq_s0")
    final = demo.reports.evaluations(run_dir)[-1]
    history = demo.reports.oscillation_history(run_dir)
    result = results["w3a3_lsq_s0"]
    assert result["steps"] == final["step"] == history[-1]["step"] > 0
    assert (result["pre_bn"], result["post_bn"]) == (final["top1_pre_bn"], final["top1_post_bn"])
    for group, short in (("depthwise", "dw"), ("pointwise", "other")):
        assert result[f"bn_mean_shift/{short}"] == final[f"bn_mean_shift/{group}"] > 0
        assert result[f"osc_active_end/{group}"] == final[f"active/{group}"]
        assert result[f"osc_peak/{group}"] == max(r[f"oscillating/{group}"] for r in history)
    assert result["osc_end/all"] == history[-1]["oscillating"]


@pytest.mark.slow
def test_a_finished_study_is_skipped_and_its_report_rewritten(quick, monkeypatch):
    workdir, out, results = quick

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(demo.trainer, "train_and_evaluate", no_training)
    os.remove(out)
    again = demo.run_study(demo.QUICK, str(workdir / "runs"), out)
    assert again == json.loads(json.dumps(results))
    assert os.path.isfile(out)


def test_plan_runs_every_method_bit_width_and_seed_after_its_float_model():
    runs = demo.plan(demo.FULL)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    qat = [r for r in runs if r.kind == "qat"]
    assert {(r.bits, r.method, r.seed) for r in qat} == {
        (b, m, s) for b in (3, 4) for m in ("lsq", "damp", "freeze") for s in (0, 1, 2)
    }
    for model in ("mobilenet_v2", "resnet18"):
        first_use = min(i for i, r in enumerate(runs) if r.model == model and r.kind != "float")
        assert names.index(f"float_{model}") < first_use
    config = demo.run_config(demo.FULL, demo.Run("bn", "resnet18"), float_weights="f.npz")
    assert not config.quant.quantize_activations and config.model.block_setting is None
    assert config.data.train_subset == demo.FULL.qat_train_images
    assert config.model.pretrained == "f.npz" and not config.float_train.save_weights
    assert config.eval.bn_reestimate and config.eval.bn_batches == demo.FULL.bn_batches


def test_a_float_run_writes_the_weights_its_qat_runs_start_from():
    config = demo.run_config(demo.QUICK, demo.Run("float", "mobilenet_v2"), float_weights="f.npz")
    assert config.float_train.save_weights == "f.npz" and not config.model.pretrained
    assert config.float_train.epochs == 3 and config.train.stop_at_step == 1
    quick_model = load_script("configs/tiny.py", "tiny_quick_config").get_config("quick").model
    assert config.model.block_setting == quick_model.block_setting
    assert config.model.width_multiplier == quick_model.width_multiplier
