"""What a run reports: the per-epoch lines, the QAT history read back from ``metrics.jsonl``,
the final summary table and the plots.

The history is read from the metrics file rather than kept in memory, so a resumed run
reports its whole history; a study script reads a finished run through the same functions.
"""

from __future__ import annotations

import os

import numpy as np

from oscqat_jax import quant
from oscqat_jax.nn import collect
from oscqat_jax.training import metrics, plots
from oscqat_jax.training.context import Context


def print_epoch_evaluation(epoch: int, record: dict) -> None:
    """One line per evaluated QAT epoch (``record`` from ``Evaluator.epoch_record``)."""
    post = record.get("top1_post_bn")
    post_text = "" if post is None else f", post-BN {post:.2f} %"
    print(f"qat epoch {epoch}: validation top-1 pre-BN {record['top1_pre_bn']:.2f} %{post_text}")


def _newest_per_step(rows: list[dict], key: str) -> dict[int, dict]:
    # A resumed run logs again the steps after its checkpoint: the newest record wins.
    return {r["step"]: r for r in rows if key in r}


def evaluations(workdir: str) -> list[dict]:
    """The QAT evaluation records of a run, oldest first, with the ``eval/`` prefix removed
    and the step under ``"step"`` (see ``Evaluator.epoch_record`` for the keys)."""
    rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
    records = _newest_per_step(rows, "eval/top1_pre_bn")
    return [
        {
            "step": step,
            **{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")},
        }
        for step, r in sorted(records.items())
    ]


def oscillation_history(workdir: str) -> list[dict]:
    """The oscillation curve of a run's QAT phase, one record per logged step, oldest first:
    ``step``, ``oscillating``, ``frozen`` and their per-group fractions."""
    rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
    records = _newest_per_step(rows, "qat/osc/oscillating")
    return [
        {
            "step": step,
            **{k.removeprefix("qat/osc/"): v for k, v in r.items() if k.startswith("qat/osc/")},
        }
        for step, r in sorted(records.items())
    ]


def finish(ctx: Context, state, summary: dict) -> None:
    """Fills the summary and writes the plots (process 0, which writes the metrics)."""
    if not ctx.writer.enabled:
        return
    per_epoch = ctx.steps_per_epoch
    epochs_log = [
        {
            "epoch": -(-e["step"] // per_epoch),
            "top1_pre_bn": e["top1_pre_bn"],
            "top1_post_bn": e.get("top1_post_bn"),
        }
        for e in evaluations(ctx.workdir)
    ]
    osc_history = oscillation_history(ctx.workdir)
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
        plots.plot_threshold_distance(
            tracked_threshold_distances(state.params, state.oscillation),
            os.path.join(ctx.workdir, "threshold_distance.png"),
            title="Distance to the rounding threshold (tracked weights)",
        )


def tracked_threshold_distances(params: dict, oscillation_collection: dict) -> np.ndarray:
    """:func:`oscqat_jax.quant.threshold_distance` of every tracked weight, flattened. The
    weight is the layer's ``kernel`` (a ``ConvBN``'s at ``conv/kernel``), before any BN
    folding."""
    distances = []
    for path in collect.oscillation_states(oscillation_collection):
        layer = params
        for key in path.split("/"):
            layer = layer[key]
        kernel = layer["kernel"] if "kernel" in layer else layer["conv"]["kernel"]
        distances.append(
            quant.threshold_distance(np.asarray(kernel), np.asarray(layer["weight_scale"])).ravel()
        )
    return np.concatenate(distances)


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
