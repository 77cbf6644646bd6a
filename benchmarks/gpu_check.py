"""One command for a GPU machine: the train step's speed (issue 5) and the effects study (issue 16).

    python benchmarks/gpu_bundle.py                                   # once, with registries
    python benchmarks/gpu_check.py --bundle=.gpu_bundle --out=$OUT    # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out=/tmp/gpu_check     # CPU, toy sizes, < 2 min
    python benchmarks/gpu_check.py --predict=/tmp/oscqat_effects --out=/tmp/gpu_check
    python benchmarks/gpu_check.py --write-docs=$OUT/gpu_check.json   # results into the repo

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``, both rewritten after every case
and run, so that a command cut short still leaves what it measured, and each study run's
metric records as ``<out>/runs/<run>.jsonl``; prints progress.

**Speed** (``SPEED``): the trainer's own step, built and timed by ``benchmarks/train_step.py``
(``case_config`` and ``time_case``): MobileNetV2 at 224x224, batch 256 and 128, bfloat16 and
float32, float / W4A4 LSQ / + tracking and freezing / + freezing and dampening, the plain-Linen
MobileNetV2 quantized by rules (issue 13, bfloat16 batch 256), and EfficientNet-lite0 W4A4 freezing + dampening (and float) at batch 128 in bfloat16. Per case:
images/s (median of the timed steps), trace+lower and compile time, XLA's memory of the
compiled step and the device's peak so far, and the throughput relative to the float step
of the same model, batch and dtype; then the targets of issue 5.

**Effects** (``demos/effects_gpu.py``): the converged study of ``demos/effects.py``
(``docs/results.md``) at three seeds: float width-0.5 MobileNetV2 and ResNet-18 trained to
their plateau on digits (``configs/effects.py``), W3A3 LSQ / dampening / freezing of the
MobileNetV2 and the weight-only 3-bit BN study of both, every run evaluated before and after
BN re-estimation each epoch, with ``train.steps_per_call`` (the fast path). Its tables are
made by that script's functions. ``--predict=CPU_WORKDIR`` instead predicts, on any machine,
how long this part takes on the GPU from the step costs a CPU run of the study measured
(the assumptions are beside the constants of ``demos/effects_gpu.py``).

Each part has a time budget (``--speed-budget-s``, ``--effects-budget-s``): a case or run
starts only while the time it is expected to take (the median of those before it) still
fits, and what does not fit is listed as skipped. Cases and runs are ordered by importance.
A case or run that fails is recorded with its error, and the command goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_bundle  # noqa: E402  (the standard library only)

if __name__ == "__main__":
    # Before the imports below: on a bare GPU machine the bundle supplies what they need.
    try:
        INSTALLED = gpu_bundle.install_missing(gpu_bundle.bundle_argument(sys.argv[1:]))
    except (FileNotFoundError, RuntimeError) as error:
        sys.exit(f"gpu_check.py: {error}")
else:
    INSTALLED = []

import flax  # noqa: E402
import jax  # noqa: E402
import train_step  # noqa: E402


def _load(relative_path: str, name: str):
    """A repository file outside the package (a config, the study script) as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tiny = _load("configs/tiny.py", "tiny_config")
effects_gpu = _load("demos/effects_gpu.py", "effects_gpu")
PREDICTION_FILE = "gpu_prediction.md"

JSON_FILE, MARKDOWN_FILE = "gpu_check.json", "gpu_check.md"
PARTS = ("speed", "effects")
# speed, effects. Measured on a cold H200 (2026-11-30): the float and freeze+dampen cases
# take 96 + 57 s, compilation included. The effects study has its 6 minutes; with imports
# and the bundle's install the call stays under the 600 s a device call may run.
DEFAULT_BUDGETS_S = (200.0, 360.0)

