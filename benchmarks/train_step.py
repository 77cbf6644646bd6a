"""Times the project's train step (issue 5): the function ``train.py`` runs, per QAT variant.

Every case goes through the training program's own code: a ``base_config()`` with synthetic
data, ``models.forward_of`` (the package's plain model quantized by the config's rules, the
forward ``train.py`` builds), ``phases.init_variables`` and ``phases.calibrate``,
``build.optimizer``, ``step_lib.create_state`` and ``step_lib.make_train_step`` jitted
by ``Sharded.over_all_devices().jit_train_step``, fed the rows of the schedules' table: the
trainer's one step, with the trainer's options and metrics, for every variant.

    python benchmarks/train_step.py            # CPU: MobileNetV2, 32x32, batch 128, float32
    python benchmarks/train_step.py --variants=fp,freeze+dampen --steps=50
    # GPU/TPU targets of issue 5 (H100: freeze+dampen >= 3800 img/s, >= 0.75x fp, compile <= 60 s):
    python benchmarks/train_step.py --resolution=224 --dtype=bfloat16

Variants (W4A4 ``LSQ_paper`` for all but ``fp``):

- ``fp``: the float phase's step (``mode="float_train"``: the plain model, no quantizers).
- ``lsq``: plain QAT, oscillation tracking off.
- ``freeze``: tracking and freezing, threshold 0.1 -> 0.01 (cosine from the first step).
- ``dampen``: the dampening term with weight 0.01 -> 0.1 (cosine from the first step), no tracking.
- ``freeze+dampen``: both.
- ``rules``: ``freeze+dampen`` on a user's MobileNetV2 written with plain ``flax.linen``
  layers outside the package (``benchmarks/plain_mobilenet_v2.py``) and quantized by
  ``oscqat_jax.nn.quantize_model`` with the ``LSQ_paper`` rules of the config's bit widths,
  stepped by the trainer's own step through the forward ``train.py`` uses for a user's model
  (``RulesForward``, as the package's models): the same optimizer, schedules, state and
  sharding as the package's case. Issue 13 asks it to run within 5 % of ``freeze+dampen``
  and to compile no slower; the table's ``vs pkg`` column gives the step-time ratio.
- ``nnx``: the same on the MobileNetV2 written in ``flax.nnx``
  (``plain_mobilenet_v2.NNXMobileNetV2``), quantized in place by the same rules and stepped
  by the trainer's own step through the forward ``train.py`` uses for a user's NNX model
  (``NNXForward``: the graph merged with the train state's collections at each call, the
  freezing threshold a traced value).

Each case prints one JSON line: the median, min and max of ``--steps`` timed steps after
``--warmup`` untimed ones (each step ends in ``block_until_ready``), images per second, the
times to trace and lower (``lower_s``), compile and run the first step, XLA's buffer sizes
of the compiled step, the number of roundings and convolutions in the step's jaxpr, and the
peak memory: the device's ``peak_bytes_in_use`` where the backend reports it,
otherwise the process's peak resident set (``peak_memory_source`` says which). A step that
compiles more than once (a dtype, shape or sharding of the state that changes after the
first update, or a schedule value baked in as a constant) stops the run with an error.
A table of all cases follows the JSON lines. The input batch is placed on the devices once,
so the numbers exclude the host input pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence

import jax
import jax.extend
import ml_collections
import numpy as np
from flax import nnx

# Run as a script from a clone: make the repository's package (and this folder's plain
# model) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plain_mobilenet_v2 import (
    CLASSIFIER,
    FIRST_CONV,
    NNXMobileNetV2,
    PlainMobileNetV2,
)

from oscqat_jax.nn import paper_rules, quantize_model
from oscqat_jax.training import build, context, data, forward, metrics, models, phases
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.config import base_config
from oscqat_jax.training.nnx_forward import NNXForward

VARIANTS = ("fp", "lsq", "freeze", "dampen", "freeze+dampen", "rules", "nnx")
RULES_VARIANT, NNX_VARIANT, RULES_BASELINE = "rules", "nnx", "freeze+dampen"
"""The rules-quantized plain model runs the settings of ``RULES_BASELINE``."""
FREEZE_THRESHOLD = (0.1, 0.01)  # start and final value of the paper's W4 MobileNetV2 recipe
DAMPENING_WEIGHT = (0.01, 0.1)  # positive from the first step (the recipes start at 0)


def case_config(
    *,
    model: str,
    variant: str,
    resolution: int,
    batch_size: int,
    dtype: str,
    num_classes: int,
    overrides: dict | None = None,
) -> ml_collections.ConfigDict:
    """The training config of one case: ``base_config()`` with synthetic data and the variant.

    ``overrides`` maps dotted field names (``"model.width_multiplier"``) to values.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    c = base_config()
    c.data.name = "synthetic"
    c.data.image_size = resolution
    c.data.num_classes = num_classes
    c.data.num_train = batch_size  # one batch is all the benchmark reads
    c.data.batch_size = batch_size
    c.data.eval_batch_size = batch_size
    c.model.name = model
    c.model.dtype = dtype
    c.quant.setup = "LSQ_paper"
    c.quant.n_bits = 4
    if variant in (RULES_VARIANT, NNX_VARIANT):
        variant = RULES_BASELINE
    c.osc_freeze.track = variant in ("freeze", "freeze+dampen")
    if c.osc_freeze.track:
        c.osc_freeze.threshold, c.osc_freeze.threshold_final = FREEZE_THRESHOLD
        c.osc_freeze.anneal_start = 0.0
    if variant in ("dampen", "freeze+dampen"):
        c.osc_damp.weight, c.osc_damp.weight_final = DAMPENING_WEIGHT
        c.osc_damp.anneal_start = 0.0
    for key, value in (overrides or {}).items():
        group, field = key.split(".")
        c[group][field] = value
    build.validate(c)
    return c


