"""The paper's three effects where they appear at our scale: oscillations, BN corruption, remedies.

    nice -n 10 python demos/effects.py --workdir=/tmp/oscqat_effects --out=docs/results.md
    python demos/effects.py --report-only --workdir=/tmp/oscqat_effects --out=docs/results.md
    python demos/effects.py --quick --workdir=/tmp/oscqat_effects_quick \
        --out=/tmp/oscqat_effects_quick/results.md

The paper's Table 1 design on digits (``configs/effects.py``): a float MobileNetV2 (width 0.5,
depth-wise) and a float ResNet-18 trained to their plateau once each, then weight-only 3-bit
LSQ of both (the BN study) and W3A3 / W4A4 QAT of the MobileNetV2 with LSQ, dampening and
freezing (the methods table). Every QAT run is evaluated before and after BN re-estimation
after every epoch (docs/method.md §8), so the report follows the gap through each run.

A *regime* is a way of running QAT (epochs, learning-rate schedule, which runs); the study
runs its pilots first, then its main regime, and reports every run of every regime it
started. Each run lives in ``<workdir>/runs/<regime>/<name>``; a run whose ``result.json``
exists is skipped, so re-running the command continues the study, and the report (with
``figures/results_*.png`` beside it) is rewritten after every run. ``--quick`` is a tiny
version (a 16x16 MobileNetV2, a few epochs) to try the script; the tests train these tiny
runs through ``benchmarks/gpu_check.py --dry-run``. The GPU version of the study, its main
regime at three seeds with a time prediction from this study's step costs, is the module
``effects_gpu`` beside this script, which ``benchmarks/gpu_check.py`` runs (``--dry-run``:
this study's tiny runs, one epoch each).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "demos")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import reproduce  # noqa: E402  (the study helpers: results, statistics, tables)

from oscqat_jax.training import metrics, reports, trainer  # noqa: E402

recipe = reproduce._load("configs/effects.py", "effects_recipe")
tiny = reproduce._load("configs/tiny.py", "tiny_config")


@dataclasses.dataclass(frozen=True)
class Regime:
    """One way of running QAT; ``bn_seeds`` and ``method_seeds`` say which runs it has."""

    name: str
    about: str  # one sentence for the report: what differs and why it was tried
    qat_epochs: int
    lr_schedule: str  # "constant" (lr_final = lr) or "cosine" (to 0)
    bn_models: tuple[str, ...] = ()
    bn_seeds: tuple[int, ...] = ()
    bn_acts: bool = False  # the BN study quantizes activations too (W3A3 instead of W3)
    # A regime whose W3A3 LSQ runs of the MobileNetV2 have this regime's config and stand for
    # its MobileNetV2 rows (so they are not run twice); "" = none.
    bn_mobilenet_from: str = ""
    method_bits: tuple[int, ...] = ()
    method_seeds: dict = dataclasses.field(default_factory=dict)  # bits -> seeds
    methods: tuple[str, ...] = ("lsq", "damp", "freeze")


@dataclasses.dataclass(frozen=True)
class Settings:
    float_epochs: dict  # model -> epochs
    regimes: tuple[Regime, ...]  # in the order they run
    tiny: bool = False
    # The MobileNetV2's 3-bit runs of every seed before any of ResNet-18's, whose steps cost
    # several times more on a CPU (False: seed by seed, both models in each).
    mobilenet_first: bool = False


MNV2, RESNET = "mobilenet_v2", "resnet18"
PILOT_SEED = 100  # pilots use seeds the main regime does not, so no run is counted twice
FULL = Settings(
    float_epochs={MNV2: recipe.FLOAT_EPOCHS, RESNET: 10},
    regimes=(
        Regime(
            "constant",
            "the paper's learning rate held constant, so the state of the middle of a run "
            "(where `python train.py` shows the gap) lasts to its end",
            qat_epochs=recipe.QAT_EPOCHS,
            lr_schedule="constant",
            bn_models=(MNV2, RESNET),
            bn_seeds=(0, 1, 2, 3, 4),
            method_bits=(3, 4),
            method_seeds={3: (0, 1, 2, 3, 4), 4: (0, 1, 2)},
        ),
        Regime(
            "constant_w3a3",
            "the BN study with activations quantized too (W3A3 LSQ), as `python train.py`, "
            "which shows the gap, runs; its MobileNetV2 rows are the W3A3 LSQ runs of regime "
            "constant (the same config)",
            qat_epochs=recipe.QAT_EPOCHS,
            lr_schedule="constant",
            bn_models=(RESNET,),
            bn_seeds=(0, 1, 2, 3, 4),
            bn_acts=True,
            bn_mobilenet_from="constant",
        ),
        Regime(
            "cosine",
            "the paper's schedule shape, lr cosine to 0 over the run; weight-only 3-bit, "
            "one seed per model",
            qat_epochs=recipe.QAT_EPOCHS,
            lr_schedule="cosine",
            bn_models=(MNV2, RESNET),
            bn_seeds=(PILOT_SEED,),
        ),
    ),
)
FULL = dataclasses.replace(FULL, mobilenet_first=True)
QUICK = Settings(
    float_epochs={MNV2: 3},
    regimes=(
        Regime(
            "quick",
            "the tiny test version",
            qat_epochs=3,
            lr_schedule="constant",
            bn_models=(MNV2,),
            bn_seeds=(0,),
            method_bits=(3,),
            method_seeds={3: (0,)},
            methods=("lsq", "freeze"),
        ),
    ),
    tiny=True,
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: ``reproduce.Run``'s fields (so its tables read it) and the regime."""

    regime: str
    kind: str  # "float", "bn" (weight-only 3-bit LSQ) or "qat" (the methods table)
    model: str
    bits: int = 3
    method: str = "lsq"
    seed: int = 0
    acts: bool = False  # a BN-study run that quantizes activations too

    @property
    def name(self) -> str:
        if self.kind == "bn" and self.acts:
            return f"bn_{self.model}_w{self.bits}a{self.bits}_s{self.seed}"
        return reproduce.Run(self.kind, self.model, self.bits, self.method, self.seed).name

    @property
    def folder(self) -> str:
        return self.name if self.kind == "float" else os.path.join(self.regime, self.name)


