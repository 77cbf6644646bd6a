"""The one place where a config becomes objects, after one validation against one table.

:func:`validate` checks every field the program reads against :data:`LIMITS` (plus the few
rules that relate two fields) and stops with one sentence naming the first bad field, before
any data is read or anything is compiled. The other functions turn the validated config into
what the phases use: the quant setup and the model, the oscillation settings of the QAT step
(tracking, freezing, dampening and their schedules, held together in one frozen object), the
optimizer and the checkpoint metadata. Nothing below this module reads ``config`` fields.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import optax

from oscqat_jax import models, schedules
from oscqat_jax.convert import LAYOUTS
from oscqat_jax.nn.setups import SETUPS, QuantSetup
from oscqat_jax.training import optim
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.data import SOURCES

MAX_BITS = 8
"""Largest bit width of the training program: the integer export stores int8."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """What one config field may hold; ``valid`` says it in words for the error sentence."""

    check: Callable[[object], bool]
    valid: str
    optional: bool = False  # None is allowed (the field's "off" value)


def _int(low: int, high: int | None = None) -> Callable[[object], bool]:
    def check(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return False
        return low <= value and (high is None or value <= high)

    return check


def _number(check: Callable[[float], bool]) -> Callable[[object], bool]:
    def number_check(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and check(value)

    return number_check


def _one_of(choices) -> Limit:
    return Limit(lambda value: value in choices, f"use one of {', '.join(choices)}")


_POSITIVE_INT = Limit(_int(1), "use a positive int")
_AT_LEAST_ONE = Limit(_int(1), "use at least 1")
_NON_NEGATIVE = Limit(_number(lambda v: v >= 0), "use a value >= 0")
_FRACTION = Limit(_number(lambda v: 0.0 <= v < 1.0), "use a fraction in [0, 1)")
_BITS = Limit(_int(2, MAX_BITS), f"use a bit width between 2 and {MAX_BITS}")
_OPTIMIZER = {f"{field}": _NON_NEGATIVE for field in ("lr", "lr_final", "weight_decay", "quant_lr")}

LIMITS: dict[str, Limit] = {
    "data.name": _one_of(SOURCES),
    "data.tfds_format": _one_of(("auto", "array_record", "tfrecord")),
    "data.tfrecord_shards_per_block": Limit(_int(1), "use a positive number of shards"),
    "data.num_workers": Limit(_int(0), "use 0 (main process) or more"),
    "data.min_crop_area": Limit(_number(lambda v: 0.0 < v <= 1.0), "use a fraction in (0, 1]"),
    "data.eval_resize_ratio": Limit(_number(lambda v: v >= 1.0), "use a ratio >= 1"),
    "data.batch_size": _POSITIVE_INT,
    "data.eval_batch_size": _POSITIVE_INT,
    "data.image_size": _POSITIVE_INT,
    "distributed.num_processes": Limit(_int(1), "use 1 or more"),
    "model.name": _one_of(tuple(models.MODELS)),
    "model.dtype": _one_of(("float32", "bfloat16")),
    "model.pretrained_layout": _one_of(LAYOUTS),
    "quant.setup": _one_of(SETUPS),
    "quant.n_bits": _BITS,
    "quant.n_bits_act": dataclasses.replace(_BITS, optional=True),
    "quant.num_est_batches": _AT_LEAST_ONE,
    "osc_freeze.anneal_start": _FRACTION,
    "osc_freeze.threshold": _NON_NEGATIVE,
    "osc_freeze.threshold_final": dataclasses.replace(_NON_NEGATIVE, optional=True),
    "osc_freeze.ema_momentum": Limit(_number(lambda v: 0.0 < v <= 1.0), "use a value in (0, 1]"),
    "osc_damp.anneal_start": _FRACTION,
    "osc_damp.weight": Limit(
        _number(lambda v: v >= 0), "use a value >= 0, or None to switch dampening off", True
    ),
    "osc_damp.weight_final": Limit(
        _number(lambda v: v >= 0), "use a value >= 0, or None to switch dampening off", True
    ),
    "osc_damp.aggregation": _one_of(("kernel_mean", "sum", "mean")),
    "train.epochs": _AT_LEAST_ONE,
    "float_train.epochs": Limit(_int(0), "use 0 (skip) or more"),
    **{f"optimizer.{field}": limit for field, limit in _OPTIMIZER.items()},
    **{f"float_train.optimizer.{field}": limit for field, limit in _OPTIMIZER.items()},
    "train.stop_at_step": Limit(_int(0), "use 0 (off) or a step number"),
    "eval.bn_batches": _AT_LEAST_ONE,
}
"""Every config field with a limit, in the order they are checked."""


def _field(config: ml_collections.ConfigDict, path: str):
    value = config
    for key in path.split("."):
        value = value[key]
    return value


def _fail(field: str, value, valid: str):
    raise ValueError(f"config.{field} = {value!r} is not valid: {valid}.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field the program relies on; raises ValueError naming the first bad one."""
    for field, limit in LIMITS.items():
        value = _field(config, field)
        if value is None and limit.optional:
            continue
        if not limit.check(value):
            _fail(field, value, limit.valid)
    if config.data.name == "imagenet_folder" and not config.data.dir:
        _fail("data.dir", config.data.dir, "name the folder that holds train/ and val/")
    d = config.distributed
    if not 0 <= d.process_id < d.num_processes:
        _fail("distributed.process_id", d.process_id, f"use an id in [0, {d.num_processes})")
    if config.model.pretrained and not os.path.isfile(config.model.pretrained):
        _fail("model.pretrained", config.model.pretrained, "the file does not exist")


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- steps


