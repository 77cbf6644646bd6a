"""Optimizers of the training program (docs/method.md §9).

Model parameters (kernels, biases, BatchNorm scale and bias) get SGD with momentum and
PyTorch-style coupled weight decay (``g + wd * w`` before the momentum) under a cosine
learning-rate schedule; quantizer parameters (every ``*_scale`` and ``*_zero_point`` a
quantizer declares) get their own Adam with a constant learning rate and no weight decay.
In float training the quantizer parameters are left untouched.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from oscqat_jax import schedules
from oscqat_jax.nn import api

MODEL, QUANT = "model", "quant"
"""The trainer's names for :data:`oscqat_jax.nn.api.WEIGHTS` / ``QUANTIZER``; they key the
optimizer state in checkpoints, so they keep their names."""

_TRAINER_LABEL = {api.WEIGHTS: MODEL, api.QUANTIZER: QUANT}


def param_labels(params) -> dict:
    """The pytree of ``"model"`` / ``"quant"`` labels for ``optax.multi_transform``: the rule
    of :func:`oscqat_jax.nn.api.param_labels` under the trainer's label names."""
    return jax.tree_util.tree_map(_TRAINER_LABEL.__getitem__, api.param_labels(params))


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax transformation (without learning rates) and the schedules of the rates.

    ``tx`` produces update *directions*; :func:`apply_learning_rates` scales them by the
    current rates, which the train step receives as array arguments, so one compiled step
    serves every schedule. ``-lr * direction`` equals ``optax.sgd`` / ``optax.adam`` with
    that rate, also when the rate changes from step to step (it scales the final update).
    """

    tx: optax.GradientTransformation
    model_lr: optax.Schedule
    quant_lr: optax.Schedule


def create_optimizer(
    opt_config, *, total_steps: int, steps_per_epoch: int, train_quantizers: bool
) -> Optimizer:
    """Builds the two-part optimizer from ``config.optimizer`` (or ``config.float_train.optimizer``).

    Fields: ``lr``, ``lr_final`` (cosine floor), ``warmup_steps``, ``lr_per_epoch`` (change
    the rate once per epoch), ``momentum``, ``nesterov``, ``weight_decay``, ``quant_lr``,
    ``quant_weight_decay``.
    """
    model_lr = schedules.cosine_lr(
        opt_config.lr,
        total_steps,
        final_lr=opt_config.lr_final,
        warmup_steps=opt_config.warmup_steps,
        steps_per_epoch=steps_per_epoch if opt_config.lr_per_epoch else None,
    )
    model_tx = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay),
        optax.trace(decay=opt_config.momentum, nesterov=opt_config.nesterov),
    )
    if train_quantizers:
        quant_lr = schedules.constant(opt_config.quant_lr)
        quant_tx = optax.chain(
            optax.add_decayed_weights(opt_config.quant_weight_decay), optax.scale_by_adam()
        )
    else:
        quant_lr = schedules.constant(0.0)
        quant_tx = optax.set_to_zero()
    tx = optax.multi_transform({MODEL: model_tx, QUANT: quant_tx}, param_labels)
    return Optimizer(tx=tx, model_lr=model_lr, quant_lr=quant_lr)


def apply_learning_rates(directions, params, model_lr: jax.Array, quant_lr: jax.Array):
    """``-lr * direction`` with each parameter's rate (model or quantizer)."""
    labels = param_labels(params)
    return jax.tree_util.tree_map(
        lambda d, label: -(model_lr if label == MODEL else quant_lr) * d, directions, labels
    )
