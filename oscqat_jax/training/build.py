"""The one place where a config becomes objects, after one validation against one table.

:func:`validate` checks every field the program reads against :data:`LIMITS` (plus the few
rules that relate two fields) and stops with one sentence naming the first bad field, before
any data is read or anything is compiled. The other functions turn the validated config into
what the phases use: the quant setup and the package's models, the oscillation settings of
the QAT step (tracking, freezing, dampening and their schedules, held together in one frozen
object), the optimizer and the checkpoint metadata (whose tables are :mod:`.fingerprint`'s).
Beside it, :mod:`.models` turns ``config.model`` into the forward the steps call (a user's
own model and its rules included). Nothing below these modules reads ``config`` fields.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from oscqat_jax import models as families
from oscqat_jax import schedules
from oscqat_jax.convert import LAYOUTS
from oscqat_jax.nn import QuantizedModel
from oscqat_jax.nn.config import RANGE_METHODS
from oscqat_jax.nn.setups import SETUPS, QuantSetup
from oscqat_jax.training import checkpoint, fingerprint, optim
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.data import SOURCES
from oscqat_jax.training.limits import Limit, finite, is_import_path, one_of, whole

MAX_BITS = 8
"""Largest bit width of the training program: the integer export stores int8."""


_BOOL = Limit(lambda value: isinstance(value, bool), "use True or False")
_POSITIVE_INT = Limit(whole(1), "use a positive int")
_AT_LEAST_ONE = Limit(whole(1), "use at least 1")
_SEED = Limit(whole(0), "use an int >= 0")
_NON_NEGATIVE = Limit(finite(lambda v: v >= 0), "use a finite number >= 0")
_POSITIVE = Limit(finite(lambda v: v > 0), "use a finite number > 0")
_FRACTION = Limit(finite(lambda v: 0.0 <= v < 1.0), "use a fraction in [0, 1)")
_BITS = Limit(whole(2, MAX_BITS), f"use a bit width between 2 and {MAX_BITS}")
# Oscillation frequencies lie in [0, 1] (docs/method.md §5): a threshold above 1 could never
# be passed.
_FREQUENCY = finite(lambda v: 0.0 <= v <= 1.0)
_REGEX = Limit(lambda v: isinstance(v, str), "use a regex string of module paths")
_DAMPENING = Limit(
    finite(lambda v: v >= 0), "use a finite number >= 0, or None to switch dampening off", True
)


def _optimizer_limits(lr: Limit) -> dict[str, Limit]:
    """The limits of one optimizer group (``optimizer`` or ``float_train.optimizer``)."""
    return {
        "lr": lr,
        "lr_final": Limit(finite(lambda v: v >= 0), "use a finite number >= 0, at most lr"),
        "warmup_steps": Limit(whole(0), "use 0 (no warm-up) or a number of steps"),
        "lr_per_epoch": _BOOL,
        "momentum": Limit(finite(lambda v: 0.0 <= v < 1.0), "use a momentum in [0, 1)"),
        "nesterov": _BOOL,
        "weight_decay": _NON_NEGATIVE,
        "quant_lr": _NON_NEGATIVE,
        "quant_weight_decay": _NON_NEGATIVE,
    }


# The float phase's rate is read only when it runs (float_train.epochs > 0, see validate).
_FLOAT_LR = Limit(
    finite(lambda v: v >= 0), "use a finite number > 0 (0 only with float_train.epochs = 0)"
)

LIMITS: dict[str, Limit] = {
    "seed": _SEED,
    "data.name": one_of(SOURCES),
    "data.image_size": _POSITIVE_INT,
    "data.num_classes": _POSITIVE_INT,
    "data.val_fraction": Limit(finite(lambda v: 0.0 < v < 1.0), "use a fraction in (0, 1)"),
    "data.split_seed": _SEED,
    "data.num_train": _POSITIVE_INT,
    "data.num_val": _POSITIVE_INT,
    "data.channels": _POSITIVE_INT,
    "data.batch_size": _POSITIVE_INT,
    "data.eval_batch_size": _POSITIVE_INT,
    "data.max_shift": Limit(whole(0), "use 0 (no shifts) or a number of pixels"),
    "data.flip": _BOOL,
    "data.resident_max_mb": Limit(whole(0), "use 0 (always host batches) or a size in MiB"),
    "data.tfds_format": one_of(("auto", "array_record", "tfrecord")),
    "data.tfrecord_shards_per_block": Limit(whole(1), "use a positive number of shards"),
    "data.num_workers": Limit(whole(0), "use 0 (main process) or more"),
    "data.prefetch": Limit(whole(1), "use 1 or more batches"),
    "data.eval_resize_ratio": Limit(finite(lambda v: v >= 1.0), "use a ratio >= 1"),
    "data.min_crop_area": Limit(finite(lambda v: 0.0 < v <= 1.0), "use a fraction in (0, 1]"),
    "data.train_subset": Limit(whole(0), "use 0 (all images) or a number of images"),
    "model.name": Limit(
        lambda v: v in families.MODELS or is_import_path(v),
        f"use one of {', '.join(families.MODELS)}, or the import path package.module:function "
        "of your own flax.linen model",
    ),
    "model.train_flag": Limit(
        lambda v: isinstance(v, str) and (v == "" or v.isidentifier()),
        "use the name of the model's training keyword (such as train), or '' for none",
    ),
    "model.first_conv": _REGEX,
    "model.classifier": _REGEX,
    "model.head_output": dataclasses.replace(_REGEX, optional=True),
    "model.logits": dataclasses.replace(_REGEX, optional=True),
    "model.width_multiplier": _POSITIVE,
    "model.fold_bn": _BOOL,
    "model.dtype": one_of(("float32", "bfloat16")),
    "model.pretrained_layout": one_of(LAYOUTS),
    "float_train.epochs": Limit(whole(0), "use 0 (skip) or more"),
    **{f"float_train.optimizer.{k}": v for k, v in _optimizer_limits(_FLOAT_LR).items()},
    "quant.setup": one_of(SETUPS),
    "quant.n_bits": _BITS,
    "quant.n_bits_act": dataclasses.replace(_BITS, optional=True),
    "quant.per_channel": _BOOL,
    "quant.weight_range": one_of(RANGE_METHODS),
    "quant.act_range": one_of(RANGE_METHODS),
    "quant.num_est_batches": _AT_LEAST_ONE,
    "quant.grad_scale": _BOOL,
    "quant.quantize_activations": _BOOL,
    "quant.rules": Limit(
        lambda v: v == "" or is_import_path(v),
        "use '' (the rules of quant.setup) or the import path package.module:function of a "
        "rules factory",
    ),
    "osc_freeze.track": _BOOL,
    "osc_freeze.threshold": Limit(_FREQUENCY, "use a frequency in [0, 1] (0: no freezing)"),
    "osc_freeze.threshold_final": Limit(
        _FREQUENCY, "use a frequency in [0, 1], or None for a constant threshold", True
    ),
    "osc_freeze.anneal_start": _FRACTION,
    "osc_freeze.ema_momentum": Limit(finite(lambda v: 0.0 < v <= 1.0), "use a value in (0, 1]"),
    "osc_freeze.use_ema": _BOOL,
    "osc_freeze.max_bits": Limit(whole(0, MAX_BITS), f"use a bit width between 0 and {MAX_BITS}"),
    "osc_damp.weight": _DAMPENING,
    "osc_damp.weight_final": _DAMPENING,
    "osc_damp.anneal_start": _FRACTION,
    "osc_damp.aggregation": one_of(("kernel_mean", "sum", "mean")),
    **{f"optimizer.{k}": v for k, v in _optimizer_limits(_POSITIVE).items()},
    "train.epochs": _AT_LEAST_ONE,
    "train.log_every": _AT_LEAST_ONE,
    "train.checkpoint_every": _AT_LEAST_ONE,
    "train.keep_checkpoints": _AT_LEAST_ONE,
    "train.osc_level": Limit(finite(lambda v: 0.0 < v < 1.0), "use a frequency in (0, 1)"),
    "train.divergence_factor": Limit(
        finite(lambda v: v == 0 or v > 1), "use 0 (off) or a factor > 1"
    ),
    "train.stop_at_step": Limit(whole(0), "use 0 (off) or a step number"),
    "train.fast_compile": _BOOL,
    "train.steps_per_call": Limit(whole(1), "use a positive int (1: one train step per call)"),
    "distributed.num_processes": Limit(whole(1), "use 1 or more"),
    "distributed.process_id": Limit(whole(0), "use an int >= 0"),
    "distributed.auto": _BOOL,
    "distributed.heartbeat_timeout_s": Limit(whole(1), "use a positive number of seconds"),
    "eval.every_epochs": _AT_LEAST_ONE,
    "eval.bn_reestimate": _BOOL,
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
    float_epochs = config.float_train.epochs
    if float_epochs and config.float_train.optimizer.lr == 0:
        field = "float_train.optimizer.lr"
        _fail(field, config.float_train.optimizer.lr, LIMITS[field].valid)
    for group in ("optimizer", "float_train.optimizer") if float_epochs else ("optimizer",):
        opt = _field(config, group)
        if opt.lr_final > opt.lr:
            _fail(f"{group}.lr_final", opt.lr_final, f"use at most {group}.lr = {opt.lr!r}")
    if config.data.name == "imagenet_folder" and not config.data.dir:
        _fail("data.dir", config.data.dir, "name the folder that holds train/ and val/")
    d = config.distributed
    if not 0 <= d.process_id < d.num_processes:
        _fail("distributed.process_id", d.process_id, f"use an id in [0, {d.num_processes})")
    if config.model.pretrained and not os.path.isfile(config.model.pretrained):
        _fail("model.pretrained", config.model.pretrained, "the file does not exist")
    _validate_model_kind(config)


_PACKAGE_ONLY = {
    "model.width_multiplier": 1.0,
    "model.block_setting": None,
    "model.fold_bn": False,
    "model.dtype": "float32",
    "model.pretrained_layout": "auto",
}
"""Fields of the package's models, with the value an own model leaves them at."""


