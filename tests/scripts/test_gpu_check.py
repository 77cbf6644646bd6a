"""The GPU check (benchmarks/gpu_check.py): its dry run end to end, the docs it writes, its
errors, its budgets, and installing from a bundle (benchmarks/gpu_bundle.py)."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from testkit import ROOT, load_script

check = load_script("benchmarks/gpu_check.py", "gpu_check_script")
bundle = check.gpu_bundle
study = check.effects_gpu


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, compile_cache_dir):
    """``--dry-run`` as a user runs it: a fresh process, no bundle, no network."""
    out = tmp_path_factory.mktemp("gpu_check")
    workdir = tmp_path_factory.mktemp("gpu_check_work")
    if compile_cache_dir:
        # The command compiles into <workdir>/xla_cache, new for every command; there, the
        # suite's cache serves the programs it shares with the suite's other runs of the tiny
        # models and with the previous runs of the suite, instead of compiling them all in
        # every run (about 100 s on two cores).
        os.symlink(compile_cache_dir, workdir / "xla_cache")
    command = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--dry-run",
        f"--out={out}",
        f"--workdir={workdir}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / check.JSON_FILE, encoding="utf-8") as f:
        data = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert sorted(os.listdir(out / "runs")) == sorted(
        f"{name.replace('/', '__')}.jsonl" for name in data["effects"]["results"]
    )
    text = (out / check.MARKDOWN_FILE).read_text(encoding="utf-8")
    return data, text, done.stdout, workdir


@pytest.mark.slow
def test_dry_run_measures_every_part(dry_run):
    data, _, stdout, _ = dry_run
    assert data["meta"]["dry_run"] and data["meta"]["total_s"] > 0
    speed = data["speed"]
    assert not speed["skipped"] and not speed["errors"]
    assert [(r["model"], r["variant"]) for r in speed["records"]] == [
        (c.model, c.variant) for c in check.DRY_SPEED.cases
    ]
    fp, qat = speed["records"]
    for r in speed["records"]:
        assert r["compiles"] == 1 and r["steps"] == check.DRY_SPEED.steps
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_step_s"])
        assert r["compile_s"] > 0 and r["xla_bytes"] > 0 and r["peak_memory_bytes"] > 0
    assert fp["vs_fp"] == 1.0
    assert fp["round_ops"] == 0 < qat["round_ops"] and fp["conv_ops"] == qat["conv_ops"]
    assert qat["vs_fp"] == pytest.approx(fp["median_step_s"] / qat["median_step_s"])
    assert [t["met"] for t in speed["targets"]] == [None] * 3  # batch 256 is not in a dry run

    effects = data["effects"]
    assert not effects["skipped"] and not effects["errors"]
    plan = study.effects.plan(study.DRY)
    assert list(effects["results"]) == [r.folder for r in plan]
    assert effects["settings"]["runs"] == [r.folder for r in plan]
    per_epoch = 359 // 32  # the dry run's digits split: 359 training images
    for name, r in effects["results"].items():
        assert 0.0 <= r["float"] <= 100.0 and r["wall_s"] > 0 and r["step_ms"] > 0
        if r["run"]["kind"] == "float":
            assert len(r["float_loss_per_epoch"]) == study.DRY.float_epochs["mobilenet_v2"]
            continue
        assert r["steps"] == per_epoch * study.DRY.regimes[0].qat_epochs, name
        assert 0.0 <= r["pre_bn"] <= 100.0 and 0.0 <= r["post_bn"] <= 100.0
        assert [e["top1_pre_bn"] for e in r["curve"]][-1] == pytest.approx(r["pre_bn"])
        for key in ("osc_end/depthwise", "frozen_end/pointwise", "osc_active_end/all"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
    assert "[speed 2/2] mobilenet_v2 freeze+dampen" in stdout
    assert f"[effects {len(plan)}/{len(plan)}] dry/w3a3_freeze_s0: top-1 pre-BN" in stdout


@pytest.mark.slow
def test_dry_run_report_has_the_tables(dry_run):
    _, text, _, _ = dry_run
    assert "**Dry run at toy sizes**" in text
    for header in (
        "| Model | Dtype | Batch | Variant | img/s |",
        "| Target | Goal | Measured |",
        "| Model | Epochs | Top-1 (%) | Training loss, last five epochs |",
        "| Bits | Method | Seeds | Pre-BN top-1 (%) | Post-BN top-1 (%) |",
        "| Model | Seeds | Float top-1 (%) | Pre-BN end (%) |",
        "| Epoch | mobilenet_v2 | W3A3 LSQ | W3A3 LSQ + dampening | W3A3 LSQ + freezing |",
        "| Run | Wall (s) | Step (ms) |",
    ):
        assert header in text, header
    assert "| W3A3 | LSQ + freezing | 1 |" in text and "| mobilenet_v2 | 1 |" in text


@pytest.mark.slow
def test_the_study_script_reports_the_dry_runs_without_training_them_again(
    dry_run, tmp_path, monkeypatch
):
    """``demos/effects.py`` continuing the dry run's study: every run has its result, so none
    trains again, and the study's own report is written from them."""
    data, _, _, workdir = dry_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study.effects.trainer, "train_and_evaluate", no_training)
    out = tmp_path / "results.md"
    results = study.effects.run_study(study.DRY, str(workdir), str(out))
    assert list(results) == [r.folder for r in study.effects.plan(study.DRY)]
    assert results == json.loads(json.dumps(data["effects"]["results"]))
    text = out.read_text(encoding="utf-8")
    assert "| W3A3 | LSQ + freezing | 1 |" in text and "| dry | 1 epochs" in text
    assert os.path.getsize(tmp_path / "figures" / "results_bn_gap.png") > 1000


