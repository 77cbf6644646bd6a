"""Tests of oscqat_jax.training.build: the one validation table and config -> objects."""

import importlib.util
import math
import os
import re

import ml_collections
import pytest
from testkit import ROOT, tiny_config

from oscqat_jax import oscillation
from oscqat_jax.training import build
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.config import base_config

# A value outside each limit, chosen next to the boundary where there is one.
BAD = {
    "seed": -1,
    "data.name": "mnist",
    "data.image_size": 0,
    "data.num_classes": 0,
    "data.val_fraction": 1.0,
    "data.split_seed": -1,
    "data.num_train": 0,
    "data.num_val": 0,
    "data.channels": 0,
    "data.batch_size": 0,
    "data.eval_batch_size": 0,
    "data.max_shift": -1,
    "data.flip": 1,
    "data.resident_max_mb": -1,
    "data.tfds_format": "parquet",
    "data.tfrecord_shards_per_block": 0,
    "data.num_workers": -1,
    "data.prefetch": 0,
    "data.eval_resize_ratio": 0.99,
    "data.min_crop_area": 0.0,
    "data.train_subset": -1,
    "model.name": "alexnet",
    "model.width_multiplier": 0.0,
    "model.fold_bn": "False",
    "model.dtype": "float16",
    "model.pretrained_layout": "keras",
    "model.train_flag": "1train",
    "model.first_conv": 3,
    "model.classifier": None,
    "model.head_output": 3,
    "model.logits": ("head",),
    "float_train.epochs": -1,
    "float_train.optimizer.lr": -0.1,
    "float_train.optimizer.lr_final": -1e-6,
    "float_train.optimizer.warmup_steps": -1,
    "float_train.optimizer.lr_per_epoch": 0,
    "float_train.optimizer.momentum": 1.0,
    "float_train.optimizer.nesterov": "yes",
    "float_train.optimizer.weight_decay": -1e-5,
    "float_train.optimizer.quant_lr": -1e-5,
    "float_train.optimizer.quant_weight_decay": -1e-9,
    "quant.setup": "int8",
    "quant.n_bits": 9,
    "quant.n_bits_act": 1,
    "quant.per_channel": 1,
    "quant.weight_range": "minmax",
    "quant.act_range": "percentile",
    "quant.num_est_batches": 0,
    "quant.grad_scale": 0,
    "quant.quantize_activations": "True",
    "quant.rules": "my_rules",  # not an import path module:function
    "osc_freeze.track": 1,
    "osc_freeze.threshold": 1.5,  # frequencies lie in [0, 1]: nothing could ever freeze
    "osc_freeze.threshold_final": 1.0001,
    "osc_freeze.anneal_start": 1.0,
    "osc_freeze.ema_momentum": 0.0,
    "osc_freeze.use_ema": None,
    "osc_freeze.max_bits": build.MAX_BITS + 1,
    "osc_damp.weight": -1.0,
    "osc_damp.weight_final": -1e-9,
    "osc_damp.anneal_start": -0.1,
    "osc_damp.aggregation": "max",
    "optimizer.lr": 0.0,
    "optimizer.lr_final": -1e-6,
    "optimizer.warmup_steps": -1,
    "optimizer.lr_per_epoch": 1,
    "optimizer.momentum": 1.5,  # accepted once, and training ran away
    "optimizer.nesterov": 0,
    "optimizer.weight_decay": -1e-5,
    "optimizer.quant_lr": -1e-5,
    "optimizer.quant_weight_decay": -1e-9,
    "train.epochs": 0,
    "train.log_every": 0,
    "train.checkpoint_every": 0,
    "train.keep_checkpoints": 0,
    "train.osc_level": 1.0,
    "train.divergence_factor": 1.0,
    "train.stop_at_step": -1,
    "train.fast_compile": "no",
    "train.steps_per_call": 0,
    "distributed.num_processes": 0,
    "distributed.process_id": -1,
    "distributed.auto": 1,
    "distributed.heartbeat_timeout_s": 0,
    "eval.every_epochs": 0,
    "eval.bn_reestimate": 0,
    "eval.bn_batches": 0,
}
# Further bad values: the other side of a two-sided range, and wrong types.
ALSO_BAD = [
    ("osc_freeze.threshold", -0.1),
    ("osc_freeze.threshold", 1.0000001),
    ("osc_freeze.threshold_final", -0.01),
    ("osc_freeze.max_bits", -1),
    ("optimizer.momentum", -0.5),
    ("optimizer.momentum", 1.0),
    ("float_train.optimizer.momentum", -1e-9),
    ("train.osc_level", 0.0),
    ("train.divergence_factor", -1.0),
    ("train.divergence_factor", 0.5),
    ("data.val_fraction", 0.0),
    ("model.width_multiplier", -0.5),
    ("optimizer.lr", -0.1),
    ("optimizer.warmup_steps", 2.0),
    ("data.max_shift", 1.5),
    ("train.log_every", True),
]
# Values on the valid side of the same boundaries.
EDGE = [
    ("seed", 0),
    ("data.num_workers", 0),
    ("data.val_fraction", 1e-6),
    ("data.val_fraction", 1 - 1e-6),
    ("data.max_shift", 0),
    ("data.min_crop_area", 1.0),
    ("data.eval_resize_ratio", 1.0),
    ("data.flip", True),
    ("model.width_multiplier", 1e-3),
    ("model.fold_bn", True),
    ("quant.n_bits", build.MAX_BITS),
    ("quant.n_bits_act", 2),
    ("osc_freeze.anneal_start", 0.0),
    ("osc_freeze.threshold", 0.0),
    ("osc_freeze.threshold", 1.0),
    ("osc_freeze.threshold_final", 0.0),
    ("osc_freeze.threshold_final", 1.0),
    ("osc_freeze.ema_momentum", 1.0),
    ("osc_freeze.max_bits", 0),
    ("osc_freeze.max_bits", build.MAX_BITS),
    ("osc_damp.weight", 0.0),
    ("osc_damp.weight_final", 0.0),
    ("float_train.epochs", 0),
    ("float_train.optimizer.lr", 0.0),  # the float phase is skipped (float_train.epochs = 0)
    ("optimizer.lr", 1e-12),
    ("optimizer.momentum", 0.0),
    ("optimizer.momentum", 0.999),
    ("optimizer.warmup_steps", 0),
    ("optimizer.weight_decay", 0.0),
    ("optimizer.quant_lr", 0.0),
    ("train.osc_level", 1e-9),
    ("train.osc_level", 1 - 1e-9),
    ("train.divergence_factor", 0.0),
    ("train.divergence_factor", 1.0001),
    ("train.log_every", 1),
    ("train.keep_checkpoints", 1),
    ("train.stop_at_step", 0),
    ("eval.every_epochs", 1),
]