def _validate_model_kind(config: ml_collections.ConfigDict) -> None:
    """The fields of an own model (``model.name`` an import path, training/models.py) and
    those of the package's models are not mixed."""
    own = is_import_path(config.model.name)
    if own:
        for field, default in _PACKAGE_ONLY.items():
            value = _field(config, field)
            if value != default:
                _fail(field, value, f"it applies to the package's models; leave it at {default!r}")
        return
    _validate_block_setting(config.model.name, config.model.block_setting)
    if config.model.kwargs:
        _fail(
            "model.kwargs",
            config.model.kwargs.to_dict(),
            "it applies to a model named by import path (package.module:function)",
        )
    if config.quant.rules:
        _fail(
            "quant.rules",
            config.quant.rules,
            "a rules factory applies to a model named by import path; the package's models "
            "use quant.setup",
        )


def _validate_block_setting(name: str, setting) -> None:
    """``model.block_setting``: None, or MobileNetV2's stages as (expansion t, channels c,
    repeats n, first stride s) tuples of positive ints."""
    if setting is None:
        return
    if name != "mobilenet_v2":
        _fail("model.block_setting", setting, f"it applies to mobilenet_v2, not {name}; use None")
    stages = list(setting) if isinstance(setting, (tuple, list)) else []
    if not stages or not all(
        isinstance(stage, (tuple, list)) and len(stage) == 4 and all(map(whole(1), stage))
        for stage in stages
    ):
        _fail(
            "model.block_setting",
            setting,
            "use a non-empty tuple of (expansion, channels, repeats, stride) tuples of "
            "positive ints, or None for the paper's",
        )


