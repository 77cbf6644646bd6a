"""The effects part of ``benchmarks/gpu_check.py``: ``demos/effects.py``'s study in one device call.

The GPU study is the CPU study's main regime (``configs/effects.py``: digits, float models
to their plateau, constant paper learning rate, evaluation before and after BN
re-estimation every epoch) with three seeds: W3A3 LSQ, dampening and freezing of the
MobileNetV2 and the weight-only 3-bit BN study of MobileNetV2 and ResNet-18, run in
``effects.plan``'s order (seed by seed), so a budget that runs out cuts whole seeds.

``predict`` sizes the call before a device is lent: it reads the step costs that a CPU run
of ``demos/effects.py`` measured and states, run by run, how long the GPU study should
take under the assumptions written beside its constants.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import effects  # noqa: E402
import effects_report  # noqa: E402
import reproduce  # noqa: E402

from oscqat_jax.training import metrics  # noqa: E402

MAIN = effects.FULL.regimes[0]
GPU = effects.Settings(
    float_epochs=dict(effects.FULL.float_epochs),
    regimes=(
        dataclasses.replace(
            MAIN, bn_seeds=(0, 1, 2), method_bits=(3,), method_seeds={3: (0, 1, 2)}
        ),
    ),
)
DRY = effects.Settings(
    float_epochs={effects.MNV2: 1},
    regimes=(
        effects.Regime(
            "dry",
            "toy sizes for the CPU dry run",
            qat_epochs=1,
            lr_schedule="constant",
            bn_models=(effects.MNV2,),
            bn_seeds=(0,),
            method_bits=(3,),
            method_seeds={3: (0,)},
        ),
    ),
    tiny=True,
)


def _fits(started: float, walls: list[float], budget_s: float) -> bool:
    """Whether one more run, expected to take the median of ``walls``, ends in the budget."""
    expected = statistics.median(walls) if walls else 0.0
    return time.perf_counter() - started + expected <= budget_s


def settings_record(settings: effects.Settings) -> dict:
    """What the report states about the study, for the JSON."""
    return {
        "float_epochs": settings.float_epochs,
        "regimes": [
            {
                **dataclasses.asdict(r),
                "method_seeds": {str(b): s for b, s in r.method_seeds.items()},
            }
            for r in settings.regimes
        ],
        "tiny": settings.tiny,
        "runs": [r.folder for r in effects.plan(settings)],
    }


def run(settings, workdir: str, budget_s: float, part: dict, save, metrics_dir: str = ""):
    """Runs every run of ``effects.plan(settings)`` that fits in ``budget_s`` into ``part``
    (``results``, ``skipped``, ``errors``), calling ``save()`` after each; a run's
    ``metrics.jsonl`` is copied to ``<metrics_dir>/<folder with / as __>.jsonl``."""
    runs = effects.plan(settings)
    started, walls = time.perf_counter(), []
    for number, r in enumerate(runs, 1):
        label = f"[effects {number}/{len(runs)}] {r.folder}"
        float_weights = os.path.join(workdir, "runs", f"float_{r.model}", "float_model.npz")
        if r.kind != "float" and not os.path.isfile(float_weights):
            part["skipped"].append(r.folder)
            print(f"{label}: skipped (no float model of {r.model})", flush=True)
            continue
        if not _fits(started, walls, budget_s):
            part["skipped"].append(r.folder)
            print(f"{label}: skipped (effects budget of {budget_s:.0f} s)", flush=True)
            continue
        print(f"{label} ...", flush=True)
        try:
            result = effects.one_run(settings, r, workdir)
        except Exception as error:  # noqa: BLE001  (one failed run must not end the study)
            text = str(error).strip().splitlines()
            part["errors"][r.folder] = f"{type(error).__name__}: {text[0] if text else ''}"
            print(f"{label}: FAILED: {part['errors'][r.folder]}", flush=True)
            save()
            continue
        if metrics_dir:
            os.makedirs(metrics_dir, exist_ok=True)
            shutil.copyfile(
                os.path.join(workdir, "runs", r.folder, metrics.METRICS_FILE),
                os.path.join(metrics_dir, r.folder.replace("/", "__") + ".jsonl"),
            )
        walls.append(result["wall_s"])
        part["results"][r.folder] = result
        accuracy = (
            f"float top-1 {result['float']:.2f} %"
            if r.kind == "float"
            else f"top-1 pre-BN {result['pre_bn']:.2f} %, post-BN {result['post_bn']:.2f} %"
        )
        print(f"{label}: {accuracy}, {result['wall_s']:.0f} s", flush=True)
        save()


def lines(part: dict) -> list[str]:
    """The effects section of the GPU check's report: ``demos/effects.py``'s tables."""
    results = part["results"]
    regimes = {r["regime"] for r in results.values()} - {"float"}
    out = [
        "The main regime of `demos/effects.py` (`configs/effects.py`); runs: "
        + ", ".join(f"`{f}`" for f in part["settings"]["runs"])
        + ".",
        "",
        *effects_report.float_lines(results),
        "",
    ]
    for regime in sorted(regimes):
        of = effects_report._of(results, regime)
        qat, bn = effects_report._of(of, regime, "qat"), effects_report._of(of, regime, "bn")
        out += [*reproduce.qat_table(qat), "", *effects_report.bn_lines(bn), ""]
        columns = {
            m: [r for r in bn.values() if r["run"]["model"] == m]
            for m in effects_report.MODEL_NAMES
        }
        columns.update(
            {
                f"W{b}A{b} {reproduce.METHODS[m]}": rs
                for (b, m), rs in reproduce._group(qat, "qat").items()
            }
        )
        out += [*effects_report.epoch_lines(columns), ""]
        out += [*effects_report.bn_findings(bn), *effects_report.method_findings(qat), ""]
    return out + effects_report.runs_lines(results)


# --------------------------------------------------------------------------- prediction

# A float training step of the width-0.5 MobileNetV2 (Fashion-MNIST 32x32, batch 128, one
# step per call) measured on an H200: benchmarks/results/gpu-2026-11-30.json. Taken as the
# cost of a float step at the study's smaller sizes too: at these sizes a step is bound by
# kernel launches, dispatch and host input, not arithmetic (benchmarks/NOTES.md), so the
# upper bound assumes the fast path gains nothing.
FLOAT_STEP_MS_MEASURED = 14.9
# The lower bound: NOTES' estimate of the launch-bound float step (2,271 operations in the
# compiled step at 1.5-2 us each), what is left when the fast path removes dispatch and input.
FLOAT_STEP_MS_LAUNCH_BOUND = 4.0
# A new train-step program, warm backend: trace + lower 4.3 s and XLA compile 21.3 s measured
# for the MobileNetV2 freeze+dampen step on the H200 (the same JSON, its second case).
NEW_PROGRAM_S = 25.6
# Programs that a quantized set-up (model, weight and activation bits) compiles once, whatever
# the method: range initialisation, the evaluation before and after BN re-estimation, BN
# re-estimation; counted at NEW_PROGRAM_S each. A method's train step is one more program. A
# float run compiles its float step and evaluation, and ends with one weight-only QAT step,
# which compiles that set-up and the LSQ step its BN-study runs then share (the H200's float
# run: 199 s, of which 4,690 steps at 14.9 ms are 70 s, leaves 129 s for about five programs).
PROGRAMS_PER_SETUP = 3
FLOAT_PROGRAMS = 2
# Every run, all programs cached: trace + lower of its four programs (4.3 s each, measured)
# and loading them from the persistent cache.
RUN_OVERHEAD_S = 4 * 4.3
H100_FACTOR = 1.0  # the H200's numbers taken for the H100 (same chip, slower memory)


def _mode(r) -> tuple:
    """Runs of one mode share every compiled program (seeds change only data)."""
    return (r.kind, r.model, r.bits, r.method, r.acts)


def _new_programs(r, seen: set) -> int:
    """Programs ``r`` compiles that no run before it did (``seen``: the keys compiled so far,
    updated): its set-up's, its train step's, and for a float run its float programs and the
    weight-only LSQ set-up and step of its one QAT step."""
    quantized = r.kind == "qat" or r.acts
    setup = ("setup", r.model, r.bits, quantized)
    step = ("step", r.model, r.bits, quantized, r.method)
    keys = {setup: PROGRAMS_PER_SETUP, step: 1}
    if r.kind == "float":
        keys = {("float", r.model): FLOAT_PROGRAMS, **keys}
    new = sum(n for key, n in keys.items() if key not in seen)
    seen.update(keys)
    return new


def cpu_step_costs(cpu_workdir: str) -> dict[tuple, float]:
    """Median milliseconds per step measured by a CPU ``demos/effects.py`` study, per mode."""
    costs = {}
    for path in glob.glob(os.path.join(cpu_workdir, "runs", "**", "result.json"), recursive=True):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if result.get("step_ms") is None:
            continue
        run = result["run"]
        mode = (run["kind"], run["model"], run["bits"], run["method"], result.get("acts", False))
        costs.setdefault(mode, []).append(result["step_ms"])
    return {mode: statistics.median(v) for mode, v in costs.items()}


def _ratio(costs: dict, mode: tuple) -> tuple[float | None, float | None, bool]:
    """(CPU step of ``mode``, its ratio to the float step of its model, whether that ratio
    is the MobileNetV2's of the same kind because this model's steps were not measured)."""
    kind, model, *rest = mode
    if kind == "float":
        return costs.get(mode), 1.0, False
    cpu, float_cpu = costs.get(mode), costs.get(("float", model, 3, "lsq", False))
    if cpu is not None and float_cpu is not None:
        return cpu, cpu / float_cpu, False
    mobilenet = costs.get((kind, effects.MNV2, *rest))
    mobilenet_float = costs.get(("float", effects.MNV2, 3, "lsq", False))
    if model != effects.MNV2 and mobilenet is not None and mobilenet_float is not None:
        return cpu, mobilenet / mobilenet_float, True
    return cpu, None, False


def predict(settings: effects.Settings, cpu_workdir: str, budget_s: float) -> dict:
    """Predicted GPU seconds of every run of ``settings`` (low and high), from the CPU step
    costs of ``cpu_workdir``: a GPU step costs a float step (FLOAT_STEP_MS_*) times the
    CPU's ratio of this mode's step to the float step of the same model (more quantizer
    and tracking kernels cost more launches); a run adds RUN_OVERHEAD_S and NEW_PROGRAM_S
    for each program no run before it compiled."""
    costs = cpu_step_costs(cpu_workdir)
    rows, seen, totals = [], set(), [0.0, 0.0]
    for r in effects.plan(settings):
        config = effects.run_config(settings, r, "")
        epochs = config.float_train.epochs if r.kind == "float" else config.train.epochs
        steps = epochs * effects.steps_per_epoch(config)
        cpu, ratio, assumed = _ratio(costs, _mode(r))
        if ratio is None:
            raise ValueError(
                f"{cpu_workdir} has no measured step of {r.folder} (nor of the MobileNetV2's "
                "run of its kind): give the workdir of a `python demos/effects.py` run that "
                "has finished such runs."
            )
        new = _new_programs(r, seen)
        fixed = RUN_OVERHEAD_S + NEW_PROGRAM_S * new
        seconds = [
            H100_FACTOR * (fixed + 1e-3 * steps * step * ratio)
            for step in (FLOAT_STEP_MS_LAUNCH_BOUND, FLOAT_STEP_MS_MEASURED)
        ]
        totals = [t + s for t, s in zip(totals, seconds, strict=True)]
        rows.append(
            {
                "run": r.folder,
                "steps": steps,
                "cpu_step_ms": cpu,
                "ratio_to_float": ratio,
                "ratio_assumed": assumed,
                "new_programs": new,
                "seconds": seconds,
                "cumulative_s": list(totals),
                "fits": [t <= budget_s for t in totals],
            }
        )
    return {"rows": rows, "total_s": totals, "budget_s": budget_s}


def prediction_lines(prediction: dict) -> list[str]:
    rows, budget = prediction["rows"], prediction["budget_s"]
    out = [
        "| Run | Steps | CPU step (ms) | Step vs float | New programs | GPU s, low / high "
        "| Cumulative s, low / high |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["seconds"]
        cpu = "-" if r["cpu_step_ms"] is None else f"{r['cpu_step_ms']:.0f}"
        ratio = f"{r['ratio_to_float']:.2f}" + (" (MobileNetV2's)" if r["ratio_assumed"] else "")
        out.append(
            f"| {r['run']} | {r['steps']} | {cpu} | {ratio} "
            f"| {r['new_programs']} | {low:.0f} / {high:.0f} "
            f"| {r['cumulative_s'][0]:.0f} / {r['cumulative_s'][1]:.0f} |"
        )
    low, high = prediction["total_s"]
    fit = [sum(r["fits"][i] for r in rows) for i in (0, 1)]
    out += [
        "",
        f"Predicted effects part: {low:.0f} s (fast path at the launch-bound step) to {high:.0f} s "
        f"(no gain from it) against a budget of {budget:.0f} s: {fit[0]} and {fit[1]} of the "
        f"{len(rows)} runs fit.",
    ]
    return out
