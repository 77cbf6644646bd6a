"""The entry points of the training program: train (float warm-up, range initialisation,
QAT, evaluation), evaluate a checkpoint, export a checkpoint's integer model.

``train_and_evaluate(config, workdir)`` runs a whole experiment and returns its summary;
``evaluate_checkpoint(config, workdir)`` evaluates the newest checkpoint and
``export_checkpoint(config, workdir, output)`` writes its integer model (native or ONNX).
Re-running the same command in the same workdir resumes from the newest complete checkpoint
(the float model of the warm-up phase is cached there too). The work itself lives in :mod:`.build` (config to
objects), :mod:`.context` (opening a run), :mod:`.phases`, :mod:`.loop`, :mod:`.evaluation`
and :mod:`.reports`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections

from oscqat_jax.training import evaluation, metrics, phases, reports
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context, close_run, open_run
from oscqat_jax.training.evaluation import Evaluator
from oscqat_jax.training.nnx_forward import NNXForward


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the experiment of ``config`` in ``workdir``; returns the summary shown at the end."""
    started = time.time()
    ctx = open_run(config, workdir, write_metrics=True)
    try:
        summary = _train(ctx)
    finally:
        close_run(ctx)
    summary["wall_time_s"] = time.time() - started
    if jax.process_index() == 0:
        print(metrics.format_table(reports.summary_rows(summary), title="Summary"))
    return summary


def _train(ctx) -> dict:
    config, source, forward = ctx.config, ctx.source, ctx.forward
    print(
        f"{forward.description} on {source.name}: "
        f"{source.num_train} training / {source.num_val} validation images, "
        f"{ctx.sharded.num_devices} device(s) in {jax.process_count()} process(es)."
    )
    if config.eval.bn_reestimate and not forward.has_batchnorm:
        print("The model has no BatchNorm layer: BN re-estimation (eval.bn_reestimate) is skipped.")
    variables = phases.init_variables(forward, ctx)
    if config.model.pretrained:
        variables = ctx.sharded.replicate(
            forward.load_pretrained(
                config.model.pretrained, variables, config.model.pretrained_layout
            )
        )
    if config.float_train.epochs:
        variables = phases.float_phase(ctx, variables)
    if config.float_train.save_weights and jax.process_index() == 0:
        from oscqat_jax import convert

        convert.save_variables(config.float_train.save_weights, jax.device_get(variables))
    float_eval = ctx.sharded.jit_batch_fn(step_lib.make_eval_step(forward, "float_eval"))
    summary: dict = {"float": evaluation.evaluate(ctx, float_eval, variables)["top1"]}
    print(f"Float model: top-1 {summary['float']:.2f} %")
    phases.qat_phase(ctx, variables, summary)
    summary.update({f"data/{k}": v for k, v in source.stats().items()})
    return summary


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, checkpoint_path: str = ""
) -> dict:
    """Top-1/top-5 of a QAT checkpoint (the workdir's newest unless ``checkpoint_path`` names
    one), before and after BN re-estimation, on the config's validation data."""
    ctx = open_run(config, workdir, write_metrics=False)
    try:
        model, state = phases.restore_qat_state(ctx, checkpoint_path)
        pre, post = Evaluator.create(ctx, model).pre_and_post_bn(state.variables)
    finally:
        close_run(ctx)
    result = {"step": int(state.step), **{f"{k}_pre_bn": v for k, v in pre.items()}}
    if post is not None:
        result.update({f"{k}_post_bn": v for k, v in post["metrics"].items()})
    if jax.process_index() == 0:
        rows = [(k, f"{v:.4g}") for k, v in result.items()]
        print(metrics.format_table(rows, title="Evaluation"))
    return result


EXPORT_FORMATS = ("native", "onnx")
"""``native``: the integer export of :mod:`oscqat_jax.export` (``.safetensors``/``.npz``);
``onnx``: a QDQ ONNX graph (:mod:`oscqat_jax.export.onnx`, needs the ``deploy`` extra)."""
ONNX_CONTAINERS = ("int4", "int8")
"""How an ONNX export stores the integers: ``int4`` (the portable QDQ form, each grid in the
narrowest type) or ``int8`` (8-bit types, run by ONNX Runtime's integer kernels)."""


