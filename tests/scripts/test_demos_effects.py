"""The effects study (demos/effects.py, effects_report.py, configs/effects.py): its recipe, its
plan, its statistics on results worked out by hand, and the study loop. Its tiny runs train
end to end in tests/scripts/test_gpu_check.py (the GPU check's dry run is this study's
``one_run`` over every kind of run at the quick version's tiny sizes)."""

import copy
import json
import os

import numpy as np
import pytest
from scipy import stats
from testkit import load_script

demo = load_script("demos/effects.py", "effects_demo")
import effects_report  # noqa: E402  (demos/ is on the path once effects.py is loaded)

recipe = demo.recipe


def test_recipe_arguments_and_their_refusal():
    c = recipe.get_config("resnet18_w3_lsq")
    assert c.model.name == "resnet18" and not c.quant.quantize_activations
    assert c.quant.n_bits == 3 and c.optimizer.lr == c.optimizer.lr_final == 0.01
    c = recipe.get_config("mobilenet_v2_w4a4_freeze")
    assert c.quant.quantize_activations and c.quant.n_bits_act == 4
    assert c.optimizer.lr == pytest.approx(0.0033) and c.osc_freeze.threshold == 0.05
    assert c.osc_freeze.threshold_final == 0.005 and c.osc_damp.weight is None
    damp = recipe.get_config("mobilenet_v2_w3a3_damp")
    assert (damp.osc_damp.weight, damp.osc_damp.weight_final) == (0.0, 0.1)
    assert damp.osc_freeze.threshold == 0.0 and damp.train.steps_per_call > 1
    for bad in ("mobilenet_v2_w3a4_lsq", "vgg_w3_lsq", "resnet18_w5_lsq", "resnet18_w3_x"):
        with pytest.raises(ValueError, match=f"effects argument '{bad}' is not valid"):
            recipe.get_config(bad)


def test_plan_runs_each_float_model_first_and_seeds_in_order():
    runs = demo.plan(demo.FULL)
    folders = [r.folder for r in runs]
    assert len(folders) == len(set(folders))
    first_use = {}
    for i, r in enumerate(runs):
        if r.kind == "float":
            first_use[r.model] = i
        else:
            assert r.model in first_use and first_use[r.model] < i, r.folder
    main = demo.FULL.regimes[0]
    assert main.lr_schedule == "constant" and len(main.bn_seeds) >= 5
    assert len(main.method_seeds[3]) >= 5
    for model in ("mobilenet_v2", "resnet18"):  # seed by seed: a cut study has whole seeds
        seeds = [r.seed for r in runs if r.model == model and r.bits == 3 and r.seed < 100]
        assert seeds == sorted(seeds) and len(set(seeds)) == 5, model
    last_mobilenet = max(i for i, r in enumerate(runs) if r.model == "mobilenet_v2" and r.bits == 3)
    assert all(r.model == "mobilenet_v2" for r in runs[: last_mobilenet + 1])  # mobilenet_first
    mixed = demo.plan(demo.dataclasses.replace(demo.FULL, mobilenet_first=False))
    assert sorted(r.folder for r in mixed) == sorted(folders)
    assert [r.folder for r in mixed][2:4] == ["float_resnet18", "constant/bn_resnet18_w3_s0"]
    w3 = [r for r in runs if r.regime == main.name and r.kind == "qat" and r.bits == 3]
    assert len(w3) == 3 * len(main.method_seeds[3])


def test_run_configs_follow_the_regime():
    main = demo.FULL.regimes[0]
    cosine = next(r for r in demo.FULL.regimes if r.lr_schedule == "cosine")
    w3a3 = next(r for r in demo.FULL.regimes if r.bn_acts)
    bn = demo.run_config(demo.FULL, demo.Run(main.name, "bn", "resnet18", 3, "lsq", 2), "/f.npz")
    assert bn.seed == 2 and bn.model.pretrained == "/f.npz" and bn.float_train.epochs == 0
    assert not bn.quant.quantize_activations and bn.optimizer.lr_final == bn.optimizer.lr
    assert bn.train.epochs == main.qat_epochs and bn.eval.every_epochs == 1
    act = demo.Run(w3a3.name, "bn", "resnet18", 3, "lsq", 1, acts=True)
    assert act.folder == f"{w3a3.name}/bn_resnet18_w3a3_s1"
    act = demo.run_config(demo.FULL, act, "/f.npz")
    assert act.quant.quantize_activations and act.quant.n_bits_act == 3
    partner = demo.run_config(demo.FULL, demo.Run(main.name, "qat", "mobilenet_v2", 3), "/f.npz")
    assert w3a3.bn_mobilenet_from == main.name and partner.quant.quantize_activations
    assert act.train.epochs == partner.train.epochs and act.optimizer == partner.optimizer
    cos = demo.run_config(demo.FULL, demo.Run(cosine.name, "bn", "resnet18", 3, "lsq", 100), "")
    assert cos.optimizer.lr_final == 0.0 and cos.optimizer.lr == 0.01
    fl = demo.run_config(demo.FULL, demo.Run("float", "float", "mobilenet_v2"), "/f.npz")
    assert fl.float_train.save_weights == "/f.npz" and not fl.model.pretrained
    assert fl.float_train.epochs == demo.FULL.float_epochs["mobilenet_v2"]
    assert fl.train.stop_at_step == 1
    assert demo.steps_per_epoch(fl) == 1437 // 32