@pytest.mark.slow
def test_prediction_from_the_dry_runs_measured_steps(dry_run, tmp_path):
    _, _, _, workdir = dry_run
    out = tmp_path / "prediction"
    argv = ["--dry-run", f"--predict={workdir}", f"--out={out}", "--effects-budget-s=100"]
    assert check.main(argv) == 0
    text = (out / check.PREDICTION_FILE).read_text(encoding="utf-8")
    prediction = study.predict(study.DRY, str(workdir), 100.0)
    assert [r["run"] for r in prediction["rows"]] == [
        r.folder for r in study.effects.plan(study.DRY)
    ]
    assert f"{prediction['total_s'][1]:.0f} s (no gain from it) against a budget of 100 s" in text


@pytest.mark.slow
def test_write_docs_copies_the_json_and_replaces_its_own_section(dry_run, tmp_path):
    data, _, _, _ = dry_run
    data = dict(data, meta=dict(data["meta"], dry_run=False, date="2026-12-01T10:00:00+00:00"))
    source = tmp_path / "gpu_check.json"
    source.write_text(json.dumps(data), encoding="utf-8")
    docs = tmp_path / "results.md"
    docs.write_text("# Study\n\nSome text.\n", encoding="utf-8")
    results = tmp_path / "results"
    argv = [f"--write-docs={source}", f"--docs={docs}", f"--results-dir={results}"]
    for _ in range(2):  # the second time replaces the section of the same date
        assert check.main(argv) == 0
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# Study\n\nSome text.\n\n<!-- gpu-check 2026-12-01 -->\n")
    assert text.count("## GPU check: train-step speed and the effects study") == 1
    assert text.count("### Speed") == 1 and text.rstrip().endswith("<!-- /gpu-check 2026-12-01 -->")
    assert json.loads((results / "gpu-2026-12-01.json").read_text()) == data


@pytest.mark.slow
def test_write_docs_refuses_a_dry_run(dry_run, tmp_path):
    data, _, _, _ = dry_run
    source = tmp_path / "gpu_check.json"
    source.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="dry run"):
        check.write_docs(str(source), str(tmp_path / "r.md"), str(tmp_path))


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--out is required"),
        (["--out=x", "--parts=speed,train"], "--parts=speed,train is not valid"),
        (["--out=x", "--speed-budget-s=-1"], "--speed-budget-s must be at least 0"),
        (["--out=x", "--bundle=/nonexistent"], "holds no manifest.json"),
        (["--out=x", "--predict=/nonexistent"], "--predict=/nonexistent holds no runs folder"),
        (["--write-docs=/nonexistent.json"], "--write-docs=/nonexistent.json does not exist"),
        (["--out=x", "--parts=effects", "--no-sklearn"], "the effects part reads scikit-learn"),
    ],
)
def test_bad_arguments_stop_with_one_sentence(argv, message, capsys, monkeypatch, tmp_path):
    if "--no-sklearn" in argv:
        argv = [a for a in argv if a != "--no-sklearn"]
        monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # its import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        check.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and error.count(". ") == 0, error