def _group_and_name(config, field):
    *groups, name = field.split(".")
    node = config
    for group in groups:
        node = node[group]
    return node, name


def _set(config, field, value):
    node, name = _group_and_name(config, field)
    with node.ignore_type():
        node[name] = value


def _schema_type(field):
    node, name = _group_and_name(base_config(), field)
    return node.get_type(name)


def _schema_leaves(node=None, prefix=""):
    """``{dotted field: its declared type}`` of every leaf of :func:`base_config`."""
    node = base_config() if node is None else node
    leaves = {}
    for key in node.keys():
        if isinstance(node[key], ml_collections.ConfigDict):
            leaves.update(_schema_leaves(node[key], f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = node.get_type(key)
    return leaves


FLOAT_FIELDS = [field for field in sorted(build.LIMITS) if _schema_type(field) is float]
BOOL_FIELDS = [field for field in sorted(build.LIMITS) if _schema_type(field) is bool]


def _load_recipe(name: str, arg: str | None):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


PAPER_VARIANTS = [f"w{bits}_{method}" for bits in (3, 4) for method in ("lsq", "damp", "freeze")]
RECIPES = [
    ("default", None),
    ("own_model", None),
    ("tiny", "test"),
    ("tiny", "quick"),
    ("bn_study", "mobilenet_v2"),
    ("bn_study", "resnet18"),
    *[(name, arg) for name in ("fashion_mnist",) for arg in PAPER_VARIANTS],
    *[
        (name, arg)
        for name in ("mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_small")
        for arg in PAPER_VARIANTS
    ],
]


def test_every_limited_field_has_a_bad_value_here():
    assert set(BAD) == set(build.LIMITS)
    assert {field for field, _ in ALSO_BAD + EDGE} <= set(build.LIMITS)


def test_every_number_and_switch_of_the_schema_has_a_limit():
    leaves = _schema_leaves()
    numbers_and_switches = {f for f, t in leaves.items() if t in (int, float, bool)}
    assert len(numbers_and_switches) > 60  # the walk reaches the nested groups
    assert numbers_and_switches <= set(build.LIMITS), numbers_and_switches - set(build.LIMITS)
    assert set(build.LIMITS) <= set(leaves)  # no limit for a field the schema lacks
    assert len(FLOAT_FIELDS) > 20 and len(BOOL_FIELDS) == 14


def test_the_defaults_and_the_tiny_config_are_valid():
    build.validate(base_config())
    build.validate(tiny_config())


@pytest.mark.parametrize("name, arg", RECIPES, ids=[f"{n}:{a}" for n, a in RECIPES])
def test_every_recipe_is_valid(name, arg):
    config = _load_recipe(name, arg)
    if config.data.name == "imagenet_folder":
        config.data.dir = "/data/imagenet"  # the one field a user must add
    build.validate(config)


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_names_its_field_and_what_is_valid(field):
    config = base_config()
    _set(config, field, BAD[field])
    with pytest.raises(ValueError) as error:
        build.validate(config)
    message = str(error.value)
    assert message.startswith(f"config.{field} = {BAD[field]!r} is not valid: "), message
    assert build.LIMITS[field].valid in message and "\n" not in message


@pytest.mark.parametrize("field, value", ALSO_BAD)
def test_the_other_side_of_each_range_is_refused_too(field, value):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=f"^config\\.{re.escape(field)} = "):
        build.validate(config)


@pytest.mark.parametrize("field, value", EDGE)
def test_boundary_values_on_the_valid_side_pass(field, value):
    config = base_config()
    _set(config, field, value)
    build.validate(config)


@pytest.mark.parametrize("field", ["quant.n_bits", "data.batch_size", "train.epochs"])
@pytest.mark.parametrize("value", [True, 4.0, "4", None])
def test_whole_number_fields_refuse_other_types(field, value):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=field):
        build.validate(config)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_nan_and_infinities_are_not_valid_numbers(field, value):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError) as error:
        build.validate(config)
    assert str(error.value).startswith(f"config.{field} = {value!r} is not valid: ")
    # The control: a finite value of the same field passes (the default).
    build.validate(base_config())


