"""The training program: float warm-up (optional), range initialisation, QAT, evaluation.

``train_and_evaluate(config, workdir)`` runs a whole experiment and returns its summary;
``evaluate_checkpoint(config, workdir)`` evaluates the newest checkpoint. Re-running the same
command in the same workdir resumes from the newest complete checkpoint (the float model of
the warm-up phase is cached there too).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oscqat_jax import models, oscillation, schedules
from oscqat_jax.nn import collect
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import QuantSetup
from oscqat_jax.training import checkpoint, data, metrics, optim, plots
from oscqat_jax.training import config as config_lib
from oscqat_jax.training import step as step_lib


def quant_setup(config: ml_collections.ConfigDict, *, quantize: bool = True) -> QuantSetup:
    """The :class:`QuantSetup` of ``config.quant`` (or the float setup)."""
    q = config.quant
    return QuantSetup(
        name=q.setup if quantize else "float",
        n_bits=q.n_bits,
        n_bits_act=q.n_bits_act,
        per_channel=q.per_channel,
        weight_range_method=q.weight_range,
        act_range_method=q.act_range,
        grad_scale=q.grad_scale,
        max_bits=config.osc_freeze.max_bits,
        # Weight-only quantization: every activation quantizer stays in float.
        overrides=() if q.quantize_activations else (("*", None, "float"),),
    )


def model_options(config: ml_collections.ConfigDict) -> dict:
    """``create_model``'s options (besides name, classes and quant setup) of ``config.model``."""
    options = {
        "width_multiplier": config.model.width_multiplier,
        "fold_bn": config.model.fold_bn,
        "dtype": jnp.bfloat16 if config.model.dtype == "bfloat16" else None,
    }
    if config.model.block_setting is not None:
        options["block_setting"] = tuple(tuple(b) for b in config.model.block_setting)
    return options


def build_model(config: ml_collections.ConfigDict, num_classes: int, *, quantize: bool = True):
    """The model of ``config.model`` with the config's quant setup (or none)."""
    return models.create_model(
        config.model.name,
        num_classes=num_classes,
        quant_setup=quant_setup(config, quantize=quantize),
        **model_options(config),
    )


def run_metadata(config: ml_collections.ConfigDict, phase: str) -> dict:
    """What a checkpoint of ``phase`` must agree on with the config that resumes it."""
    meta = {
        "phase": phase,
        "model": config.model.name,
        "width_multiplier": float(config.model.width_multiplier),
        "block_setting": None
        if config.model.block_setting is None
        else [list(b) for b in config.model.block_setting],
        "fold_bn": bool(config.model.fold_bn),
        "data": config.data.name,
        "image_size": int(config.data.image_size),
    }
    if phase == "qat":
        meta.update(
            quant_setup=config.quant.setup,
            n_bits=int(config.quant.n_bits),
            n_bits_act=config.quant.n_bits_act,
            per_channel=bool(config.quant.per_channel),
        )
    else:
        meta.update(epochs=int(config.float_train.epochs), seed=int(config.seed))
    return meta