def _curve(pre: list[float], post: list[float]) -> list[dict]:
    return [
        {"step": 10 * (i + 1), "top1_pre_bn": a, "top1_post_bn": b}
        for i, (a, b) in enumerate(zip(pre, post, strict=True))
    ]


def _result(kind, model, seed, pre, post, bits=3, method="lsq"):
    return {
        "run": {"kind": kind, "model": model, "bits": bits, "method": method, "seed": seed},
        "regime": "constant",
        "float": 95.0,
        "pre_bn": pre[-1],
        "post_bn": post[-1],
        "curve": _curve(pre, post),
        "wall_s": 1.0,
    }


def test_bn_findings_are_the_hand_computed_paired_intervals():
    gaps = {"mobilenet_v2": [4.0, 6.0, 5.0], "resnet18": [0.0, 1.0, -1.0]}
    results = {}
    for model, gs in gaps.items():
        for seed, g in enumerate(gs):
            results[f"{model}{seed}"] = _result("bn", model, seed, [80.0, 80.0], [81.0, 80.0 + g])
    lines = effects_report.bn_findings(results)
    half = stats.t.ppf(0.975, 2) * np.std([4.0, 6.0, 5.0], ddof=1) / np.sqrt(3)
    assert f"at the end +5.00 points (95 % interval {5 - half:+.2f} to {5 + half:+.2f}" in lines[0]
    # over the run: the mean of (1, g) per seed, i.e. 2.5, 3.5, 3.0
    assert "averaged over the run's evaluations +3.00 points" in lines[0]
    assert "a difference" in lines[0]
    assert "ResNet-18" in lines[1] and "at the end +0.00 points" in lines[1]
    assert "no difference shown" in lines[1]
    diff = 5.0 - 0.0
    se = np.sqrt(np.var([4, 6, 5], ddof=1) / 3 + np.var([0, 1, -1], ddof=1) / 3)
    half = stats.t.ppf(0.975, 2) * se
    assert f"at the end +{diff:.2f} points (95 % interval {diff - half:+.2f}" in lines[2]


def test_epoch_table_and_method_findings_pair_by_seed():
    lsq = [_result("qat", "mobilenet_v2", s, [70.0, 70.0], [75.0, 72.0]) for s in (0, 1)]
    freeze = [
        _result("qat", "mobilenet_v2", s, [71.0, 72.0 + s], [74.0, 73.0 + s], method="freeze")
        for s in (0, 1)
    ]
    rows = effects_report.epoch_lines({"LSQ": lsq, "freeze": freeze})
    assert rows[2] == "| 1 | 5.00 ± 0.00 | 3.00 ± 0.00 |"
    assert rows[3] == "| 2 | 2.00 ± 0.00 | 1.00 ± 0.00 |"
    keys = ("osc_end/all", "osc_active_end/all", "osc_peak/all", "bn_mean_shift/dw")
    keys += ("osc_peak/depthwise", "osc_peak/pointwise", "frozen_end/all")
    qat = {}
    for r in lsq + freeze:
        r = copy.deepcopy(r)
        r.update({k: 0.01 for k in keys})
        qat[f"{r['run']['method']}{r['run']['seed']}"] = r
    lines = effects_report.method_findings(qat)
    extra = next(line for line in lines if "pre-BN accuracy at the end" in line)
    # pre-BN end: freeze 72, 73 against LSQ 70, 70 -> +2.5; gap over the run: 2.0 vs 3.5
    assert "pre-BN accuracy at the end +2.50 points" in extra
    assert "post- minus pre-BN averaged over the run -1.50 points" in extra