# --------------------------------------------------------------------------- speed


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed train step: a ``benchmarks/train_step.py`` variant of one model."""

    model: str
    variant: str
    batch: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.model} {self.variant} {self.dtype} batch {self.batch}"


@dataclasses.dataclass(frozen=True)
class SpeedSizes:
    cases: tuple[Case, ...]  # in the order they run: the most important first
    resolution: int
    num_classes: int
    steps: int  # timed steps (the median is reported)
    warmup: int  # untimed steps after the first
    fast_compile: bool = False
    overrides: tuple[tuple[str, object], ...] = ()  # further config fields of every case


MNV2, EFFNET = "mobilenet_v2", "efficientnet_lite0"
BF16, F32 = "bfloat16", "float32"
TARGET = Case(MNV2, "freeze+dampen", 256, BF16)
TARGET_IMAGES_PER_S = 3800.0  # on one H100
TARGET_VS_FP = 0.75  # throughput relative to the float step
TARGET_COMPILE_S = 60.0  # trace + lower + compile

SPEED = SpeedSizes(
    cases=(
        Case(MNV2, "fp", 256, BF16),
        TARGET,
        # Issue 13: the plain-Linen MobileNetV2 quantized by rules, within 5 % of TARGET.
        Case(MNV2, "rules", 256, BF16),
        Case(EFFNET, "freeze+dampen", 128, BF16),
        Case(MNV2, "lsq", 256, BF16),
        Case(MNV2, "freeze", 256, BF16),
        Case(MNV2, "fp", 256, F32),
        Case(MNV2, "freeze+dampen", 256, F32),
        Case(MNV2, "fp", 128, BF16),
        Case(MNV2, "freeze+dampen", 128, BF16),
        Case(MNV2, "fp", 128, F32),
        Case(MNV2, "freeze+dampen", 128, F32),
        *(
            Case(MNV2, variant, batch, dtype)
            for batch, dtype in ((256, F32), (128, BF16), (128, F32))
            for variant in ("lsq", "freeze")
        ),
        Case(EFFNET, "fp", 128, BF16),
    ),
    resolution=224,
    num_classes=1000,
    steps=20,
    warmup=3,
)
DRY_SPEED = SpeedSizes(
    cases=(Case(MNV2, "fp", 4, BF16), Case(MNV2, "freeze+dampen", 4, BF16)),
    resolution=16,
    num_classes=10,
    steps=3,
    warmup=1,
    fast_compile=True,
    overrides=(
        ("model.width_multiplier", 0.25),
        ("model.block_setting", tiny.TEST_BLOCKS),
        # The MSE range search is a large program to trace; its result is not timed.
        ("quant.weight_range", "current_minmax"),
        ("quant.act_range", "current_minmax"),
    ),
)


def _fits(started: float, walls: list[float], budget_s: float) -> bool:
    """Whether one more item, expected to take the median of ``walls``, ends inside the budget."""
    expected = statistics.median(walls) if walls else 0.0
    return time.perf_counter() - started + expected <= budget_s


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run_speed(sizes: SpeedSizes, budget_s: float, part: dict, save) -> None:
    """Times every case of ``sizes`` that fits in ``budget_s`` into ``part`` (``records``,
    ``skipped``, ``errors``), calling ``save()`` after each."""
    sharded = train_step.step_lib.Sharded.over_all_devices(fast_compile=sizes.fast_compile)
    started, walls = time.perf_counter(), []
    for number, case in enumerate(sizes.cases, 1):
        label = f"[speed {number}/{len(sizes.cases)}] {case.name}"
        if not _fits(started, walls, budget_s):
            part["skipped"].append(case.name)
            print(f"{label}: skipped (speed budget of {budget_s:.0f} s)", flush=True)
            continue
        print(f"{label}: building, compiling, timing ...", flush=True)
        case_started = time.perf_counter()
        try:
            config = train_step.case_config(
                model=case.model,
                variant=case.variant,
                resolution=sizes.resolution,
                batch_size=case.batch,
                dtype=case.dtype,
                num_classes=sizes.num_classes,
                overrides=dict(sizes.overrides),
            )
            record = train_step.time_case(
                config, case.variant, sharded, steps=sizes.steps, warmup=sizes.warmup
            )
        except Exception as error:  # noqa: BLE001  (one failed case must not end the run)
            part["errors"][case.name] = _first_line(error)
            print(f"{label}: FAILED: {part['errors'][case.name]}", flush=True)
            save()
            continue
        record["case_s"] = time.perf_counter() - case_started
        record["compile_total_s"] = record["lower_s"] + record["compile_s"]
        record["xla_bytes"] = (record["xla_argument_bytes"] or 0) + (record["xla_temp_bytes"] or 0)
        walls.append(record["case_s"])
        part["records"].append(record)
        add_ratios(part["records"])
        print(
            f"{label}: {record['images_per_s']:,.0f} img/s, "
            f"{_ratio_text(record['vs_fp'])} fp, compile {record['compile_total_s']:.1f} s "
            f"(case {record['case_s']:.0f} s)",
            flush=True,
        )
        save()


def _ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def add_ratios(records: list[dict]) -> None:
    """``vs_fp``: each record's throughput over the float step's of the same model, batch and
    dtype (None until that float step is measured)."""
    fp = {
        (r["model"], r["batch"], r["dtype"]): r["median_step_s"]
        for r in records
        if r["variant"] == "fp"
    }
    for r in records:
        base = fp.get((r["model"], r["batch"], r["dtype"]))
        r["vs_fp"] = None if base is None else base / r["median_step_s"]


def targets(records: list[dict]) -> list[dict]:
    """Issue 5's targets against the record of ``TARGET`` (``met`` None when not measured)."""
    record = next(
        (r for r in records if Case(r["model"], r["variant"], r["batch"], r["dtype"]) == TARGET),
        {},
    )
    checks = (
        (
            "images/s",
            "images_per_s",
            f">= {TARGET_IMAGES_PER_S:,.0f} (one H100)",
            lambda v: v >= TARGET_IMAGES_PER_S,
        ),
        ("throughput vs float", "vs_fp", f">= {TARGET_VS_FP}x", lambda v: v >= TARGET_VS_FP),
        (
            "trace + lower + compile, s",
            "compile_total_s",
            f"<= {TARGET_COMPILE_S:.0f} s",
            lambda v: v <= TARGET_COMPILE_S,
        ),
    )
    rows = []
    for what, key, goal, met in checks:
        value = record.get(key)
        rows.append(
            {
                "target": f"{TARGET.name}: {what}",
                "goal": goal,
                "value": value,
                "met": None if value is None else met(value),
            }
        )
    return rows