@pytest.mark.parametrize("value", [0, 1, "True", "false", None, 1.0])
@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_switches_take_only_booleans(field, value):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=f"config.{field} = .* use True or False"):
        build.validate(config)
    for valid in (True, False):
        config = base_config()
        _set(config, field, valid)
        build.validate(config)


def test_the_float_learning_rate_may_be_0_only_when_there_is_no_float_phase():
    config = base_config()
    config.float_train.optimizer.lr = 0.0
    build.validate(config)  # negative control: float_train.epochs = 0
    config.float_train.epochs = 1
    with pytest.raises(ValueError, match=r"^config\.float_train\.optimizer\.lr = 0\.0 is not"):
        build.validate(config)
    config.float_train.optimizer.lr = 1e-6
    build.validate(config)


@pytest.mark.parametrize("group", ["optimizer", "float_train.optimizer"])
def test_the_cosine_floor_is_at_most_the_peak_rate(group):
    config = base_config()
    config.float_train.epochs = 1
    opt, _ = _group_and_name(config, f"{group}.lr")
    opt.lr_final = opt.lr  # a constant rate: valid
    build.validate(config)
    opt.lr_final = opt.lr * 1.01
    with pytest.raises(ValueError) as error:
        build.validate(config)
    assert str(error.value) == (
        f"config.{group}.lr_final = {opt.lr_final!r} is not valid: use at most "
        f"{group}.lr = {opt.lr!r}."
    )


def test_the_float_floor_is_not_checked_without_a_float_phase():
    config = base_config()
    config.float_train.optimizer.lr = 0.0
    config.float_train.optimizer.lr_final = 0.01
    build.validate(config)
    config.float_train.epochs = 2
    with pytest.raises(ValueError, match="float_train.optimizer.lr"):
        build.validate(config)