def plan(settings: Settings) -> list[Run]:
    """Every run in the order they run: the 3-bit runs seed by seed, each seed's runs regime
    by regime (BN study, then methods), then the 4-bit runs, so that a study cut short has
    every kind of run of its first seeds (with ``mobilenet_first``, of the MobileNetV2's
    first; ResNet-18's runs come after all of them). An architecture's float model comes
    before its first QAT run."""
    late = settings.mobilenet_first
    tagged = []
    for index, regime in enumerate(settings.regimes):
        for seed in regime.bn_seeds:
            tagged += [
                (
                    (0, late and m != MNV2, seed, index),
                    Run(regime.name, "bn", m, 3, "lsq", seed, regime.bn_acts),
                )
                for m in regime.bn_models
            ]
        for bits in regime.method_bits:
            for seed in regime.method_seeds[bits]:
                tagged += [
                    (
                        (int(bits != 3), False, seed, index),
                        Run(regime.name, "qat", MNV2, bits, m, seed),
                    )
                    for m in regime.methods
                ]
    floats, ordered = set(), []
    for _, run in sorted(tagged, key=lambda t: t[0]):  # stable: BN runs before methods
        if run.model not in floats:
            floats.add(run.model)
            ordered.append(Run("float", "float", run.model))
        ordered.append(run)
    return ordered


def run_config(settings: Settings, run: Run, float_weights: str):
    """The trainer config of ``run``: ``configs/effects.py`` with the regime's schedule."""
    acts = f"a{run.bits}" if run.kind == "qat" or run.acts else ""
    c = recipe.get_config(f"{run.model}_w{run.bits}{acts}_{run.method}")
    c.seed = run.seed
    if settings.tiny:  # 359 training images (11 steps an epoch), a 16x16 two-stage model
        c.data.val_fraction = 0.8
        c.data.image_size = 16
        c.model.block_setting = tiny.QUICK_BLOCKS
        c.train.fast_compile = True
        c.train.log_every = c.train.steps_per_call = 5  # several records an epoch: step times
        c.eval.bn_batches = 4
        c.quant.weight_range = c.quant.act_range = "current_minmax"
    if run.kind == "float":
        c.float_train.epochs = settings.float_epochs[run.model]
        c.float_train.save_weights = float_weights
        c.train.stop_at_step = 1  # the float phase is what this run is for
        return c
    regime = next(r for r in settings.regimes if r.name == run.regime)
    c.float_train.epochs = 0
    c.model.pretrained = float_weights
    c.model.pretrained_layout = "converted"
    c.train.epochs = regime.qat_epochs
    if regime.lr_schedule == "cosine":
        c.optimizer.lr_final = 0.0
    return c


# --------------------------------------------------------------------------- running