# --------------------------------------------------------------------------- effects

# The study, its run loop, its tables and its time prediction: demos/effects_gpu.py.

# --------------------------------------------------------------------------- report


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def speed_lines(part: dict) -> list[str]:
    lines = [
        "| Model | Dtype | Batch | Variant | img/s | Throughput vs fp | Step ms | Compile s "
        "| XLA MiB | Peak MiB so far |",
        "|" + "---|" * 10,
    ]
    for r in part["records"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['variant']} "
            f"| {r['images_per_s']:,.0f} | {_ratio_text(r['vs_fp'])} "
            f"| {1e3 * r['median_step_s']:.1f} | {r['compile_total_s']:.1f} "
            f"| {r['xla_bytes'] / 2**20:,.0f} | {r['peak_memory_bytes'] / 2**20:,.0f} |"
        )
    lines += ["", "| Target | Goal | Measured | |", "|---|---|---|---|"]
    for t in part["targets"]:
        verdict = {None: "not measured", True: "met", False: "missed"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {_cell(t['value'], ',.2f')} | {verdict} |")
    return lines


def _not_done(part: dict) -> list[str]:
    lines = [f"- Skipped: {name}" for name in part["skipped"]]
    return lines + [f"- Failed: {name}: {error}" for name, error in part["errors"].items()]


def summary_markdown(data: dict, level: int = 1) -> str:
    """The report of a ``gpu_check.json``, its top heading at ``level``."""
    h, meta = "#" * level, data["meta"]
    lines = [
        f"{h} GPU check: train-step speed and the effects study ({meta['date'][:10]})",
        "",
        f"`{meta['command']}` on {meta['devices']} x {meta['device_kind']} "
        f"({meta['backend']}), JAX {meta['jax']}, flax {meta['flax']}, Python "
        f"{meta['python']}; {meta['total_s'] / 60:.1f} min in all.",
        "",
    ]
    if meta["dry_run"]:
        lines += ["**Dry run at toy sizes**: the numbers test the command, not a device.", ""]
    if "speed" in data:
        speed = data["speed"]
        lines += [
            f"{h}# Speed: the trainer's step (`benchmarks/train_step.py`)",
            "",
            f"{speed['resolution']}x{speed['resolution']} inputs, {speed['num_classes']} "
            f"classes, W4A4 LSQ_paper; median of {speed['steps']} timed steps after "
            f"{speed['warmup']} warm-up steps, each ended by `block_until_ready`. "
            "*Throughput vs fp*: the float step's time over this step's (same model, batch "
            "and dtype). *Compile*: trace + lower + XLA compile of the step. *XLA MiB*: the "
            "compiled step's arguments and temporaries; *Peak MiB so far*: the device's "
            "`peak_bytes_in_use` since the command started (on CPU the process's peak RSS).",
            "",
            *speed_lines(speed),
            *_not_done(speed),
            "",
        ]
    if "effects" in data:
        lines += [
            f"{h}# Effects: the converged digits study (`demos/effects.py`)",
            "",
            *effects_gpu.lines(data["effects"]),
            *_not_done(data["effects"]),
            "",
        ]
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_outputs(data: dict, out: str, started: float) -> None:
    """Writes ``gpu_check.json`` and ``gpu_check.md`` into ``out``."""
    data["meta"]["total_s"] = time.perf_counter() - started
    if "speed" in data:
        data["speed"]["targets"] = targets(data["speed"]["records"])
    _write_atomic(os.path.join(out, JSON_FILE), json.dumps(data, indent=1))
    _write_atomic(os.path.join(out, MARKDOWN_FILE), summary_markdown(data))


DOCS_BEGIN, DOCS_END = "<!-- gpu-check {} -->", "<!-- /gpu-check {} -->"


def write_docs(json_path: str, docs_path: str, results_dir: str) -> str:
    """Copies a GPU run's ``gpu_check.json`` to ``<results_dir>/gpu-<date>.json`` and writes
    its report as a section of ``docs_path`` (replacing the section of the same date);
    returns the copy's path."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if "meta" not in data or not set(PARTS) & set(data):
        raise ValueError(f"{json_path} is not a gpu_check.json (no meta, speed or effects).")
    if data["meta"]["dry_run"]:
        raise ValueError(f"{json_path} is a dry run's; --write-docs takes a GPU run's JSON.")
    date = data["meta"]["date"][:10]
    os.makedirs(results_dir, exist_ok=True)
    copy = os.path.join(results_dir, f"gpu-{date}.json")
    if os.path.abspath(copy) != os.path.abspath(json_path):
        shutil.copyfile(json_path, copy)
    begin, end = DOCS_BEGIN.format(date), DOCS_END.format(date)
    section = f"{begin}\n{summary_markdown(data, level=2)}\n{end}\n"
    text = open(docs_path, encoding="utf-8").read() if os.path.isfile(docs_path) else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    _write_atomic(docs_path, text)
    return copy


# --------------------------------------------------------------------------- command


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--bundle", default="", help="folder built by benchmarks/gpu_bundle.py")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU, < 2 min")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: speed,effects")
    p.add_argument("--speed-budget-s", type=float, help="default 200 s (dry run: no limit)")
    p.add_argument("--effects-budget-s", type=float, help="default 360 s (dry run: no limit)")
    p.add_argument(
        "--predict",
        default="",
        metavar="CPU_WORKDIR",
        help="predict the effects part's GPU time from a CPU demos/effects.py workdir; no run",
    )
    p.add_argument("--workdir", default="", help="effects runs (default: temporary, removed)")
    p.add_argument(
        "--write-docs",
        default="",
        metavar="JSON",
        help="copy a GPU run's JSON to --results-dir and its report into --docs",
    )
    p.add_argument("--docs", default=os.path.join(ROOT, "docs", "results.md"))
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.write_docs:
        if not os.path.isfile(args.write_docs):
            p.error(f"--write-docs={args.write_docs} does not exist; give a gpu_check.json.")
        return args, p
    if not args.out:
        p.error("--out is required: the folder that gpu_check.json and gpu_check.md go to.")
    parts = args.parts.split(",")
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts={args.parts} is not valid: use speed, effects or speed,effects.")
    for name in ("speed_budget_s", "effects_budget_s"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0 seconds.")
    if args.bundle:
        try:
            gpu_bundle.read_manifest(args.bundle)
        except FileNotFoundError as error:
            p.error(str(error))
    if args.predict and not os.path.isdir(os.path.join(args.predict, "runs")):
        p.error(
            f"--predict={args.predict} holds no runs folder; give the --workdir of a "
            "`python demos/effects.py` run."
        )
    if "effects" in parts and not args.predict:
        try:
            import sklearn.datasets  # noqa: F401, PLC0415  (the digits of the study)
        except ImportError:
            if args.parts != ",".join(PARTS):
                p.error(
                    "the effects part reads scikit-learn's digits, which this Python cannot "
                    "import: pip install scikit-learn, or pass --parts=speed."
                )
            # The one-call default on a device image without scikit-learn (the bundle does
            # not carry it): the speed part still runs.
            print(
                "gpu_check: scikit-learn does not import here, so the effects part (digits) "
                "is skipped; pip install scikit-learn to run it.",
                flush=True,
            )
            args.parts = "speed"
    return args, p


def _json_budget(seconds: float) -> float | None:
    return None if math.isinf(seconds) else seconds  # strict JSON has no Infinity


def main(argv=None) -> int:
    args, p = parse_args(argv)
    if args.write_docs:
        copy = write_docs(args.write_docs, args.docs, args.results_dir)
        print(f"wrote {copy} and a section of {args.docs}")
        return 0
    parts = args.parts.split(",")
    speed_sizes = DRY_SPEED if args.dry_run else SPEED
    study = effects_gpu.DRY if args.dry_run else effects_gpu.GPU
    default_budgets = (float("inf"),) * 2 if args.dry_run else DEFAULT_BUDGETS_S
    speed_budget, effects_budget = (
        default if given is None else given
        for given, default in zip(
            (args.speed_budget_s, args.effects_budget_s), default_budgets, strict=True
        )
    )

    if args.predict:
        prediction = effects_gpu.predict(study, args.predict, effects_budget)
        os.makedirs(args.out, exist_ok=True)
        text = "\n".join(effects_gpu.prediction_lines(prediction)) + "\n"
        _write_atomic(os.path.join(args.out, PREDICTION_FILE), text)
        print(text, end="")
        return 0

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the progress
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="oscqat_gpu_check_")
    # Programs that recur share their compilation through this cache (new for every command):
    # the range initialisation of speed cases of one model, batch and dtype, and the runs of
    # the study that differ only in seeds or schedules. No timed step recurs, so no step's
    # compile time is a cache hit (it includes writing its entry).
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    started = time.perf_counter()
    device = jax.devices()[0]
    data = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
            "dry_run": args.dry_run,
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "python": platform.python_version(),
            "host_cpus": os.cpu_count(),
            "installed_from_bundle": INSTALLED,
            "total_s": 0.0,
        }
    }

    def save():
        save_outputs(data, args.out, started)

    print(
        f"gpu_check: {', '.join(parts)} on {data['meta']['devices']} x {device.device_kind}"
        + (" (dry run)" if args.dry_run else ""),
        flush=True,
    )
    if "speed" in parts:
        data["speed"] = {
            **{k: v for k, v in dataclasses.asdict(speed_sizes).items() if k != "overrides"},
            "cases": [c.name for c in speed_sizes.cases],
            "budget_s": _json_budget(speed_budget),
            "records": [],
            "skipped": [],
            "errors": {},
            "targets": [],
        }
        run_speed(speed_sizes, speed_budget, data["speed"], save)
    if "effects" in parts:
        data["effects"] = {
            "settings": effects_gpu.settings_record(study),
            "budget_s": _json_budget(effects_budget),
            "results": {},
            "skipped": [],
            "errors": {},
        }
        effects_gpu.run(
            study,
            workdir,
            effects_budget,
            data["effects"],
            save,
            metrics_dir=os.path.join(args.out, "runs"),
        )
    save()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = sum(len(data[part]["errors"]) for part in parts)
    print(
        f"gpu_check: wrote {os.path.join(args.out, JSON_FILE)} and {MARKDOWN_FILE} in "
        f"{data['meta']['total_s'] / 60:.1f} min" + (f"; {failed} failed" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
