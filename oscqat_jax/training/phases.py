"""The phases of a run: float training (or its cache), range initialisation, QAT, and the
restore of a QAT checkpoint for evaluation or export."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from oscqat_jax.training import build, checkpoint, fingerprint, loop, reports
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context
from oscqat_jax.training.evaluation import Evaluator
from oscqat_jax.training.forward import Forward


def init_variables(forward: Forward, ctx: Context) -> dict:
    """The float model's variables of ``forward`` (:mod:`.forward`) initialised on a dummy
    batch (replicated)."""
    images = jnp.zeros((1, *ctx.source.image_shape), jnp.float32)
    init = jax.jit(
        lambda key: forward.init(key, images), compiler_options=ctx.sharded.compiler_options
    )
    variables = init(jax.random.PRNGKey(ctx.config.seed))
    return ctx.sharded.replicate(jax.tree_util.tree_map(jnp.asarray, dict(variables)))


def float_phase(ctx: Context, variables: dict) -> dict:
    """Trains the float model for ``float_train.epochs`` (or loads it from the workdir cache)."""
    config = ctx.config
    per_epoch = ctx.steps_per_epoch
    total = config.float_train.epochs * per_epoch
    opt = build.optimizer(config, phase="float", total_steps=total, steps_per_epoch=per_epoch)
    state = ctx.sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(ctx.seed("float_state")))
    )
    cache = _float_cache(ctx)
    restored = None
    if cache.latest_step() == total:
        try:
            restored = cache.restore(state)
            print(f"Float model: loaded from {cache.directory} (trained for {total} steps).")
        except checkpoint.UnreadableCheckpointError as err:
            cache = _move_float_cache_aside(ctx, cache, err)
    if restored is not None:
        state = restored
    else:
        step_fn = step_lib.make_train_step(ctx.forward, opt.tx, build.FLOAT_STEP)
        state, _ = loop.train_phase(
            ctx,
            state=state,
            step_fn=step_fn,
            table=build.float_schedules(opt).table(total),
            total_steps=total,
            prefix="float",
            ckpt=None,
            on_epoch_end=None,
        )
        cache.save(total, state, force=True)
        cache.wait()
    cache.close()
    return dict(variables, params=state.params, batch_stats=state.batch_stats)


def _float_cache(ctx: Context) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(
        os.path.join(ctx.workdir, "float_model"),
        metadata=fingerprint.run_metadata(ctx.config, "float", ctx.source.num_classes),
        max_to_keep=1,
    )


def _move_float_cache_aside(ctx: Context, cache, err: Exception) -> checkpoint.Checkpointer:
    """A damaged float-model cache is kept beside the workdir's cache and trained again."""
    cache.close()
    aside = f"{cache.directory}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
        os.rename(cache.directory, aside)
        print(
            f"The cached float model cannot be read ({err}); moved it to {aside} and training it again."
        )
    multihost_utils.sync_global_devices("oscqat_jax_float_cache_moved_aside")
    return _float_cache(ctx)


def calibrate(ctx: Context, forward: Forward, variables: dict) -> dict:
    """Quantizer variables of ``forward`` added to (float) ``variables`` and their ranges
    initialised on ``quant.num_est_batches`` training batches (docs/method.md §3)."""
    key = jax.random.PRNGKey(ctx.seed("calibration_init"))
    variables = forward.calibrate(
        variables, _calibration_images(ctx), key, ctx.sharded.compiler_options
    )
    return ctx.sharded.replicate(variables)


def _calibration_images(ctx: Context):
    """The ``quant.num_est_batches`` image batches of range initialisation, on the devices."""
    batches = ctx.train_batches(0, stream="calibration_batches")
    for _ in range(ctx.config.quant.num_est_batches):
        yield ctx.sharded.put_batch(next(batches)[0])


def _qat_checkpointer(ctx: Context) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(
        os.path.join(ctx.workdir, "checkpoints"),
        metadata=fingerprint.run_metadata(ctx.config, "qat", ctx.source.num_classes),
        max_to_keep=ctx.config.train.keep_checkpoints,
    )


def qat_phase(ctx: Context, variables: dict, summary: dict) -> step_lib.TrainState:
    """Range initialisation of the float ``variables``, then QAT with per-epoch evaluation
    before and after BN re-estimation."""
    config = ctx.config
    model = ctx.forward
    per_epoch = ctx.steps_per_epoch
    total = config.train.epochs * per_epoch
    opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=per_epoch)
    variables = calibrate(ctx, model, variables)
    state = ctx.sharded.replicate(
        step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(ctx.seed("qat_state")))
    )
    ckpt = _qat_checkpointer(ctx)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        print(f"Resuming QAT from step {int(state.step)} of {total} ({ckpt.directory}).")

    evaluator = Evaluator.create(ctx, model)
    summary["qat_before_training"] = evaluator.evaluate(state.variables)["top1"]

    def on_epoch_end(epoch: int, state: step_lib.TrainState) -> step_lib.TrainState:
        if epoch % config.eval.every_epochs and epoch != config.train.epochs:
            return state
        state, record = evaluator.epoch_record(state)
        ctx.writer.write(int(state.step), record, prefix="eval")
        reports.print_epoch_evaluation(epoch, record)
        return state

    step_fn = step_lib.make_train_step(model, opt.tx, build.qat_step_config(config))
    try:
        state, complete = loop.train_phase(
            ctx,
            state=state,
            step_fn=step_fn,
            table=build.qat_schedules(config, opt, total).table(total),
            total_steps=total,
            prefix="qat",
            ckpt=ckpt,
            on_epoch_end=on_epoch_end,
            stop_at=config.train.stop_at_step,
        )
        ckpt.wait()
    finally:
        ckpt.close()  # on every exit path: orbax's threads must not outlive the run
    if not complete:
        print(
            f"Stopped at step {int(state.step)} of {total} as asked (train.stop_at_step); "
            "run the same command without it to resume."
        )
        return state
    reports.finish(ctx, state, summary)
    return state


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
    """The QAT model's forward and its train state restored from a checkpoint (``checkpoint_path``: a
    checkpoints directory or one ``<step>`` in it; empty for the workdir's newest)."""
    config = ctx.config
    directory, step = _checkpoint_location(ctx.workdir, checkpoint_path)
    missing = (
        f"No QAT checkpoint in {directory}; train first, or pass the --workdir of a run "
        "or --checkpoint=<its checkpoints directory>."
    )
    if not os.path.isdir(directory):  # opening a Checkpointer would create it
        raise FileNotFoundError(missing)
    ckpt = checkpoint.Checkpointer(
        directory, metadata=fingerprint.run_metadata(config, "qat", ctx.source.num_classes)
    )
    if ckpt.latest_step() is None:
        ckpt.close()
        raise FileNotFoundError(missing)
    model = ctx.forward
    per_epoch = ctx.steps_per_epoch
    opt = build.optimizer(
        config, phase="qat", total_steps=config.train.epochs * per_epoch, steps_per_epoch=per_epoch
    )
    # The variable layout the checkpoint was written with (abstractly for the package's
    # models; an own model's range estimators appear only with one calibration batch).
    template = model.template(
        jax.random.PRNGKey(0), ctx.source.image_shape, lambda: _first_calibration_batch(ctx)
    )
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


def _first_calibration_batch(ctx: Context) -> jax.Array:
    return next(_calibration_images(ctx))