def test_report_of_fabricated_results_has_every_section(tmp_path):
    results = {
        "float_mobilenet_v2": {
            "run": {
                "kind": "float",
                "model": "mobilenet_v2",
                "bits": 3,
                "method": "lsq",
                "seed": 0,
            },
            "regime": "float",
            "float": 95.0,
            "float_loss_per_epoch": [1.0, 0.5, 0.2],
            "step_ms": 50.0,
            "wall_s": 10.0,
            "load_1min": [1.0, 2.0],
        }
    }
    for seed in (0, 1):
        for model in ("mobilenet_v2", "resnet18"):
            r = _result("bn", model, seed, [80.0, 81.0], [85.0, 86.0 + seed])
            r.update({"osc_end/all": 0.02, "bn_mean_shift/dw": 0.1, "bn_mean_shift/other": 0.05})
            results[f"constant/bn_{model}_w3_s{seed}"] = r
    out = tmp_path / "results.md"
    out.write_text("old study\n<!-- gpu-check 2026-11-30 -->\nGPU text\n", encoding="utf-8")
    effects_report.write(demo.FULL, results, str(out), str(tmp_path), demo)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# The paper's three effects")
    assert "old study" not in text and text.rstrip().endswith("GPU text")
    assert "| constant | 6 epochs, lr constant |" in text
    assert "| 4 / " in text  # four of the planned QAT runs of the main regime are done
    assert "| cosine | 6 epochs, lr cosine to 0 |" in text and "| 0 / 2 |" in text
    assert "### Regime cosine: no run finished" in text
    assert "| mobilenet_v2 | 3 | 95.00 | 1.000, 0.500, 0.200 | 50 | 10 |" in text
    assert "Stopped before a result" in text
    missing = len(demo.plan(demo.FULL)) - len(results)
    not_run = text.split(f"{missing} planned runs have no result yet", 1)[1].split("\n")[0]
    assert "`float_resnet18`" in not_run and "`float_mobilenet_v2`" not in not_run
    assert os.path.getsize(tmp_path / "figures" / "results_bn_gap.png") > 1000


def test_run_study_runs_the_plan_in_order_and_rewrites_the_report_after_each_run(
    tmp_path, monkeypatch
):
    # The runs themselves train in tests/scripts/test_gpu_check.py: its dry run trains every
    # kind of run of this study's tiny configs through one_run, and reports them again through
    # run_study without training.
    trained, reported = [], []

    def one_run(settings, run, workdir):
        assert settings is demo.QUICK and workdir == str(tmp_path)
        trained.append(run.folder)
        return {"run": {"kind": run.kind}}

    monkeypatch.setattr(demo, "one_run", one_run)
    monkeypatch.setattr(demo, "write_report", lambda s, r, out, w: reported.append(list(r)))
    results = demo.run_study(demo.QUICK, str(tmp_path), str(tmp_path / "results.md"))
    folders = [r.folder for r in demo.plan(demo.QUICK)]
    assert trained == list(results) == folders
    assert reported == [folders[: i + 1] for i in range(len(folders))]


def _write_metrics(run_dir, rows: list[dict]) -> str:
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(run_dir)


def test_a_runs_losses_per_epoch_curve_and_step_time_come_from_its_metrics(tmp_path):
    # Three float epochs of 4 steps logged every 2 steps, 1 s a step; three QAT epochs of 4
    # steps, 2 s a step, each evaluated before and after BN re-estimation.
    rows = [{"step": s, "time": 10.0 + s, "float/loss": float(s)} for s in range(2, 13, 2)]
    rows += [{"step": s, "time": 30.0 + 2 * s, "qat/loss": 1.0} for s in range(2, 13, 2)]
    evals = [
        {
            "step": 4 * e,
            "time": 31.0 + 8 * e,
            "eval/top1_pre_bn": 50.0 + e,
            "eval/top1_post_bn": 60.0 + e,
            "eval/top5_pre_bn": 99.0,
            "eval/bn_mean_shift/depthwise": 0.1 * e,
        }
        for e in (1, 2, 3)
    ]
    run_dir = _write_metrics(tmp_path / "run", rows + evals)
    assert demo.float_losses(run_dir, 3) == [3.0, 7.0, 11.0]  # steps (2, 4), (6, 8), (10, 12)
    assert demo.step_ms(run_dir, "float") == pytest.approx(1000.0)
    assert demo.step_ms(run_dir, "qat") == pytest.approx(2000.0)
    assert demo.curve(run_dir) == [
        {
            "step": 4 * e,
            "top1_pre_bn": 50.0 + e,
            "top1_post_bn": 60.0 + e,
            "bn_mean_shift/depthwise": 0.1 * e,
        }
        for e in (1, 2, 3)
    ]
    one_record = _write_metrics(tmp_path / "short", rows[:1])
    assert demo.step_ms(one_record, "float") is None


def test_bn_rows_of_a_w3a3_regime_take_the_partners_lsq_runs():
    w3a3 = next(r for r in demo.FULL.regimes if r.bn_acts)
    partner = w3a3.bn_mobilenet_from
    results = {
        f"{partner}/w{b}a{b}_{m}_s0": dict(
            _result("qat", "mobilenet_v2", 0, [1.0], [2.0], bits=b, method=m), regime=partner
        )
        for m in ("lsq", "freeze")
        for b in (3, 4)
    }
    results["x/bn"] = dict(_result("bn", "resnet18", 0, [1.0], [1.0]), regime=w3a3.name)
    results["y/bn"] = dict(_result("bn", "mobilenet_v2", 0, [1.0], [1.0]), regime=partner)
    assert sorted(effects_report.bn_of(results, w3a3)) == sorted([f"{partner}/w3a3_lsq_s0", "x/bn"])
    assert sorted(effects_report.bn_of(results, demo.FULL.regimes[0])) == ["y/bn"]
