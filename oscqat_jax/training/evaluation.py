"""Evaluation of a quantized model before and after BatchNorm re-estimation (docs/method.md §8).

:class:`Evaluator` compiles the evaluation and BN-statistics passes of one model once.
:meth:`Evaluator.epoch_record` is what QAT runs at the end of an evaluated epoch: top-1/top-5
and loss with the running BN statistics (pre-BN), the statistics re-estimated on
``eval.bn_batches`` training batches, the same metrics with them (post-BN), how far the
running statistics were from the re-estimated ones per layer group, the oscillating, frozen
and still-active fractions per group and per layer, and every quantizer scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from oscqat_jax.nn import collect
from oscqat_jax.nn.quantizer import split_quantizer_param
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.context import Context
from oscqat_jax.training.forward import Forward


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


def reestimate_bn(ctx: Context, bn_fn: Callable, variables: dict, average: Callable) -> dict:
    """BatchNorm statistics re-estimated on ``eval.bn_batches`` training batches
    (docs/method.md §8): ``bn_fn`` gives one batch's statistics, ``average`` (the forward's
    ``average_bn``) the running ones of all."""
    batches = ctx.train_batches(0, stream="bn_batches")
    per_batch = [
        bn_fn(variables, ctx.sharded.put_batch(next(batches)[0]))
        for _ in range(ctx.config.eval.bn_batches)
    ]
    return ctx.sharded.replicate(average(per_batch))


def quantizer_scales(params: dict) -> dict[str, float]:
    """Every quantizer scale (mean over channels when per channel), keyed ``scale/<path>``."""
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        split = split_quantizer_param(names[-1])
        if split is not None and split[1] == "scale":
            out["scale/" + "/".join(names)] = float(np.mean(value))
    return out


@dataclasses.dataclass
class Evaluator:
    """The evaluation passes of one quantized model, compiled once over the run's mesh."""

    ctx: Context
    forward: Forward
    eval_fn: Callable
    bn_fn: Callable

    @classmethod
    def create(cls, ctx: Context, forward: Forward) -> Evaluator:
        """The passes of ``forward`` (:mod:`.forward`)."""
        return cls(
            ctx,
            forward,
            ctx.sharded.jit_batch_fn(step_lib.make_eval_step(forward, "eval")),
            ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(forward)),
        )

    @property
    def reestimates_bn(self) -> bool:
        """``eval.bn_reestimate``, for a model with BatchNorm layers."""
        return self.ctx.config.eval.bn_reestimate and self.forward.has_batchnorm

    def evaluate(self, variables: dict) -> dict[str, float]:
        return evaluate(self.ctx, self.eval_fn, variables)

    def reestimate_bn(self, variables: dict) -> dict:
        return reestimate_bn(self.ctx, self.bn_fn, variables, self.forward.average_bn)

    def pre_and_post_bn(self, variables: dict) -> tuple[dict, dict | None]:
        """Metrics with the running statistics, and (when :attr:`reestimates_bn`) the record
        of re-estimation: metrics with the new statistics, the statistics themselves under
        ``"batch_stats"`` and the running-vs-re-estimated mismatch."""
        pre = self.evaluate(variables)
        if not self.reestimates_bn:
            return pre, None
        reestimated = self.reestimate_bn(variables)
        post = self.evaluate(dict(variables, batch_stats=reestimated))
        mismatch = collect.bn_mismatch(
            jax.device_get(variables["batch_stats"]), jax.device_get(reestimated)
        )
        return pre, {"metrics": post, "batch_stats": reestimated, "mismatch": mismatch}

    def epoch_record(self, state: step_lib.TrainState) -> tuple[step_lib.TrainState, dict]:
        """The evaluation record of ``state`` (keys without the ``eval/`` prefix) and the
        state with its BN statistics replaced by the re-estimated ones, as the reference
        does (unchanged without ``eval.bn_reestimate``)."""
        level = self.ctx.config.train.osc_level
        pre, post = self.pre_and_post_bn(state.variables)
        record = {f"{k}_pre_bn": v for k, v in pre.items()}
        if post is not None:
            state = state.replace(batch_stats=post["batch_stats"])
            record.update({f"{k}_post_bn": v for k, v in post["metrics"].items()})
            record.update(post["mismatch"])
        if state.oscillation:
            record.update(collect.oscillation_groups(state.oscillation, level))
            record.update(collect.active_oscillations(state.oscillation, level))
            per_layer = collect.oscillation_summary(state.oscillation, level)
            for path, s in per_layer["per_layer"].items():
                record[f"layer/{path}/oscillating"] = float(s["oscillating"])
                record[f"layer/{path}/frozen"] = float(s["frozen"])
        record.update(quantizer_scales(state.params))
        return state, record