def test_the_default_parts_without_scikit_learn_run_the_speed_part_alone(capsys, monkeypatch):
    # The one-call command on a device image without scikit-learn must still time the steps.
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # its import fails
    args, _ = check.parse_args(["--out=x"])
    assert args.parts == "speed"
    assert "effects part (digits) is skipped" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "sklearn.datasets")
    args, _ = check.parse_args(["--out=x"])  # negative control: with it, both parts run
    assert args.parts == ",".join(check.PARTS)


def test_a_zero_budget_skips_everything_without_compiling():
    speed = {"records": [], "skipped": [], "errors": {}}
    check.run_speed(check.DRY_SPEED, 0.0, speed, save=lambda: None)
    assert speed["skipped"] == [c.name for c in check.DRY_SPEED.cases] and not speed["records"]
    effects = {"results": {}, "skipped": [], "errors": {}}
    study.run(study.DRY, "/nonexistent", 0.0, effects, save=lambda: None)
    assert effects["skipped"] == [r.folder for r in study.effects.plan(study.DRY)]


def test_the_gpu_study_is_the_cpu_studys_main_regime_at_three_seeds():
    cpu, gpu = study.effects.FULL, study.GPU
    runs = study.effects.plan(gpu)
    assert [r.folder for r in runs[:8]] == [
        "float_mobilenet_v2",
        "constant/bn_mobilenet_v2_w3_s0",
        "float_resnet18",
        "constant/bn_resnet18_w3_s0",
        *(f"constant/w3a3_{m}_s0" for m in ("lsq", "damp", "freeze")),
        "constant/bn_mobilenet_v2_w3_s1",
    ]
    assert sorted({r.seed for r in runs if r.kind == "qat"}) == [0, 1, 2]
    assert {(r.bits, r.method) for r in runs if r.kind == "qat"} == {
        (3, m) for m in ("lsq", "damp", "freeze")
    }
    assert sum(r.kind == "bn" for r in runs) == 6 and gpu.float_epochs == cpu.float_epochs
    for r in runs:  # every GPU run is configured as its CPU namesake
        assert study.effects.run_config(gpu, r, "/f") == study.effects.run_config(cpu, r, "/f")
    assert study.effects.run_config(gpu, runs[1], "/f").train.steps_per_call > 1


def _cpu_results(directory, steps_ms: dict) -> None:
    """``result.json`` files as a CPU study writes them, with only what a prediction reads."""
    for folder, step in steps_ms.items():
        name = folder.split("/")[-1]
        kind, model, bits, method = (
            ("float", name.removeprefix("float_"), 3, "lsq")
            if name.startswith("float_")
            else ("bn", name[3:].split("_w3")[0], 3, "lsq")
            if name.startswith("bn_")
            else ("qat", "mobilenet_v2", int(name[1]), name.split("_")[1])
        )
        path = os.path.join(directory, "runs", folder)
        os.makedirs(path)
        run = {"kind": kind, "model": model, "bits": bits, "method": method, "seed": 0}
        with open(os.path.join(path, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"run": run, "step_ms": step}, f)