@dataclasses.dataclass
class Context:
    """What the phases of one run share."""

    config: ml_collections.ConfigDict
    workdir: str
    source: data.Source
    sharded: step_lib.Sharded
    writer: metrics.MetricWriter

    def train_batches(self, start_step: int, seed_offset: int = 0):
        """This process's rows of the global training batches from ``start_step`` on."""
        return self.source.train_batches(
            start_step,
            batch_size=self.config.data.batch_size,
            seed=self.config.seed + seed_offset,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def train_batch(self, step: int, seed_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the global training batch of ``step`` alone."""
        return next(self.train_batches(step, seed_offset))

    def eval_batches(self):
        """This process's rows of the padded validation batches ``(images, labels, mask)``."""
        return self.source.eval_batches(
            batch_size=self.config.data.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


def _check_batch_sizes(config, sharded: step_lib.Sharded) -> None:
    for field in ("batch_size", "eval_batch_size"):
        size = config.data[field]
        if size % sharded.num_devices:
            raise ValueError(
                f"config.data.{field} = {size} does not divide over {sharded.num_devices} "
                "devices; use a multiple of the device count."
            )


def init_variables(model, ctx: Context) -> dict:
    """Model variables initialised on a dummy batch (float mode, replicated)."""
    images = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
    init = jax.jit(
        lambda key: model.init(key, images, QuantContext.create("float_eval")),
        compiler_options=ctx.sharded.compiler_options,
    )
    variables = init(jax.random.PRNGKey(ctx.config.seed))
    return ctx.sharded.replicate(jax.tree_util.tree_map(jnp.asarray, dict(variables)))


def evaluate(ctx: Context, eval_fn: Callable, variables: dict) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean loss over the validation split."""
    totals = None
    for batch in ctx.eval_batches():
        sums = eval_fn(variables, ctx.sharded.put_batch(batch))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    count = float(totals["count"])
    return {
        "top1": 100.0 * float(totals["top1"]) / count,
        "top5": 100.0 * float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
    }


def reestimate_bn(ctx: Context, bn_fn: Callable, variables: dict) -> dict:
    """BatchNorm statistics re-estimated on ``eval.bn_batches`` training batches (SPEC §8)."""
    batches = ctx.train_batches(0, seed_offset=10_007)
    per_batch = [
        bn_fn(variables, ctx.sharded.put_batch(next(batches)[0]))
        for _ in range(ctx.config.eval.bn_batches)
    ]
    return ctx.sharded.replicate(collect.reestimated_batch_stats(per_batch))


class _Pending:
    """Step metrics kept on device until the next flush (no host sync every step)."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def add(self, step: int, step_metrics: dict) -> None:
        self.rows.append((step, step_metrics))

    def flush(self, last_good: int | None, workdir: str) -> dict[str, float]:
        """Fetches the metrics, stops on a non-finite loss, returns the interval's means."""
        rows = [(s, jax.device_get(m)) for s, m in self.rows]
        self.rows = []
        for s, m in rows:
            if not np.isfinite(m["loss"]):
                kept = (
                    f"the last good checkpoint (step {last_good}) in {workdir} is kept"
                    if last_good is not None
                    else "no checkpoint was written"
                )
                raise FloatingPointError(
                    f"The training loss became {float(m['loss'])} at step {s}; stopping ({kept})."
                )
        if not rows:
            return {}
        return {k: float(np.mean([m[k] for _, m in rows])) for k in rows[-1][1]}


def _train_phase(
    ctx: Context,
    *,
    model,
    state: step_lib.TrainState,
    train_step: Callable,
    table: dict[str, np.ndarray],
    total_steps: int,
    prefix: str,
    ckpt: checkpoint.Checkpointer | None,
    on_epoch_end: Callable[[int, step_lib.TrainState], step_lib.TrainState] | None,
    stop_at: int = 0,
) -> tuple[step_lib.TrainState, bool]:
    """Runs ``train_step`` from ``state.step`` to ``total_steps`` (or ``stop_at``) with logging
    and checkpoints; returns the state and whether the phase is complete."""
    per_epoch = data.steps_per_epoch(ctx.source, ctx.config.data.batch_size)
    log_every = ctx.config.train.log_every
    pending = _Pending()
    start = int(state.step)
    last_good = start if ckpt is not None and ckpt.latest_step() is not None else None
    bar = metrics.progress_bar(total_steps, desc=prefix, initial=start)
    try:
        batches = ctx.train_batches(start)
        for step in range(start, total_steps):
            batch = ctx.sharded.put_batch(next(batches))
            state, step_metrics = train_step(state, batch, step_lib.hparams_at(table, step))
            pending.add(step + 1, step_metrics)
            done = step + 1
            end_of_epoch = done % per_epoch == 0 or done == total_steps
            stopping = done == stop_at and done < total_steps
            save = ckpt is not None and (
                done % ctx.config.train.checkpoint_every == 0 or done == total_steps or stopping
            )
            if done % log_every == 0 or end_of_epoch or save:
                means = pending.flush(last_good, ctx.workdir)
                if "osc/oscillating" in means:
                    groups = _oscillation_groups(state, ctx.config.train.osc_level)
                    means.update({f"osc/{k}": v for k, v in groups.items()})
                means.update({f"data/{k}": v for k, v in ctx.source.stats().items()})
                ctx.writer.write(done, means, prefix=prefix)
                bar.set_postfix(loss=f"{means['loss']:.3f}")
            bar.update(1)
            if end_of_epoch:
                epoch = -(-done // per_epoch)
                osc = (
                    f", oscillating {100 * means['osc/oscillating']:.2f} %"
                    if "osc/oscillating" in means
                    else ""
                )
                bar.write(
                    f"{prefix} epoch {epoch}: loss {means['loss']:.4f}, "
                    f"batch top-1 {100 * means['top1']:.1f} %{osc}"
                )
                if on_epoch_end is not None:
                    state = on_epoch_end(epoch, state)
            if save:
                ckpt.save(done, state, force=True)
                last_good = done
            if stopping:
                bar.close()
                return state, False
        bar.close()
        return state, True
    except BaseException:
        # A checkpoint still being written (e.g. the last good one before a NaN) is
        # completed before the error reaches the user.
        if ckpt is not None:
            ckpt.wait()
        raise


def float_phase(ctx: Context, variables: dict) -> dict:
    """Trains the float model for ``float_train.epochs`` (or loads it from the workdir cache)."""
    config = ctx.config
    model = build_model(config, ctx.source.num_classes, quantize=False)
    per_epoch = data.steps_per_epoch(ctx.source, config.data.batch_size)
    total = config.float_train.epochs * per_epoch
    opt = optim.create_optimizer(
        config.float_train.optimizer,
        total_steps=total,
        steps_per_epoch=per_epoch,
        train_quantizers=False,
    )
    state = ctx.sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(config.seed + 1))
    )
    cache = checkpoint.Checkpointer(
        os.path.join(ctx.workdir, "float_model"),
        metadata=run_metadata(config, "float"),
        max_to_keep=1,
    )
    if cache.latest_step() == total:
        print(f"Float model: loaded from {cache.directory} (trained for {total} steps).")
        state = cache.restore(state)
    else:
        step_fn = step_lib.make_train_step(
            model, opt.tx, step_lib.StepConfig(mode="float_train", track=False)
        )
        table = step_lib.Schedules(opt.model_lr, opt.quant_lr, schedules.constant(0.0)).table(total)
        state, _ = _train_phase(
            ctx,
            model=model,
            state=state,
            train_step=ctx.sharded.jit_train_step(step_fn),
            table=table,
            total_steps=total,
            prefix="float",
            ckpt=None,
            on_epoch_end=None,
        )
        cache.save(total, state, force=True)
        cache.wait()
    cache.close()
    return dict(variables, params=state.params, batch_stats=state.batch_stats)


def qat_schedules(config, opt: optim.Optimizer, total: int) -> step_lib.Schedules:
    """Learning rates, freezing threshold (SPEC §6) and dampening weight (SPEC §7) of QAT."""
    freeze = config.osc_freeze
    damp = config.osc_damp
    threshold = schedules.freeze_threshold_schedule(
        freeze.threshold, freeze.threshold_final, total, freeze.anneal_start
    )
    weight = None
    if damp.weight is not None:
        weight = schedules.dampening_weight_schedule(
            damp.weight, damp.weight_final, total, damp.anneal_start
        )
    return step_lib.Schedules(opt.model_lr, opt.quant_lr, threshold, weight)


def qat_step_config(config: ml_collections.ConfigDict) -> step_lib.StepConfig:
    """The static settings of the QAT train step for ``config``."""
    return step_lib.StepConfig(
        mode="train",
        track=config.osc_freeze.track,
        dampen=config.osc_damp.weight is not None,
        osc_momentum=config.osc_freeze.ema_momentum,
        use_ema_freeze=config.osc_freeze.use_ema,
        dampening_aggregation=config.osc_damp.aggregation,
        osc_level=config.train.osc_level,
    )


def calibrate(ctx: Context, model, variables: dict) -> dict:
    """Quantizer variables added to (float) ``variables`` and their ranges initialised on
    ``quant.num_est_batches`` training batches (SPEC §3)."""
    fn = jax.jit(step_lib.make_calibrate_step(model), compiler_options=ctx.sharded.compiler_options)
    key = jax.random.PRNGKey(ctx.config.seed + 3)
    batches = ctx.train_batches(0, seed_offset=20_011)
    for _ in range(ctx.config.quant.num_est_batches):
        images = ctx.sharded.put_batch(next(batches)[0])
        variables = fn(variables, images, key)
    return ctx.sharded.replicate(variables)


def _oscillation_groups(state: step_lib.TrainState, level: float) -> dict[str, float]:
    """Fractions oscillating/frozen overall, in depth-wise and in other layers, and per layer."""
    states = collect.oscillation_states(state.oscillation)
    out = {}
    groups = {
        "depthwise": [s for p, s in states.items() if "depthwise" in p],
        "pointwise": [s for p, s in states.items() if "depthwise" not in p],
    }
    for name, members in groups.items():
        if members:
            summary = jax.device_get(oscillation.summary(members, level))
            out[f"oscillating/{name}"] = float(summary["oscillating"])
            out[f"frozen/{name}"] = float(summary["frozen"])
    return out


def qat_phase(ctx: Context, variables: dict, summary: dict) -> step_lib.TrainState:
    """Range initialisation of the float ``variables``, then QAT with per-epoch evaluation
    before and after BN re-estimation."""
    config = ctx.config
    model = build_model(config, ctx.source.num_classes)
    per_epoch = data.steps_per_epoch(ctx.source, config.data.batch_size)
    total = config.train.epochs * per_epoch
    opt = optim.create_optimizer(
        config.optimizer, total_steps=total, steps_per_epoch=per_epoch, train_quantizers=True
    )
    variables = calibrate(ctx, model, variables)
    state = ctx.sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(config.seed + 2))
    )
    ckpt = checkpoint.Checkpointer(
        os.path.join(ctx.workdir, "checkpoints"),
        metadata=run_metadata(config, "qat"),
        max_to_keep=config.train.keep_checkpoints,
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        print(f"Resuming QAT from step {int(state.step)} of {total} ({ckpt.directory}).")

    eval_fn = ctx.sharded.jit_batch_fn(step_lib.make_eval_step(model, "eval"))
    bn_fn = ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(model))
    summary["qat_before_training"] = evaluate(ctx, eval_fn, state.variables)["top1"]

    def on_epoch_end(epoch: int, state: step_lib.TrainState) -> step_lib.TrainState:
        if epoch % config.eval.every_epochs and epoch != config.train.epochs:
            return state
        pre = evaluate(ctx, eval_fn, state.variables)
        row = {"epoch": epoch, "top1_pre_bn": pre["top1"], "top5_pre_bn": pre["top5"]}
        record = {f"{k}_pre_bn": v for k, v in pre.items()}
        if config.eval.bn_reestimate:
            # As the reference, the re-estimated statistics replace the running ones.
            state = state.replace(batch_stats=reestimate_bn(ctx, bn_fn, state.variables))
            post = evaluate(ctx, eval_fn, state.variables)
            row.update(top1_post_bn=post["top1"], top5_post_bn=post["top5"])
            record.update({f"{k}_post_bn": v for k, v in post.items()})
        if state.oscillation:
            record.update(_oscillation_groups(state, config.train.osc_level))
            per_layer = collect.oscillation_summary(state.oscillation, config.train.osc_level)
            for path, s in per_layer["per_layer"].items():
                record[f"layer/{path}/oscillating"] = float(s["oscillating"])
                record[f"layer/{path}/frozen"] = float(s["frozen"])
        record.update(_scales(state.params))
        ctx.writer.write(int(state.step), record, prefix="eval")
        post_text = f", post-BN {row['top1_post_bn']:.2f} %" if "top1_post_bn" in row else ""
        print(f"qat epoch {epoch}: validation top-1 pre-BN {row['top1_pre_bn']:.2f} %{post_text}")
        return state

    step_fn = step_lib.make_train_step(
        model,
        opt.tx,
        qat_step_config(config),
    )
    state, complete = _train_phase(
        ctx,
        model=model,
        state=state,
        train_step=ctx.sharded.jit_train_step(step_fn),
        table=qat_schedules(config, opt, total).table(total),
        total_steps=total,
        prefix="qat",
        ckpt=ckpt,
        on_epoch_end=on_epoch_end,
        stop_at=config.train.stop_at_step,
    )
    ckpt.wait()
    ckpt.close()
    if not complete:
        print(
            f"Stopped at step {int(state.step)} of {total} as asked (train.stop_at_step); "
            "run the same command without it to resume."
        )
        return state
    _finish(ctx, state, summary, per_epoch)
    return state


