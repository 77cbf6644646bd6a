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


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``--dry-run`` as a user runs it: a fresh process, no bundle, no network."""
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", f"--out={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / check.JSON_FILE, encoding="utf-8") as f:
        data = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert sorted(os.listdir(out / "runs")) == sorted(
        f"{name}.jsonl" for name in data["effects"]["results"]
    )
    return data, (out / check.MARKDOWN_FILE).read_text(encoding="utf-8"), done.stdout


@pytest.mark.slow
def test_dry_run_measures_every_part(dry_run):
    data, _, stdout = dry_run
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
    assert qat["vs_fp"] == pytest.approx(fp["median_step_s"] / qat["median_step_s"])
    assert [t["met"] for t in speed["targets"]] == [None] * 3  # batch 256 is not in a dry run

    effects = data["effects"]
    assert not effects["skipped"] and not effects["errors"]
    assert list(effects["results"]) == [r.name for r in check.plan(check.DRY_EFFECTS)]
    per_epoch = 4  # four synthetic training batches
    for name, r in effects["results"].items():
        assert 0.0 <= r["float"] <= 100.0 and r["wall_s"] > 0
        if r["run"]["kind"] == "float":
            assert r["float_step_ms"] > 0
            continue
        assert r["steps"] == per_epoch * check.DRY_EFFECTS.qat_epochs, name
        assert 0.0 <= r["pre_bn"] <= 100.0 and 0.0 <= r["post_bn"] <= 100.0
        assert r["qat_step_ms"] > 0 and r["bn_mean_shift/dw"] >= 0.0
        for key in ("osc_end/depthwise", "frozen_end/pointwise", "osc_active_end/all"):
            assert 0.0 <= r[key] <= 1.0, (name, key)
    settings = effects["settings"]
    assert settings["ema_momentum"] == 0.001 and settings["freeze_threshold"] == [0.1, 0.005]
    assert "[speed 2/2] mobilenet_v2 freeze+dampen" in stdout
    assert "[effects 5/5] bn_mobilenet_v2_w3_s0: top-1 pre-BN" in stdout


@pytest.mark.slow
def test_dry_run_report_has_the_tables(dry_run):
    _, text, _ = dry_run
    assert "**Dry run at toy sizes**" in text
    for header in (
        "| Model | Dtype | Batch | Variant | img/s |",
        "| Target | Goal | Measured |",
        "| Bits | Method | Seeds | Pre-BN top-1 (%) | Post-BN top-1 (%) |",
        "| Model | Seeds | Float top-1 (%) | Pre-BN top-1 (%) |",
        "| Run | Wall s | Float step ms | QAT step ms |",
    ):
        assert header in text, header
    assert "| W3A3 | LSQ + freezing | 1 |" in text and "| mobilenet_v2 | 1 |" in text


@pytest.mark.slow
def test_write_docs_copies_the_json_and_replaces_its_own_section(dry_run, tmp_path):
    data, _, _ = dry_run
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
    data, _, _ = dry_run
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
        (["--out=x", "--fashion-npm=/nonexistent.tgz"], "--fashion-npm=/nonexistent.tgz does"),
        (["--write-docs=/nonexistent.json"], "--write-docs=/nonexistent.json does not exist"),
        (["--out=x"], "the effects part needs Fashion-MNIST"),
    ],
)
def test_bad_arguments_stop_with_one_sentence(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached or tfds-prepared Fashion-MNIST
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        check.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and error.count(". ") == 0, error


def test_a_zero_budget_skips_everything_without_compiling():
    speed = {"records": [], "skipped": [], "errors": {}}
    check.run_speed(check.DRY_SPEED, 0.0, speed, save=lambda: None)
    assert speed["skipped"] == [c.name for c in check.DRY_SPEED.cases] and not speed["records"]
    effects = {"results": {}, "skipped": [], "errors": {}}
    check.run_effects(check.DRY_EFFECTS, {}, "/nonexistent", 0.0, effects, save=lambda: None)
    assert effects["skipped"] == [r.name for r in check.plan(check.DRY_EFFECTS)]


def test_the_study_uses_the_papers_oscillation_settings_and_one_float_model():
    runs = {r.name: r for r in check.plan(check.EFFECTS)}
    assert list(runs) == [
        "float_mobilenet_v2",
        *(f"w3a3_{m}_s0" for m in ("lsq", "damp", "freeze")),
        "bn_mobilenet_v2_w3_s0",
        *(f"w3a3_{m}_s1" for m in ("lsq", "damp", "freeze")),
        "float_resnet18",
        "bn_resnet18_w3_s0",
    ]

    def config(name):
        return check.run_config(check.EFFECTS, runs[name], {"cache_dir": "/b"}, "/f.npz")

    freeze, damp, lsq = config("w3a3_freeze_s1"), config("w3a3_damp_s0"), config("w3a3_lsq_s0")
    assert freeze.osc_freeze.ema_momentum == lsq.osc_freeze.ema_momentum == 0.001
    assert (freeze.osc_freeze.threshold, freeze.osc_freeze.threshold_final) == (0.1, 0.005)
    assert freeze.osc_freeze.threshold_final == freeze.train.osc_level
    assert (damp.osc_damp.weight, damp.osc_damp.weight_final) == (0.0, 0.1)
    assert lsq.osc_damp.weight is None and lsq.osc_freeze.threshold == 0.0
    assert freeze.seed == 1 and freeze.model.pretrained == "/f.npz"
    assert freeze.data.cache_dir == "/b" and freeze.data.name == "fashion_mnist"
    assert freeze.train.epochs * (60_000 // check.EFFECTS.batch_size) >= 1800
    float_run = config("float_mobilenet_v2")
    assert float_run.float_train.save_weights == "/f.npz" and not float_run.model.pretrained
    assert float_run.train.stop_at_step == 1 and float_run.float_train.epochs == 10
    bn = config("bn_resnet18_w3_s0")
    assert bn.model.name == "resnet18" and not bn.quant.quantize_activations


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