def build_case(
    config: ml_collections.ConfigDict, variant: str, sharded: step_lib.Sharded, total: int
):
    """``(jitted_step, state, batch, table)`` of one case, set up as the trainer sets up a phase.

    ``total`` is the length of the schedules (every row differs: the rates and the freezing
    and dampening values move each step).
    """
    dataset = data.load_dataset(config.data)
    ctx = context.Context(config, "", dataset, sharded, metrics.MetricWriter("", enabled=False))
    if variant == RULES_VARIANT:
        return build_rules_case(config, ctx, dataset.num_classes, total)
    if variant == NNX_VARIANT:
        return build_nnx_case(config, ctx, dataset.num_classes, total)
    model = models.forward_of(config, dataset)  # the fp case runs it unquantized
    variables = phases.init_variables(model, ctx)
    if variant == "fp":
        opt = build.optimizer(config, phase="float", total_steps=total, steps_per_epoch=1)
        step_fn = step_lib.make_train_step(model, opt.tx, build.FLOAT_STEP)
        table = build.float_schedules(opt).table(total)
    else:
        opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=1)
        variables = phases.calibrate(ctx, model, variables)
        step_fn = step_lib.make_train_step(model, opt.tx, build.qat_step_config(config))
        table = build.qat_schedules(config, opt, total).table(total)
    state = sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(ctx.seed("qat_state")))
    )
    batch = sharded.put_batch(ctx.train_batch(0))
    return sharded.jit_train_step(step_fn), state, batch, table


def _architecture(config: ml_collections.ConfigDict) -> dict:
    """Width, blocks and compute dtype of the package's MobileNetV2 of ``config.model``
    (:func:`build.plain_model`), which this folder's copies of it take."""
    if config.model.name != "mobilenet_v2":
        raise ValueError(
            f"The {RULES_VARIANT} and {NNX_VARIANT} variants have a MobileNetV2 only; got model "
            f"{config.model.name!r} (use --models=mobilenet_v2 or drop the variants)."
        )
    package = build.plain_model(config, num_classes=1)
    return {
        "width_multiplier": package.width_multiplier,
        "block_setting": package.block_setting,
        "dtype": package.dtype,
    }


def plain_model(config: ml_collections.ConfigDict, num_classes: int) -> PlainMobileNetV2:
    """The plain-Linen MobileNetV2 of ``config.model`` (the package model's architecture)."""
    return PlainMobileNetV2(num_classes=num_classes, **_architecture(config))