# --------------------------------------------------------------------------- model


def quant_setup(config: ml_collections.ConfigDict) -> QuantSetup:
    """The :class:`QuantSetup` of ``config.quant``."""
    q = config.quant
    return QuantSetup(
        name=q.setup,
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


def plain_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The plain Flax model of ``config.model`` (:mod:`oscqat_jax.models`), with its
    width, block setting and compute dtype (``model.fold_bn`` is a choice of the
    quantization: :func:`quantized_model`)."""
    m = config.model
    options = {
        "width_multiplier": m.width_multiplier,
        "dtype": jnp.bfloat16 if m.dtype == "bfloat16" else None,
    }
    if m.block_setting is not None:
        options["block_setting"] = tuple(tuple(b) for b in m.block_setting)
    return families.create_model(m.name, num_classes=num_classes, **options)


def quantized_model(config: ml_collections.ConfigDict, num_classes: int) -> QuantizedModel:
    """:func:`plain_model` quantized by the rules of the config's quant setup, BN folded into
    the quantized kernels when ``model.fold_bn`` (what the training program runs)."""
    return families.quantize(
        plain_model(config, num_classes), quant_setup(config), fold_bn=config.model.fold_bn
    )


def run_metadata(
    config: ml_collections.ConfigDict, phase: str, num_classes: int
) -> checkpoint.Fingerprint:
    """What a checkpoint of ``phase`` records of ``config``: :func:`.fingerprint.run_metadata`
    (where the tables of fixed and recorded fields are)."""
    return fingerprint.run_metadata(config, phase, num_classes)


# --------------------------------------------------------------------------- steps


def oscillation_settings(config: ml_collections.ConfigDict) -> step_lib.OscillationSettings:
    """The QAT step's tracking, freezing and dampening settings (docs/method.md §5-7) of
    ``config``."""
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
    """Learning rates, freezing threshold (docs/method.md §6) and dampening weight
    (docs/method.md §7) of QAT."""
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