def oscillation_settings(config: ml_collections.ConfigDict) -> step_lib.OscillationSettings:
    """The QAT step's tracking, freezing and dampening settings (SPEC §5-7) of ``config``."""
    freeze, damp = config.osc_freeze, config.osc_damp
    return step_lib.OscillationSettings(
        track=freeze.track,
        momentum=freeze.ema_momentum,
        use_ema_freeze=freeze.use_ema,
        level=config.train.osc_level,
        dampen=damp.weight is not None,
        dampening_aggregation=damp.aggregation,
    )


def qat_step_config(config: ml_collections.ConfigDict) -> step_lib.StepConfig:
    """The static settings of the QAT train step for ``config``."""
    return step_lib.StepConfig(mode="train", oscillations=oscillation_settings(config))


FLOAT_STEP = step_lib.StepConfig(
    mode="float_train", oscillations=step_lib.OscillationSettings(track=False)
)
"""The static settings of the float train step."""


def optimizer(
    config: ml_collections.ConfigDict, *, phase: str, total_steps: int, steps_per_epoch: int
) -> optim.Optimizer:
    """The optimizer of the ``"float"`` or ``"qat"`` phase (quantizer scales train in QAT)."""
    opt_config = config.float_train.optimizer if phase == "float" else config.optimizer
    return optim.create_optimizer(
        opt_config,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        train_quantizers=phase == "qat",
    )


def float_schedules(opt: optim.Optimizer) -> step_lib.Schedules:
    """Learning rates of the float phase (no freezing, no dampening)."""
    return step_lib.Schedules(opt.model_lr, opt.quant_lr, schedules.constant(0.0))


def qat_schedules(config, opt: optim.Optimizer, total: int) -> step_lib.Schedules:
    """Learning rates, freezing threshold (SPEC §6) and dampening weight (SPEC §7) of QAT."""
    freeze = config.osc_freeze
    damp = config.osc_damp
    threshold = schedules.freeze_threshold_schedule(
        freeze.threshold, freeze.threshold_final, total, freeze.anneal_start
    )
    weight: optax.Schedule | None = None
    if damp.weight is not None:
        weight = schedules.dampening_weight_schedule(
            damp.weight, damp.weight_final, total, damp.anneal_start
        )
    return step_lib.Schedules(opt.model_lr, opt.quant_lr, threshold, weight)