def build_rules_case(config: ml_collections.ConfigDict, ctx, num_classes: int, total: int):
    """:func:`build_case` of the ``rules`` variant: the plain model quantized by the
    ``LSQ_paper`` rules, calibrated on one training batch, stepped by the trainer's own step
    (a :class:`~oscqat_jax.training.forward.RulesForward`, as ``train.py`` runs a user's
    model) with the package case's optimizer, schedules, state and sharding."""
    quantized = quantize_model(plain_model(config, num_classes), _rules(config))
    images, labels = ctx.train_batch(0)
    variables = quantized.init(jax.random.PRNGKey(ctx.seed("qat_state")), images[:1], train=False)
    variables = quantized.calibrate(variables, [images], train=False)
    opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=1)
    step_fn = step_lib.make_train_step(
        forward.RulesForward(quantized), opt.tx, build.qat_step_config(config)
    )
    table = build.qat_schedules(config, opt, total).table(total)
    sharded = ctx.sharded
    state = sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(ctx.seed("qat_state")))
    )
    batch = sharded.put_batch((images, labels))
    return sharded.jit_train_step(step_fn), state, batch, table


def _rules(config: ml_collections.ConfigDict):
    return paper_rules(
        config.quant.setup,
        n_bits=config.quant.n_bits,
        n_bits_act=config.quant.n_bits_act,
        first_conv=FIRST_CONV,
        classifier=CLASSIFIER,
        per_channel=config.quant.per_channel,
    )


def build_nnx_case(config: ml_collections.ConfigDict, ctx, num_classes: int, total: int):
    """:func:`build_case` of the ``nnx`` variant: :class:`NNXMobileNetV2` quantized in place
    by the rules of the ``rules`` variant, calibrated on one training batch and stepped by
    the trainer's own step through :class:`~oscqat_jax.training.nnx_forward.NNXForward`, the
    forward ``train.py`` gives a user's NNX model, with the ``rules`` case's optimizer,
    schedules, state and sharding."""
    options = _architecture(config)

    def make_model(rngs: nnx.Rngs) -> NNXMobileNetV2:
        return NNXMobileNetV2(
            num_classes,
            options["width_multiplier"],
            in_features=config.data.channels,
            block_setting=options["block_setting"],
            dtype=options["dtype"],
            rngs=rngs,
        )

    nnx_forward = NNXForward.create(make_model, _rules(config))
    images, labels = ctx.train_batch(0)
    key = jax.random.PRNGKey(ctx.seed("qat_state"))
    variables = nnx_forward.calibrate(nnx_forward.init(key, images[:1]), [images], key)
    opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=1)
    step_fn = step_lib.make_train_step(nnx_forward, opt.tx, build.qat_step_config(config))
    table = build.qat_schedules(config, opt, total).table(total)
    sharded = ctx.sharded
    state = sharded.replicate(step_lib.create_state(variables, opt.tx, key))
    batch = sharded.put_batch((images, labels))
    return sharded.jit_train_step(step_fn), state, batch, table


def primitive_counts(jaxpr: jax.extend.core.Jaxpr, counts: Counter | None = None) -> Counter:
    """How often each primitive occurs in ``jaxpr``, nested jaxprs (jit, custom_vjp) included.

    Counts call sites: a function traced twice counts twice, unlike its lowered text where
    JAX emits one private function per distinct signature.
    """
    counts = Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    primitive_counts(sub.jaxpr, counts)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    primitive_counts(sub, counts)
    return counts


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the largest device peak the backend reports, else the process peak RSS."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    if all(p is not None for p in peaks):
        return max(peaks), "device peak_bytes_in_use"
    # ru_maxrss is in KiB on Linux; it is the peak of the whole process up to now.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def time_case(
    config: ml_collections.ConfigDict,
    variant: str,
    sharded: step_lib.Sharded,
    *,
    steps: int,
    warmup: int,
) -> dict:
    """Compiles and times one case; returns its JSON record."""
    total = 1 + warmup + steps
    train_step, state, batch, table = build_case(config, variant, sharded, total)

    started = time.perf_counter()
    traced = train_step.trace(state, batch, step_lib.hparams_at(table, 0))
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    ops = primitive_counts(traced.jaxpr.jaxpr)

    started_first = time.perf_counter()
    state, step_metrics = train_step(state, batch, step_lib.hparams_at(table, 0))
    jax.block_until_ready((state, step_metrics))
    first_step_s = time.perf_counter() - started_first

    times = []
    for step in range(1, total):
        t0 = time.perf_counter()
        state, step_metrics = train_step(state, batch, step_lib.hparams_at(table, step))
        jax.block_until_ready((state, step_metrics))
        if step > warmup:
            times.append(time.perf_counter() - t0)
    cache_size = train_step._cache_size()
    if cache_size != 1:
        raise AssertionError(
            f"The {variant} step was compiled {cache_size} times; it must compile once and be "
            "reused after the first optimizer update (check the state's dtypes and shardings)."
        )
    loss = float(step_metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"The {variant} step's loss became {loss}.")

    median = statistics.median(times)
    peak, peak_source = peak_memory()
    return {
        "model": config.model.name,
        "variant": variant,
        "backend": jax.default_backend(),
        "devices": sharded.num_devices,
        "device_kind": jax.devices()[0].device_kind,
        "resolution": config.data.image_size,
        "batch": config.data.batch_size,
        "dtype": config.model.dtype,
        "steps": len(times),
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "images_per_s": config.data.batch_size / median,
        "lower_s": lowered_at - started,
        "compile_s": compiled_at - lowered_at,
        "first_step_s": first_step_s,
        "compiles": cache_size,
        # Each quantizer rounds once per forward; tracking adds two per tracked weight, and
        # dampening none: the layers sow its term from the forward's quantized weight.
        "round_ops": ops["round"],
        "conv_ops": ops["conv_general_dilated"],
        "xla_temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        "xla_argument_bytes": None if memory is None else int(memory.argument_size_in_bytes),
        "peak_memory_bytes": peak,
        "peak_memory_source": peak_source,
        "fast_compile": sharded.compiler_options is not None,
        "final_loss": loss,
    }