def export_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    output: str,
    checkpoint_path: str = "",
    export_format: str = "native",
    container: str = "int4",
):
    """Writes the integer model of a QAT checkpoint to ``output``.

    Args:
      export_format: ``native`` writes ``.safetensors`` or ``.npz`` (by the suffix, see
        :mod:`oscqat_jax.export`); ``onnx`` writes a ``.onnx`` file
        (:func:`oscqat_jax.export.onnx.export_model_onnx`, batch dimension dynamic, NHWC input).
      container: ONNX only: ``int4`` (QDQ form, integers at their bit width) or ``int8``
        (8-bit integers for ONNX Runtime's integer kernels), see :mod:`oscqat_jax.export.onnx`.

    Returns:
      The export's manifest (``native``) or the ``onnx.ModelProto`` written (``onnx``); None
      on processes other than the first.
    """
    write = _exporter(output, export_format, container)  # before any work
    ctx = open_run(config, workdir, write_metrics=False)
    try:
        model, step, variables = restore_for_export(ctx, checkpoint_path)
    finally:
        close_run(ctx)
    if jax.process_index() != 0:
        return None
    result, what = write(model, jax.device_get(variables), ctx)
    size = os.path.getsize(output)
    print(f"Exported step {step} to {output} ({size / 2**20:.2f} MiB, {what}).")
    return result


def restore_for_export(ctx: Context, checkpoint_path: str = "") -> tuple[Any, int, dict]:
    """``(forward, step, variables)`` of the checkpoint that an export writes and a deployment
    check compares against: the BN statistics are the re-estimated ones when
    ``eval.bn_reestimate`` is set and the model has BatchNorm (as the final evaluation of
    training uses them), else the checkpoint's running ones."""
    forward, state = phases.restore_qat_state(ctx, checkpoint_path)
    variables = state.variables
    evaluator = Evaluator.create(ctx, forward)
    if evaluator.reestimates_bn:
        variables = dict(variables, batch_stats=evaluator.reestimate_bn(variables))
    return forward, int(state.step), variables


def _exporter(output: str, export_format: str, container: str = "int4"):
    """``write(model, variables, ctx) -> (result, description)`` for ``export_format``,
    after checking the output's suffix, the container and (for ONNX) that the exporter is
    installed."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"The export format {export_format!r} is not one of {', '.join(EXPORT_FORMATS)}."
        )
    if container not in ONNX_CONTAINERS:
        raise ValueError(f"The container {container!r} is not one of {', '.join(ONNX_CONTAINERS)}.")
    if export_format != "onnx" and container != "int4":
        raise ValueError(
            f"The container {container!r} applies to --format=onnx only; the native format "
            "packs its own integers."
        )
    suffix = os.path.splitext(output)[1].lower()
    if export_format == "native":
        from oscqat_jax import export

        if suffix == ".onnx":
            raise ValueError(
                f"Export file {output} has the suffix '.onnx' of the onnx format; pass "
                "--format=onnx (export_format='onnx'), or write .safetensors or .npz."
            )
        export.check_suffix(output)

        def write_native(forward, variables, ctx):
            if isinstance(forward, NNXForward):  # an NNX model holds its variables
                variables, arguments = None, forward.native_export(variables)
            else:
                arguments = forward.native_export()
            manifest = export.export_model(
                output, variables, input_shape=ctx.source.image_shape, **arguments
            )
            return manifest, f"{len(manifest['weights'])} quantized layers"

        return write_native
    if suffix != ".onnx":
        raise ValueError(f"ONNX export file {output} must end in .onnx, not {suffix!r}.")
    try:
        from oscqat_jax.export.onnx import exporter as onnx_export
    except ImportError as err:
        raise RuntimeError(
            f"The onnx format needs the {err.name} package: pip install 'oscqat_jax[deploy]' "
            "(onnx and onnxruntime)."
        ) from None

    def write_onnx(forward, variables, ctx):
        if isinstance(forward, NNXForward):
            (model, model_kwargs), variables = forward.onnx_export(variables), None
        else:
            model, model_kwargs = forward.onnx_export()
        proto = onnx_export.export_model_onnx(
            model,
            variables,
            output,
            input_shape=ctx.source.image_shape,
            container=container,
            **model_kwargs,
        )
        return proto, (
            f"ONNX opset {proto.opset_import[0].version}, {container} container, "
            f"{len(proto.graph.node)} nodes"
        )

    return write_onnx