def _history(workdir: str, per_epoch: int) -> tuple[list[dict], list[dict]]:
    """Per-epoch evaluations and the oscillation curve of the QAT phase, read back from
    ``metrics.jsonl`` so that a resumed run reports its whole history (the newest record
    of a step wins: a resumed run logs again the steps after its checkpoint)."""
    rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
    evals, curve = {}, {}
    for r in rows:
        if "eval/top1_pre_bn" in r:
            evals[r["step"]] = {
                "epoch": -(-r["step"] // per_epoch),
                "top1_pre_bn": r["eval/top1_pre_bn"],
                "top1_post_bn": r.get("eval/top1_post_bn"),
            }
        if "qat/osc/oscillating" in r:
            curve[r["step"]] = {
                "step": r["step"],
                **{k.removeprefix("qat/osc/"): v for k, v in r.items() if k.startswith("qat/osc/")},
            }
    return [evals[k] for k in sorted(evals)], [curve[k] for k in sorted(curve)]


def _finish(ctx: Context, state, summary: dict, per_epoch: int) -> None:
    """Fills the summary and writes the plots (process 0, which writes the metrics)."""
    if not ctx.writer.enabled:
        return
    epochs_log, osc_history = _history(ctx.workdir, per_epoch)
    if epochs_log:
        summary["qat_pre_bn"] = epochs_log[-1]["top1_pre_bn"]
        summary["qat_post_bn"] = epochs_log[-1]["top1_post_bn"]
        plots.plot_accuracy(
            [{k: v for k, v in e.items() if v is not None} for e in epochs_log],
            os.path.join(ctx.workdir, "accuracy.png"),
        )
    if osc_history:
        summary["oscillating_peak"] = max(r["oscillating"] for r in osc_history)
        summary["oscillating_end"] = osc_history[-1]["oscillating"]
        summary["frozen_end"] = osc_history[-1]["frozen"]
        plots.plot_oscillations(osc_history, os.path.join(ctx.workdir, "oscillations.png"))
    if state.oscillation:
        distances = [
            plots.threshold_distance(
                np.asarray(_subtree(state.params, path)["kernel"]),
                np.asarray(_subtree(state.params, path)["weight_scale"]),
            ).ravel()
            for path in collect.oscillation_states(state.oscillation)
        ]
        plots.plot_threshold_distance(
            np.concatenate(distances),
            os.path.join(ctx.workdir, "threshold_distance.png"),
            title="Distance to the rounding threshold (tracked weights)",
        )


def _scales(params: dict) -> dict[str, float]:
    """Every quantizer scale (mean over channels when per channel), keyed ``scale/<path>``."""
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {
        "scale/" + "/".join(str(getattr(k, "key", k)) for k in path): float(np.mean(value))
        for path, value in flat
        if str(getattr(path[-1], "key", "")).endswith("_scale")
    }


def _subtree(tree: dict, path: str) -> dict:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins the multi-host run described by ``config.distributed``, if any.

    Must run before anything touches a device. With a coordinator address every process
    passes it with the process count and its own id; with ``auto`` the platform (TPU pod,
    SLURM, ...) supplies them. A single-host run does nothing.
    """
    d = config.distributed
    if not (d.coordinator_address or d.auto):
        return
    if jax.distributed.is_initialized():
        return
    if d.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address,
            num_processes=d.num_processes,
            process_id=d.process_id,
        )
    else:
        jax.distributed.initialize()


def _open(config: ml_collections.ConfigDict, workdir: str, *, write_metrics: bool) -> Context:
    """Validates the config, joins the cluster, opens the data and the mesh of all devices."""
    config_lib.validate(config)
    initialize_distributed(config)
    source = data.load_dataset(config.data)
    if write_metrics:
        os.makedirs(workdir, exist_ok=True)
    sharded = step_lib.Sharded.over_all_devices(fast_compile=config.train.fast_compile)
    _check_batch_sizes(config, sharded)
    writer = metrics.MetricWriter(workdir, enabled=write_metrics and jax.process_index() == 0)
    return Context(config, workdir, source, sharded, writer)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the experiment of ``config`` in ``workdir``; returns the summary shown at the end."""
    started = time.time()
    ctx = _open(config, workdir, write_metrics=True)
    source = ctx.source
    print(
        f"{config.model.name} (width {config.model.width_multiplier}) on {source.name}: "
        f"{source.num_train} training / {source.num_val} validation images, "
        f"{ctx.sharded.num_devices} device(s) in {jax.process_count()} process(es)."
    )
    float_model = build_model(config, source.num_classes, quantize=False)
    variables = init_variables(float_model, ctx)
    if config.model.pretrained:
        from oscqat_jax import convert

        variables = ctx.sharded.replicate(
            convert.load_pretrained(
                config.model.pretrained,
                float_model,
                variables,
                layout=config.model.pretrained_layout,
            )
        )
    if config.float_train.epochs:
        variables = float_phase(ctx, variables)
    float_eval = ctx.sharded.jit_batch_fn(step_lib.make_eval_step(float_model, "float_eval"))
    summary: dict = {"float": evaluate(ctx, float_eval, variables)["top1"]}
    print(f"Float model: top-1 {summary['float']:.2f} %")
    qat_phase(ctx, variables, summary)
    summary.update({f"data/{k}": v for k, v in source.stats().items()})
    summary["wall_time_s"] = time.time() - started
    ctx.writer.close()
    source.close()
    if jax.process_index() == 0:
        print(metrics.format_table(summary_rows(summary), title="Summary"))
    return summary


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The final table's rows."""

    def pct(key):
        value = summary.get(key)
        return "-" if value is None else f"{value:.2f} %"

    def frac(key):
        value = summary.get(key)
        return "-" if value is None else f"{100 * value:.2f} %"

    return [
        ("float accuracy (top-1)", pct("float")),
        ("QAT accuracy before BN re-estimation", pct("qat_pre_bn")),
        ("QAT accuracy after BN re-estimation", pct("qat_post_bn")),
        ("weights oscillating, peak during training", frac("oscillating_peak")),
        ("weights oscillating at the end", frac("oscillating_end")),
        ("weights frozen at the end", frac("frozen_end")),
        ("wall time", f"{summary.get('wall_time_s', 0.0):.0f} s"),
    ]


def _checkpoint_location(workdir: str, checkpoint_path: str) -> tuple[str, int | None]:
    """The checkpoint directory and step named by ``--checkpoint`` (or the workdir's newest)."""
    if not checkpoint_path:
        return os.path.join(workdir, "checkpoints"), None
    path = os.path.abspath(checkpoint_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--checkpoint={checkpoint_path} does not exist; pass a run's checkpoints directory "
            "(its newest step is used) or one step inside it (checkpoints/<step>)."
        )
    name = os.path.basename(path.rstrip(os.sep))
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def restore_qat_state(ctx: Context, checkpoint_path: str = ""):
    """The QAT model and its train state restored from a checkpoint (``checkpoint_path``: a
    checkpoints directory or one ``<step>`` in it; empty for the workdir's newest)."""
    config = ctx.config
    directory, step = _checkpoint_location(ctx.workdir, checkpoint_path)
    ckpt = checkpoint.Checkpointer(directory, metadata=run_metadata(config, "qat"))
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"No QAT checkpoint in {directory}; train first, or pass the --workdir of a run "
            "or --checkpoint=<its checkpoints directory>."
        )
    model = build_model(config, ctx.source.num_classes)
    per_epoch = data.steps_per_epoch(ctx.source, config.data.batch_size)
    opt = optim.create_optimizer(
        config.optimizer,
        total_steps=config.train.epochs * per_epoch,
        steps_per_epoch=per_epoch,
        train_quantizers=True,
    )
    # The variable layout the checkpoint was written with, without computing anything.
    float_model = build_model(config, ctx.source.num_classes, quantize=False)
    key = jax.random.PRNGKey(0)
    images = jax.ShapeDtypeStruct((1, *ctx.source.image_shape), jnp.float32)
    float_variables = jax.eval_shape(
        lambda k, x: dict(float_model.init(k, x, QuantContext.create("float_eval"))), key, images
    )
    template = jax.eval_shape(step_lib.make_calibrate_step(model), float_variables, images, key)
    abstract = jax.eval_shape(
        lambda t: step_lib.create_state(t, opt.tx, jax.random.PRNGKey(0)), template
    )
    replicated = ctx.sharded.replicated
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    state = ckpt.restore(abstract, step=step)
    ckpt.close()
    print(f"Restored step {int(state.step)} from {directory}.")
    return model, state


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = ""
) -> dict:
    """Top-1/top-5 of a QAT checkpoint (the workdir's newest unless ``checkpoint_path`` names
    one), before and after BN re-estimation, on the config's validation data."""
    ctx = _open(config, workdir, write_metrics=False)
    model, state = restore_qat_state(ctx, checkpoint_path)
    eval_fn = ctx.sharded.jit_batch_fn(step_lib.make_eval_step(model, "eval"))
    pre = evaluate(ctx, eval_fn, state.variables)
    result = {"step": int(state.step), **{f"{k}_pre_bn": v for k, v in pre.items()}}
    if config.eval.bn_reestimate:
        bn_fn = ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(model))
        variables = dict(state.variables, batch_stats=reestimate_bn(ctx, bn_fn, state.variables))
        result.update({f"{k}_post_bn": v for k, v in evaluate(ctx, eval_fn, variables).items()})
    ctx.source.close()
    if jax.process_index() == 0:
        rows = [(k, f"{v:.4g}") for k, v in result.items()]
        print(metrics.format_table(rows, title="Evaluation"))
    return result