def format_table(records: Sequence[dict]) -> str:
    """The cases side by side; ``vs fp`` is the step time relative to the same model's fp
    case, ``vs pkg`` that of the ``rules`` and ``nnx`` cases relative to the package's
    ``freeze+dampen``."""

    def median_of(variant):
        return {r["model"]: r["median_step_s"] for r in records if r["variant"] == variant}

    fp, pkg = median_of("fp"), median_of(RULES_BASELINE)
    header = (
        f"{'model':<16}{'variant':<15}{'step ms':>9}{'img/s':>9}{'vs fp':>7}{'vs pkg':>8}"
        f"{'compile s':>11}{'peak MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        ratio = r["median_step_s"] / fp[r["model"]] if r["model"] in fp else float("nan")
        vs_pkg = float("nan")
        if r["variant"] in (RULES_VARIANT, NNX_VARIANT) and r["model"] in pkg:
            vs_pkg = r["median_step_s"] / pkg[r["model"]]
        lines.append(
            f"{r['model']:<16}{r['variant']:<15}{1e3 * r['median_step_s']:>9.1f}"
            f"{r['images_per_s']:>9.0f}{ratio:>7.2f}{vs_pkg:>8.2f}"
            f"{r['lower_s'] + r['compile_s']:>11.1f}{r['peak_memory_bytes'] / 2**20:>10.0f}"
        )
    sources = sorted({r["peak_memory_source"] for r in records})
    lines.append(
        f"peak memory: {', '.join(sources)}; compile s = lower + compile of the first step"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobilenet_v2", help="comma-separated model names")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {VARIANTS}")
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument(
        "--resolution", type=int, default=32 if on_cpu else 224, help="image side, pixels"
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument(
        "--fast_compile",
        action="store_true",
        help="CPU only: step.FAST_COMPILE (faster compiles, much slower steps; for smoke tests)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0.")
    return args


def main(argv: Sequence[str] | None = None, *, overrides: dict | None = None) -> list[dict]:
    """Runs every model x variant case; prints the JSON lines and the table, returns the records.

    ``overrides`` are further config fields for every case (dotted names, e.g.
    ``{"model.block_setting": ((1, 8, 1, 1),)}``).
    """
    args = parse_args(argv)
    sharded = step_lib.Sharded.over_all_devices(fast_compile=args.fast_compile)
    records = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            config = case_config(
                model=model,
                variant=variant,
                resolution=args.resolution,
                batch_size=args.batch,
                dtype=args.dtype,
                num_classes=args.num_classes,
                overrides={"model.width_multiplier": args.width, **(overrides or {})},
            )
            record = time_case(config, variant, sharded, steps=args.steps, warmup=args.warmup)
            print(json.dumps(record), flush=True)
            records.append(record)
    print(format_table(records))
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