def run_study(settings: Settings, workdir: str, out: str, report_only: bool = False) -> dict:
    """Runs (or continues) every run of ``settings``; rewrites the report after each. With
    ``report_only``, writes the report of the runs that have finished and runs nothing."""
    results = {}
    if report_only:
        for run in plan(settings):
            path = os.path.join(workdir, "runs", run.folder, "result.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    results[run.folder] = json.load(f)
        write_report(settings, results, out, workdir)
        return results
    with reproduce._quiet():
        for run in plan(settings):
            results[run.folder] = one_run(settings, run, workdir)
            write_report(settings, results, out, workdir)
    return results


def one_run(settings: Settings, run: Run, workdir: str) -> dict:
    run_dir = os.path.join(workdir, "runs", run.folder)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
    float_weights = os.path.join(workdir, "runs", f"float_{run.model}", "float_model.npz")
    config = run_config(settings, run, float_weights)
    print(f"=== {run.folder} ===", flush=True)
    started, load_before = time.time(), os.getloadavg()[0]
    summary = trainer.train_and_evaluate(config, run_dir)
    result = {
        "run": {k: v for k, v in dataclasses.asdict(run).items() if k not in ("regime", "acts")},
        "regime": run.regime,
        "acts": run.acts,
        "float": summary["float"],
    }
    if run.kind == "float":
        result["float_loss_per_epoch"] = float_losses(run_dir, config.float_train.epochs)
    else:
        result.update(reproduce.qat_result(summary, run_dir))
        result["curve"] = curve(run_dir)
    result["step_ms"] = step_ms(run_dir, "float" if run.kind == "float" else "qat")
    result["wall_s"] = time.time() - started
    result["load_1min"] = [load_before, os.getloadavg()[0]]  # the machine's, at start and end
    result["niceness"] = os.nice(0)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def curve(run_dir: str) -> list[dict]:
    """Per evaluation (every epoch): step, pre- and post-BN top-1, BN mean shift by group
    and the share of weights oscillating."""
    keep = ("step", "top1_pre_bn", "top1_post_bn", "oscillating/all", "frozen/all")
    keep += tuple(f"bn_mean_shift/{g}" for g in reproduce.GROUPS)
    return [{k: r[k] for k in keep if k in r} for r in reports.evaluations(run_dir)]


def digits_split(config) -> tuple[int, int]:
    """Training and validation images of ``config``'s digits split."""
    return _split_sizes(config.data.val_fraction, config.data.split_seed)


@functools.cache
def _split_sizes(val_fraction: float, split_seed: int) -> tuple[int, int]:
    from oscqat_jax.training.data import load_digits  # noqa: PLC0415

    data = load_digits(image_size=8, val_fraction=val_fraction, split_seed=split_seed)
    return len(data.train_labels), len(data.val_labels)


def steps_per_epoch(config) -> int:
    """Training steps in an epoch of ``config`` (the last partial batch is dropped)."""
    return digits_split(config)[0] // config.data.batch_size


def _rows(run_dir: str, key: str) -> list[dict]:
    rows = metrics.read_metrics(os.path.join(run_dir, metrics.METRICS_FILE))
    return [r for r in rows if key in r]


def float_losses(run_dir: str, epochs: int) -> list[float]:
    """The float phase's mean logged training loss in each of its ``epochs``, to show where
    it levels off."""
    rows = _rows(run_dir, "float/loss")
    per_epoch = -(-rows[-1]["step"] // epochs)
    epochs = {}
    for r in rows:
        epochs.setdefault((r["step"] - 1) // per_epoch, []).append(r["float/loss"])
    return [sum(v) / len(v) for _, v in sorted(epochs.items())]


def step_ms(run_dir: str, phase: str) -> float | None:
    """Milliseconds per training step from the first to the last logged record (no compile,
    but the evaluations between them included)."""
    rows = _rows(run_dir, f"{phase}/loss")
    if len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"]:
        return None
    return 1e3 * (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])


def write_report(settings: Settings, results: dict, out: str, workdir: str) -> None:
    import effects_report  # noqa: PLC0415  (a sibling of this script)

    effects_report.write(settings, results, out, workdir, sys.modules[__name__])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="runs and the XLA cache")
    parser.add_argument("--out", required=True, help="the Markdown report to write")
    parser.add_argument("--quick", action="store_true", help="the tiny test version")
    parser.add_argument(
        "--report-only", action="store_true", help="report the finished runs, run nothing"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    run_study(QUICK if args.quick else FULL, args.workdir, args.out, args.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