def test_optional_fields_take_none_and_required_ones_do_not():
    config = base_config()
    for field in ("quant.n_bits_act", "osc_freeze.threshold_final", "osc_damp.weight"):
        assert build.LIMITS[field].optional
        _set(config, field, None)
    build.validate(config)
    _set(config, "osc_freeze.threshold", None)
    with pytest.raises(ValueError, match="osc_freeze.threshold"):
        build.validate(config)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("distributed.process_id", 1, "distributed.process_id"),
        ("model.pretrained", "/nonexistent/weights.pth", "model.pretrained"),
    ],
)
def test_rules_between_fields(field, value, match):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=match):
        build.validate(config)
    config = base_config()
    config.data.name = "imagenet_folder"
    with pytest.raises(ValueError, match="data.dir"):
        build.validate(config)


def test_the_oscillation_settings_come_from_their_fields():
    config = base_config()
    config.osc_freeze.track = False
    config.osc_freeze.ema_momentum = 0.02
    config.osc_freeze.use_ema = False
    config.train.osc_level = 0.03
    config.osc_damp.weight = 0.0
    config.osc_damp.aggregation = "sum"
    step = build.qat_step_config(config)
    assert step.mode == "train"
    assert step.oscillations == step_lib.OscillationSettings(
        track=False,
        momentum=0.02,
        use_ema_freeze=False,
        level=0.03,
        dampen=True,
        dampening_aggregation="sum",
    )
    config.osc_damp.weight = None
    assert not build.qat_step_config(config).oscillations.dampen
    assert build.FLOAT_STEP.mode == "float_train" and not build.FLOAT_STEP.oscillations.track


def test_defaults_have_one_home():
    config = base_config()
    assert config.osc_freeze.ema_momentum == oscillation.EMA_MOMENTUM
    assert config.train.osc_level == oscillation.OSC_LEVEL
    settings = step_lib.OscillationSettings()
    assert (settings.momentum, settings.level) == (oscillation.EMA_MOMENTUM, oscillation.OSC_LEVEL)
    assert build.oscillation_settings(config) == settings


def test_the_quant_setup_carries_the_bits_ranges_and_weight_only_mode():
    config = tiny_config(quant__n_bits=4, quant__n_bits_act=3, osc_freeze__max_bits=3)
    setup = build.quant_setup(config)
    assert (setup.name, setup.n_bits, setup.act_bits, setup.max_bits) == ("LSQ_paper", 4, 3, 3)
    assert setup.overrides == ()
    config.quant.setup, config.quant.per_channel, config.quant.grad_scale = "all", True, True
    config.quant.weight_range, config.quant.act_range = "current_minmax", "running_minmax"
    setup = build.quant_setup(config)
    assert (setup.name, setup.per_channel, setup.grad_scale) == ("all", True, True)
    assert setup.weight_range_method == "current_minmax"
    assert setup.act_range_method == "running_minmax"
    config.quant.quantize_activations = False
    assert build.quant_setup(config).overrides == (("*", None, "float"),)


def test_checkpoint_metadata_tells_runs_apart():
    config = tiny_config()
    qat = build.run_metadata(config, "qat", 4)
    assert qat.fixed["quant.n_bits"] == 3 and qat.fixed["phase"] == "qat"
    assert qat.fixed["data.num_classes"] == 4
    assert build.run_metadata(tiny_config(quant__n_bits=4), "qat", 4).fixed != qat.fixed
    assert build.run_metadata(config, "qat", 5).fixed != qat.fixed
    # The float cache depends on the seed; a QAT checkpoint records it as safe to change.
    reseeded = tiny_config()
    reseeded.seed = 1
    moved = build.run_metadata(reseeded, "qat", 4)
    assert moved.fixed == qat.fixed and moved.tunable["seed"] == 1 != qat.tunable["seed"]
    assert (
        build.run_metadata(reseeded, "float", 4).fixed
        != build.run_metadata(config, "float", 4).fixed
    )


def test_the_qat_schedules_follow_the_config():
    config = tiny_config()
    opt = build.optimizer(config, phase="qat", total_steps=12, steps_per_epoch=6)
    table = build.qat_schedules(config, opt, 12).table(12)
    assert table["freeze_threshold"][0] == 0.0  # before the anneal start
    assert table["freeze_threshold"][-1] == pytest.approx(config.osc_freeze.threshold_final)
    assert table["dampening_weight"][-1] == pytest.approx(config.osc_damp.weight_final)
    config.osc_damp.weight = None
    table = build.qat_schedules(config, opt, 12).table(12)
    assert not table["dampening_weight"].any()
