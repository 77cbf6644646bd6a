"""The report of ``demos/effects.py``: tables, findings and figures from its runs' results.

Every number comes from the runs' ``result.json`` files (``results``: run folder to result);
the statistics are ``demos/reproduce.py``'s (paired 95 % t-intervals).
"""

from __future__ import annotations

import os
import platform
import sys

import jax
import numpy as np
import reproduce

from oscqat_jax.training import reports

figures = reproduce.figures
MODEL_NAMES = {"mobilenet_v2": "MobileNetV2 (depth-wise)", "resnet18": "ResNet-18"}
GPU_BEGIN = "<!-- gpu-check "


# Starts of this script stopped before their first QAT run, in the order they were made
# (2026-12-07; the numbers from their logs): the designs the study left, and why.
STOPPED_TRIES = (
    "32x32 inputs, float models of 30 (MobileNetV2) and 15 (ResNet-18) epochs, 10-epoch QAT: "
    "stopped during the float MobileNetV2, which ran at 2.9 steps/s at niceness 10 beside "
    "other jobs; moved to 16x16 inputs to make the steps cheaper.",
    "16x16 inputs, float MobileNetV2 of 20 epochs (880 steps): it ended at 47.22 % top-1 "
    "with a training loss of 1.65 (1.64 to 2.11 over its last eight epochs; 4.65 after the "
    "first): at 16x16 its maps shrink to 1x1. Stopped; back to 32x32, with shorter runs "
    "(MobileNetV2 float 20 epochs, ResNet-18 10, QAT 6 epochs) to fit the time.",
    "The float ResNet-18 of the final design, first start: stopped after 90 of its 440 steps "
    "(3.1 s a step at niceness 10 beside other jobs, nine MobileNetV2 QAT steps), to run "
    "the MobileNetV2's seeds first; it ran again, whole, after them.",
)


def _of(results: dict, regime: str, kind: str | None = None) -> dict:
    return {
        folder: r
        for folder, r in results.items()
        if r["regime"] == regime and (kind is None or r["run"]["kind"] == kind)
    }


def bn_of(results: dict, regime) -> dict:
    """The BN-study runs of ``regime``, with the W3A3 LSQ runs of the MobileNetV2 from
    ``regime.bn_mobilenet_from`` standing for its MobileNetV2 rows."""
    bn = _of(results, regime.name, "bn")
    if regime.bn_mobilenet_from:
        partner = _of(results, regime.bn_mobilenet_from, "qat")
        bn.update(
            {
                f: r
                for f, r in partner.items()
                if r["run"]["bits"] == 3 and r["run"]["method"] == "lsq"
            }
        )
    return bn


def _gaps(r: dict) -> list[float]:
    """Post- minus pre-BN top-1 (points) at each evaluation of a run."""
    return [e["top1_post_bn"] - e["top1_pre_bn"] for e in r["curve"]]


def _mean_gap(r: dict) -> float:
    return float(np.mean(_gaps(r)))


