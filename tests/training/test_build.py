"""Tests of oscqat_jax.training.build: the one validation table and config -> objects."""

import math

import pytest
from testkit import tiny_config

from oscqat_jax import oscillation
from oscqat_jax.training import build
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.config import base_config

# A value outside each limit, chosen next to the boundary where there is one.
BAD = {
    "data.name": "mnist",
    "data.tfds_format": "parquet",
    "data.tfrecord_shards_per_block": 0,
    "data.num_workers": -1,
    "data.min_crop_area": 0.0,
    "data.eval_resize_ratio": 0.99,
    "data.batch_size": 0,
    "data.eval_batch_size": 0,
    "data.image_size": 0,
    "distributed.num_processes": 0,
    "model.name": "alexnet",
    "model.dtype": "float16",
    "model.pretrained_layout": "keras",
    "quant.setup": "int8",
    "quant.n_bits": 9,
    "quant.n_bits_act": 1,
    "quant.num_est_batches": 0,
    "osc_freeze.anneal_start": 1.0,
    "osc_freeze.threshold": -0.1,
    "osc_freeze.threshold_final": -0.01,
    "osc_freeze.ema_momentum": 0.0,
    "osc_damp.anneal_start": -0.1,
    "osc_damp.weight": -1.0,
    "osc_damp.weight_final": -1.0,
    "osc_damp.aggregation": "max",
    "train.epochs": 0,
    "float_train.epochs": -1,
    "optimizer.lr": -0.1,
    "optimizer.lr_final": -1e-6,
    "optimizer.weight_decay": -1e-5,
    "optimizer.quant_lr": -1e-5,
    "float_train.optimizer.lr": -0.1,
    "float_train.optimizer.lr_final": -1e-6,
    "float_train.optimizer.weight_decay": -1e-5,
    "float_train.optimizer.quant_lr": -1e-5,
    "train.stop_at_step": -1,
    "eval.bn_batches": 0,
}
# Values on the valid side of the same boundaries.
EDGE = {
    "data.num_workers": 0,
    "data.min_crop_area": 1.0,
    "data.eval_resize_ratio": 1.0,
    "quant.n_bits": build.MAX_BITS,
    "quant.n_bits_act": 2,
    "osc_freeze.anneal_start": 0.0,
    "osc_freeze.threshold": 0.0,
    "osc_freeze.ema_momentum": 1.0,
    "osc_damp.weight": 0.0,
    "float_train.epochs": 0,
    "optimizer.lr": 0.0,
    "train.stop_at_step": 0,
}


def _set(config, field, value):
    *groups, name = field.split(".")
    node = config
    for group in groups:
        node = node[group]
    with node.ignore_type():
        node[name] = value


def test_every_limited_field_has_a_bad_value_here():
    assert set(BAD) == set(build.LIMITS)


def test_the_defaults_and_the_tiny_config_are_valid():
    build.validate(base_config())
    build.validate(tiny_config())


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_names_its_field_and_what_is_valid(field):
    config = base_config()
    _set(config, field, BAD[field])
    with pytest.raises(ValueError) as error:
        build.validate(config)
    message = str(error.value)
    assert message.startswith(f"config.{field} = {BAD[field]!r} is not valid: "), message
    assert build.LIMITS[field].valid in message and "\n" not in message


@pytest.mark.parametrize("field", sorted(EDGE))
def test_boundary_values_on_the_valid_side_pass(field):
    config = base_config()
    _set(config, field, EDGE[field])
    build.validate(config)


@pytest.mark.parametrize("field", ["quant.n_bits", "data.batch_size", "train.epochs"])
@pytest.mark.parametrize("value", [True, 4.0, "4", None])
def test_whole_number_fields_refuse_other_types(field, value):
    config = base_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match=field):
        build.validate(config)


@pytest.mark.parametrize("field", ["optimizer.lr", "osc_freeze.threshold"])
def test_nan_is_not_a_valid_number(field):
    config = base_config()
    _set(config, field, math.nan)
    with pytest.raises(ValueError, match=field):
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


def test_the_quant_setup_carries_the_bits_and_weight_only_mode():
    config = tiny_config(quant__n_bits=4, quant__n_bits_act=3, osc_freeze__max_bits=3)
    setup = build.quant_setup(config)
    assert (setup.name, setup.n_bits, setup.act_bits, setup.max_bits) == ("LSQ_paper", 4, 3, 3)
    assert setup.overrides == ()
    assert build.quant_setup(config, quantize=False).name == "float"
    config.quant.quantize_activations = False
    assert build.quant_setup(config).overrides == (("*", None, "float"),)


def test_checkpoint_metadata_tells_runs_apart():
    config = tiny_config()
    qat = build.run_metadata(config, "qat")
    assert qat["n_bits"] == 3 and qat["phase"] == "qat"
    assert build.run_metadata(tiny_config(quant__n_bits=4), "qat") != qat
    # The float cache depends on the seed and epochs; a QAT checkpoint does not.
    reseeded = tiny_config()
    reseeded.seed = 1
    assert build.run_metadata(reseeded, "qat") == qat
    assert build.run_metadata(reseeded, "float") != build.run_metadata(config, "float")


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