def export_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, output: str, checkpoint_path: str = ""
) -> dict:
    """Writes the integer model of a QAT checkpoint to ``output`` (``.safetensors`` or
    ``.npz``, see :mod:`oscqat_jax.export`); returns its manifest.

    The BN statistics exported are the re-estimated ones when ``eval.bn_reestimate`` is set
    (as the final evaluation of training uses them), else the checkpoint's running ones.
    """
    from oscqat_jax import export

    export.check_suffix(output)  # before any work
    ctx = _open(config, workdir, write_metrics=False)
    model, state = restore_qat_state(ctx, checkpoint_path)
    variables = state.variables
    if config.eval.bn_reestimate:
        bn_fn = ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(model))
        variables = dict(variables, batch_stats=reestimate_bn(ctx, bn_fn, variables))
    ctx.source.close()
    manifest = None
    if jax.process_index() == 0:
        manifest = export.export_model(
            output,
            jax.device_get(variables),
            model_name=config.model.name,
            num_classes=ctx.source.num_classes,
            quant_setup=quant_setup(config),
            input_shape=ctx.source.image_shape,
            **model_options(config),
        )
        size = os.path.getsize(output)
        print(
            f"Exported step {int(state.step)} to {output} ({size / 2**20:.2f} MiB, "
            f"{len(manifest['weights'])} quantized layers)."
        )
    return manifest