def test_prediction_adds_steps_and_programs_as_its_constants_say(tmp_path):
    steps = {
        "float_mobilenet_v2": 100.0,
        "float_resnet18": 400.0,
        "constant/bn_mobilenet_v2_w3_s0": 150.0,
        "constant/bn_mobilenet_v2_w3_s1": 250.0,  # the median of 150 and 250 is used
        "constant/bn_resnet18_w3_s0": 600.0,
        "constant/w3a3_lsq_s0": 200.0,
        "constant/w3a3_damp_s0": 300.0,
        "constant/w3a3_freeze_s0": 200.0,
    }
    _cpu_results(tmp_path, steps)
    prediction = study.predict(study.GPU, str(tmp_path), 360.0)
    rows = {r["run"]: r for r in prediction["rows"]}
    new = study.RUN_OVERHEAD_S + study.NEW_PROGRAM_S  # damp's step; lsq compiled its set-up
    programs = {f: r["new_programs"] for f, r in rows.items()}
    setup = study.PROGRAMS_PER_SETUP
    assert programs["float_mobilenet_v2"] == study.FLOAT_PROGRAMS + setup + 1
    assert programs["constant/bn_mobilenet_v2_w3_s0"] == 0  # the float run's QAT step
    assert programs["constant/w3a3_lsq_s0"] == setup + 1
    assert programs["constant/w3a3_freeze_s0"] == programs["constant/w3a3_damp_s0"] == 1
    assert sum(programs.values()) == 2 * (study.FLOAT_PROGRAMS + setup + 1) + setup + 3
    per_epoch = 1437 // 32
    qat_steps = per_epoch * study.effects.FULL.regimes[0].qat_epochs
    first, second = rows["constant/w3a3_damp_s0"], rows["constant/w3a3_damp_s1"]
    assert first["ratio_to_float"] == second["ratio_to_float"] == 3.0
    for step, i in ((study.FLOAT_STEP_MS_LAUNCH_BOUND, 0), (study.FLOAT_STEP_MS_MEASURED, 1)):
        assert first["seconds"][i] == pytest.approx(new + 1e-3 * qat_steps * 3.0 * step)
        assert second["seconds"][i] == pytest.approx(
            study.RUN_OVERHEAD_S + 1e-3 * qat_steps * 3.0 * step
        )
    assert rows["constant/bn_mobilenet_v2_w3_s2"]["ratio_to_float"] == 2.0
    assert rows["constant/bn_resnet18_w3_s1"]["ratio_to_float"] == 1.5
    float_rn = rows["float_resnet18"]
    assert float_rn["steps"] == per_epoch * study.GPU.float_epochs["resnet18"]
    assert float_rn["ratio_to_float"] == 1.0
    total = [sum(r["seconds"][i] for r in prediction["rows"]) for i in (0, 1)]
    assert prediction["total_s"] == pytest.approx(total)
    cumulative = [r["cumulative_s"][1] for r in prediction["rows"]]
    assert cumulative == sorted(cumulative)
    assert [r["fits"][1] for r in prediction["rows"]] == [c <= 360.0 for c in cumulative]
    assert not any(r["ratio_assumed"] for r in prediction["rows"])
    # Without ResNet-18's float step its BN runs take the MobileNetV2's ratio, said so.
    (tmp_path / "runs" / "float_resnet18" / "result.json").unlink()
    rows = {r["run"]: r for r in study.predict(study.GPU, str(tmp_path), 360.0)["rows"]}
    resnet = rows["constant/bn_resnet18_w3_s0"]
    assert resnet["ratio_to_float"] == 2.0 and resnet["ratio_assumed"]
    assert rows["float_resnet18"]["cpu_step_ms"] is None
    assert rows["float_resnet18"]["seconds"] == float_rn["seconds"]
    for name in (
        "float_mobilenet_v2",
        "constant/bn_mobilenet_v2_w3_s0",
        "constant/bn_mobilenet_v2_w3_s1",
    ):
        (tmp_path / "runs" / name / "result.json").unlink()
    with pytest.raises(ValueError, match="has no measured step of constant/bn_mobilenet_v2_w3_s0"):
        study.predict(study.GPU, str(tmp_path), 360.0)


def _wheel(directory, module: str) -> str:
    """A minimal pure-Python wheel of ``module``."""
    path = os.path.join(directory, f"{module}-1.0-py3-none-any.whl")
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return os.path.basename(path)


def test_a_bundle_installs_only_what_does_not_import(tmp_path, monkeypatch):
    module = "oscqat_bundle_probe"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = {"python": python, "wheels": {module: _wheel(tmp_path, module), "json": "x.whl"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert bundle.bundle_argument(["--dry-run", f"--bundle={tmp_path}", "--out=o"]) == str(tmp_path)
    assert bundle.install_missing(str(tmp_path)) == [module]  # json imports already
    assert __import__(module).VALUE == 42
    assert bundle.install_missing("") == []

    manifest["python"] = "2.7"
    manifest["wheels"] = {"oscqat_bundle_absent": "y.whl"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(RuntimeError, match="holds wheels for Python 2.7, this is Python"):
        bundle.install_missing(str(tmp_path))


def test_the_bundle_is_a_cache_folder_of_the_fashion_mnist_source():
    from oscqat_jax.training.data import fashion_mnist

    assert bundle.FASHION_MNIST_FILE == fashion_mnist.CACHE_FILE