def _ms(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _v(estimate, unit: str = "points", digits: int = 2) -> str:
    return reproduce._verdict(estimate, unit, digits)


# --------------------------------------------------------------------------- sections


def settings_lines(effects, settings) -> list[str]:
    run = effects.Run
    main = settings.regimes[0]
    w3 = effects.run_config(settings, run(main.name, "qat", "mobilenet_v2", 3, "lsq"), "")
    w4 = effects.run_config(settings, run(main.name, "qat", "mobilenet_v2", 4, "lsq"), "")
    fr = effects.run_config(settings, run(main.name, "qat", "mobilenet_v2", 3, "freeze"), "")
    dp = effects.run_config(settings, run(main.name, "qat", "mobilenet_v2", 3, "damp"), "")
    floats = ", ".join(f"{m} {e} epochs" for m, e in settings.float_epochs.items())
    n_train, n_val = effects.digits_split(w3)
    per_epoch = n_train // w3.data.batch_size
    steps = per_epoch * w3.train.epochs
    return [
        f"- Data: scikit-learn's digits, upsampled to {w3.data.image_size}x{w3.data.image_size}, "
        f"a fixed stratified {n_train}/{n_val} split, ±{w3.data.max_shift} px shifts, batch "
        f"{w3.data.batch_size} ({per_epoch} steps an epoch); accuracy on all {n_val} validation "
        f"images (one image is {100 / n_val:.2f} points). Digits, not Fashion-MNIST: the study "
        "must fit about 90 minutes of a 2-core CPU with five seeds of ResNet-18, and one "
        "Fashion-MNIST epoch is 42 digits epochs.",
        f"- Float models, once per architecture, shared by all its QAT runs: {floats}, SGD "
        f"lr {w3.float_train.optimizer.lr} cosine to 0 (their training loss per epoch below).",
        f"- QAT (`configs/effects.py`): SGD momentum {w3.optimizer.momentum}, the paper's "
        f"learning rate ({w3.optimizer.lr} at 3 bits, {w4.optimizer.lr} at 4 bits, the same for "
        "ResNet-18, for which the paper's recipes give no value of their own) and weight "
        f"decays ({w3.optimizer.weight_decay} at 3 bits), Adam {w3.optimizer.quant_lr} on the scales, "
        "LSQ_paper setup, MSE range initialisation; the schedule and length per regime below. "
        f"Steps per compiled call (the fast path): {w3.train.steps_per_call}.",
        f"- Tracking: EMA momentum {w3.osc_freeze.ema_momentum} (the paper's 0.001 scaled to "
        f"runs of {steps} steps, in which an EMA of momentum 0.001 reaches only "
        f"{1 - 0.999**steps:.0%} of a weight's oscillation frequency); "
        f"oscillating above {w3.train.osc_level}.",
        f"- Freezing: threshold {fr.osc_freeze.threshold} → {fr.osc_freeze.threshold_final} "
        f"(cosine after {fr.osc_freeze.anneal_start:.0%} of QAT; the paper 0.1 → 0.011, scaled "
        f"with the EMA). Dampening: λ {dp.osc_damp.weight} → {dp.osc_damp.weight_final} (cosine "
        f"after {dp.osc_damp.anneal_start:.0%}, {dp.osc_damp.aggregation}), as the paper.",
        f"- Evaluation after every epoch, before and after BN re-estimation on "
        f"{w3.eval.bn_batches} training batches (docs/method.md §8). As in the reference, the "
        "re-estimated statistics replace the running ones after each evaluation; with BN "
        f"momentum 0.9 the running statistics forget them within a few dozen of the {per_epoch} "
        "steps to the next evaluation, so each pre-BN number measures the running statistics as "
        "training left them.",
        "- BN study: weight-only 3-bit LSQ (activations in float), the paper's Table 1. "
        "Methods table: W3A3 and W4A4 of the MobileNetV2 with LSQ, dampening, freezing.",
    ]


def regime_lines(settings, results: dict, planned: dict) -> list[str]:
    lines = [
        "| Regime | QAT | What it tries | Runs done / planned | Post − pre BN at the end, "
        "MobileNetV2 / ResNet-18 (points) | Mean post − pre over the run, MobileNetV2 / "
        "ResNet-18 (points) |",
        "|---|---|---|---|---|---|",
    ]
    for regime in settings.regimes:
        done = _of(results, regime.name)
        bn = bn_of(results, regime)
        end, mean = [], []
        for model in MODEL_NAMES:
            rs = [r for r in bn.values() if r["run"]["model"] == model]
            end.append(_ms([r["post_bn"] - r["pre_bn"] for r in rs]))
            mean.append(_ms([_mean_gap(r) for r in rs]))
        schedule = "lr constant" if regime.lr_schedule == "constant" else "lr cosine to 0"
        lines.append(
            f"| {regime.name} | {regime.qat_epochs} epochs, {schedule} | {regime.about} "
            f"| {len(done)} / {planned[regime.name]} | {' / '.join(end)} | {' / '.join(mean)} |"
        )
    return lines


def float_lines(results: dict) -> list[str]:
    lines = [
        "| Model | Epochs | Top-1 (%) | Training loss, last five epochs | Step (ms) | Wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.values():
        if r["run"]["kind"] != "float":
            continue
        losses = r["float_loss_per_epoch"]
        tail = ", ".join(f"{x:.3f}" for x in losses[-5:])
        step = "-" if r.get("step_ms") is None else f"{r['step_ms']:.0f}"
        lines.append(
            f"| {r['run']['model']} | {len(losses)} | {r['float']:.2f} | {tail} | {step} "
            f"| {r['wall_s']:.0f} |"
        )
    return lines


def bn_lines(bn: dict) -> list[str]:
    """The BN study of one regime: end values, the gap over the run, per-epoch gaps."""
    lines = [
        "| Model | Seeds | Float top-1 (%) | Pre-BN end (%) | Post-BN end (%) | Post − pre end "
        "| Post − pre, mean over the run | Largest post − pre | Osc. end (%) "
        "| BN mean shift end dw / other (σ) |",
        "|" + "---|" * 10,
    ]
    for model in MODEL_NAMES:
        rs = [r for r in bn.values() if r["run"]["model"] == model]
        if not rs:
            continue
        lines.append(
            f"| {model} | {len(rs)} | {_ms([r['float'] for r in rs])} "
            f"| {_ms([r['pre_bn'] for r in rs])} | {_ms([r['post_bn'] for r in rs])} "
            f"| {_ms([r['post_bn'] - r['pre_bn'] for r in rs])} "
            f"| {_ms([_mean_gap(r) for r in rs])} | {_ms([max(_gaps(r)) for r in rs])} "
            f"| {reproduce._col(rs, 'osc_end/all')} "
            f"| {reproduce._pair(rs, 'bn_mean_shift', ('dw', 'other'), scale=1, digits=3)} |"
        )
    return lines


def epoch_lines(groups: dict[str, list[dict]]) -> list[str]:
    """Mean post − pre BN (points) at each evaluation, one column per group of runs."""
    groups = {k: rs for k, rs in groups.items() if rs}
    if not groups:
        return []
    length = min(len(r["curve"]) for rs in groups.values() for r in rs)
    lines = ["| Epoch | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for i in range(length):
        cells = [_ms([_gaps(r)[i] for r in rs]) for rs in groups.values()]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def bn_findings(bn: dict) -> list[str]:
    by_model = {m: [r for r in bn.values() if r["run"]["model"] == m] for m in MODEL_NAMES}
    lines = []
    for model, rs in by_model.items():
        if not rs:
            continue
        end = reproduce._paired([r["post_bn"] for r in rs], [r["pre_bn"] for r in rs])
        over = reproduce._paired([_mean_gap(r) for r in rs], [0.0] * len(rs))
        lines.append(
            f"- {MODEL_NAMES[model]}, post- minus pre-BN top-1 over {len(rs)} seed(s): at the "
            f"end {_v(end)}; averaged over the run's evaluations {_v(over)}."
        )
    mnv2, resnet = by_model["mobilenet_v2"], by_model["resnet18"]
    if mnv2 and resnet:
        end = reproduce._difference(
            [r["post_bn"] - r["pre_bn"] for r in mnv2], [r["post_bn"] - r["pre_bn"] for r in resnet]
        )
        over = reproduce._difference([_mean_gap(r) for r in mnv2], [_mean_gap(r) for r in resnet])
        lines.append(
            "- MobileNetV2's gap minus ResNet-18's (unpaired: different models; conservative "
            f"degrees of freedom): at the end {_v(end)}; averaged over the run {_v(over)}."
        )
    return lines


def method_findings(qat: dict) -> list[str]:
    """reproduce's findings, plus pre-BN accuracy and the gap over the run against LSQ."""
    lines = reproduce.findings(qat)
    groups = reproduce._group(qat, "qat")
    for (bits, method), rs in groups.items():
        lsq = groups.get((bits, "lsq"))
        if method == "lsq" or not lsq:
            continue
        pre = reproduce._versus(rs, lsq, "pre_bn", 1.0)
        over = reproduce._versus(
            [{**r, "mean_gap": _mean_gap(r)} for r in rs],
            [{**r, "mean_gap": _mean_gap(r)} for r in lsq],
            "mean_gap",
            1.0,
        )
        lines.append(
            f"- W{bits}A{bits}, {reproduce.METHODS[method]} minus LSQ, paired by seed: pre-BN "
            f"accuracy at the end {_v(pre)}; post- minus pre-BN averaged over the run {_v(over)}."
        )
    return lines


def runs_lines(results: dict) -> list[str]:
    lines = [
        "| Run | Wall (s) | Step (ms) | Load at start / end | Float or pre-BN end (%) "
        "| Post-BN end (%) |",
        "|---|---|---|---|---|---|",
    ]
    for folder, r in results.items():
        first = f"float {r['float']:.2f}" if r["run"]["kind"] == "float" else f"{r['pre_bn']:.2f}"
        post = f"{r['post_bn']:.2f}" if "post_bn" in r else "-"
        step = "-" if r.get("step_ms") is None else f"{r['step_ms']:.0f}"
        load = " / ".join(f"{x:.1f}" for x in r.get("load_1min", []))
        lines.append(f"| {folder} | {r['wall_s']:.0f} | {step} | {load} | {first} | {post} |")
    return lines


# --------------------------------------------------------------------------- the report


def _figures(settings, results: dict, workdir: str, directory: str) -> list[str]:
    main = settings.regimes[0].name
    qat = _of(results, main, "qat")
    groups = reproduce._group(qat, "qat")
    paths = figures.oscillation_bars(groups, directory)
    histories = {
        key: [reports.oscillation_history(os.path.join(workdir, "runs", main, n)) for n in names]
        for key, names in ((k, [reproduce._name(r) for r in rs]) for k, rs in groups.items())
    }
    paths += figures.oscillation_curves(histories, reproduce.METHODS, directory)
    panels = {}
    for regime in settings.regimes:
        bn = bn_of(results, regime)
        title = f"{regime.name}: {'W3A3' if regime.bn_acts else 'weight-only 3-bit'} LSQ"
        panels[title] = {
            m: [r["curve"] for r in bn.values() if r["run"]["model"] == m] for m in MODEL_NAMES
        }
    for bits in sorted({b for b, _ in groups}):
        panels[f"{main}: W{bits}A{bits} MobileNetV2"] = {
            reproduce.METHODS[m]: [r["curve"] for r in groups.get((bits, m), [])]
            for m in reproduce.METHODS
        }
    paths += figures.bn_gap_curves(panels, directory)
    return paths


def _span(results: dict, workdir: str) -> float:
    """Seconds from the first run's start to the last run's end, from the times of their
    ``result.json`` files (the sum of the run times where those are missing)."""
    paths = {f: os.path.join(workdir, "runs", f, "result.json") for f in results}
    if not results or not all(os.path.isfile(p) for p in paths.values()):
        return sum(r["wall_s"] for r in results.values())
    ends = {f: os.path.getmtime(p) for f, p in paths.items()}
    return max(ends.values()) - min(ends[f] - r["wall_s"] for f, r in results.items())


def _gpu_sections(out: str) -> str:
    """The GPU-check sections of an existing report (written by ``gpu_check.py
    --write-docs``), kept below the study."""
    if not os.path.isfile(out):
        return ""
    text = open(out, encoding="utf-8").read()
    return text[text.index(GPU_BEGIN) :] if GPU_BEGIN in text else ""


def write(settings, results: dict, out: str, workdir: str, effects=None) -> None:
    """Writes the Markdown report ``out`` and ``figures/results_*.png`` beside it;
    ``effects`` is the study module (its plan and configs; default: the running script)."""
    effects = effects or sys.modules["__main__"]
    directory = os.path.join(os.path.dirname(os.path.abspath(out)), "figures")
    os.makedirs(directory, exist_ok=True)
    paths = _figures(settings, results, workdir, directory)
    planned = {}
    for run in effects.plan(settings):
        planned[run.regime] = planned.get(run.regime, 0) + 1
    planned.pop("float", None)
    total = sum(r["wall_s"] for r in results.values())
    span = _span(results, workdir)
    # Runs before the niceness was recorded ran at 10, as the docstring's command.
    nice = ", ".join(str(n) for n in sorted({r.get("niceness", 10) for r in results.values()}))
    loads = [x for r in results.values() for x in r.get("load_1min", [])]
    main = settings.regimes[0]
    qat = _of(results, main.name, "qat")
    groups = reproduce._group(qat, "qat")
    lines = [
        "# The paper's three effects at small scale: oscillations, BN corruption, remedies",
        "",
        "Produced by `python demos/effects.py" + (" --quick" if settings.tiny else "") + "`; "
        "every number below is what its runs measured, and every run it started is listed at "
        "the end.",
        "",
        "## Settings",
        "",
        *settings_lines(effects, settings),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on "
        f"{jax.default_backend()}, the runs at niceness {nice}. Sum of the run times: "
        f"{total / 60:.1f} min; from the start of the first run to the end of the last: "
        f"{span / 60:.1f} min. 1-minute load average at the starts and ends of the runs: "
        + (
            f"{min(loads):.1f} to {max(loads):.1f} (median {np.median(loads):.1f})"
            if loads
            else "-"
        )
        + "; above 2 the machine was shared with other jobs and the times are loaded.",
        "",
        "## Regimes tried",
        "",
        "Every regime this script ran, in the order it ran them; *runs done / planned* counts "
        "QAT runs (a study cut short has fewer). Mean ± standard deviation over seeds.",
        "",
        *regime_lines(settings, results, planned),
        "",
        *(
            ["Stopped before a result (not in the tables):", ""]
            + [f"- {t}" for t in STOPPED_TRIES]
            + [""]
            if not settings.tiny
            else []
        ),
        "## Float models",
        "",
        *float_lines(results),
        "",
        f"## Effect 1: oscillations (regime {main.name})",
        "",
        "*Osc.*: share of tracked weights whose oscillation frequency (EMA) is above the level; "
        "*dw*: depth-wise layers, *pw*: the other tracked layers; *not frozen* leaves frozen "
        "weights out. *BN mean shift*: mean over BN channels of |running mean − re-estimated "
        "mean| / re-estimated std. Mean ± standard deviation over seeds.",
        "",
        *reproduce.qat_table(qat),
        "",
        "## Effect 2: BN statistics corrupted in the depth-wise network (the paper's Table 1)",
        "",
    ]
    for regime in settings.regimes:
        bn = bn_of(results, regime)
        if not bn:
            lines += [f"### Regime {regime.name}: no run finished", ""]
            continue
        columns = {m: [r for r in bn.values() if r["run"]["model"] == m] for m in MODEL_NAMES}
        if regime.name == main.name:
            columns.update(
                {f"W{b}A{b} {reproduce.METHODS[m]}": rs for (b, m), rs in groups.items()}
            )
        what = "W3A3 LSQ" if regime.bn_acts else "weight-only 3-bit LSQ"
        partner = (
            f" Its MobileNetV2 rows are the W3A3 LSQ runs of regime {regime.bn_mobilenet_from}."
            if regime.bn_mobilenet_from
            else ""
        )
        lines += [
            f"### Regime {regime.name}",
            "",
            f"{what}, {regime.qat_epochs} epochs, lr {regime.lr_schedule}.{partner}",
            "",
            *bn_lines(bn),
            "",
            "Post- minus pre-BN top-1 (points) after each epoch, mean ± std over seeds:",
            "",
            *epoch_lines(columns),
            "",
            *bn_findings(bn),
            "",
        ]
    lines += [
        f"## Effect 3: dampening and freezing against LSQ (regime {main.name})",
        "",
        "Differences of means with their 95 % t-interval, paired by seed (a seed fixes the "
        "data order and the first quarter of QAT, which the methods share); *no difference "
        "shown* means the interval includes zero, not that the methods are equal.",
        "",
        *method_findings(qat),
        "",
        "## Figures",
        "",
        *[
            f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(os.path.abspath(out)))})"
            for p in paths
        ],
        "",
        "## Runs",
        "",
        *runs_lines(results),
        "",
    ]
    missing = [r.folder for r in effects.plan(settings) if r.folder not in results]
    if missing:
        lines += [
            "## Runs not finished",
            "",
            f"{len(missing)} planned runs have no result yet; the study's command, run again "
            "with the same `--workdir`, runs them and keeps the finished ones: "
            + ", ".join(f"`{f}`" for f in missing)
            + ".",
            "",
        ]
    gpu = _gpu_sections(out)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + ("\n" + gpu if gpu else ""))
