"""The package's families in the training program (training/models.py ``package_forward``):
each is its plain Flax model (``oscqat_jax.models``) quantized by the rules of the
config, with every option the config accepts; the steps take them abstractly (``eval_shape``,
nothing compiled) except one real run of a family other than the tiny config's MobileNetV2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from testkit import tiny_config

from oscqat_jax import models as families
from oscqat_jax.nn import intercept
from oscqat_jax.nn.quantizer import split_quantizer_param
from oscqat_jax.nn.setups import SETUPS
from oscqat_jax.training import build, context, data, models, optim, phases, trainer
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.forward import RulesForward

IMAGE = 32  # every family's smallest input
CLASSES = 5
TEST_BLOCKS = tiny_config().model.block_setting


@dataclasses.dataclass(frozen=True)
class _Source:
    """What forward_of reads of a data source."""

    num_classes: int = CLASSES
    image_shape: tuple = (IMAGE, IMAGE, 3)


def _config(name="mobilenet_v2", **overrides):
    config = tiny_config(model__name=name, model__block_setting=None, data__image_size=IMAGE)
    config.model.width_multiplier = 0.25
    for key, value in overrides.items():
        group, field = key.split("__")
        config[group][field] = value
    build.validate(config)
    return config


@pytest.fixture(autouse=True)
def _abstract_scales(monkeypatch):
    """Calibration ends by reading every scale on the host (``check_scales``); traced
    abstractly there are no values to read."""
    monkeypatch.setattr(intercept, "check_scales", lambda params: None)


def _abstract_step(forward: RulesForward, config) -> tuple[dict, dict, dict]:
    """``(variables, state after one QAT step, its metrics)``, all abstract: the calibrated
    variables (``init``, then ``calibrate`` on one batch) and one train step of the
    trainer's step function with its optimizer."""
    x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    qmodel = forward.quantized

    def calibrated(key, x):
        return qmodel.calibrate(qmodel.init(key, x, train=False), [x], train=False)

    variables = jax.eval_shape(calibrated, jax.random.key(0), x)
    opt = build.optimizer(config, phase="qat", total_steps=4, steps_per_epoch=2)
    step = step_lib.make_train_step(forward, opt.tx, build.qat_step_config(config))
    hparams = step_lib.hparams_at(build.qat_schedules(config, opt, 4).table(4), 0)

    def run(variables, images, labels):
        state = step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0))
        return step(state, (images, labels), hparams)

    state, metrics = jax.eval_shape(run, variables, x, labels)
    return variables, state, metrics


def _leaves(tree) -> dict[str, jax.ShapeDtypeStruct]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def test_a_package_family_is_a_rules_forward_over_its_plain_model():
    config = tiny_config()
    forward = models.forward_of(config, data.load_dataset(config.data))
    assert isinstance(forward, RulesForward)
    model = forward.model
    assert isinstance(model, families.MobileNetV2)
    assert model.width_multiplier == config.model.width_multiplier == 0.25
    assert model.block_setting == tuple(map(tuple, config.model.block_setting))
    assert model.num_classes == config.data.num_classes
    assert forward.train_flag == "train" and forward.has_batchnorm and forward.pytorch_layouts
    rules = forward.quantized.rules
    assert rules and not any(r.fold_bn for r in rules)
    assert {r.weight_bits for r in rules} >= {config.quant.n_bits}


# Every architecture at width 0.25 with the defaults of the tiny config (LSQ_paper, 3 bits);
# about 10 s each on 2 CPU cores. EfficientNet-lite1-3 are lite0's blocks at widths and depths
# between lite0's and lite4's, which are both here.
ARCHITECTURES = [
    n for n in families.MODELS if n not in {f"efficientnet_lite{i}" for i in (1, 2, 3)}
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_family_builds_and_takes_a_train_step(name):
    config = _config(name)
    forward = models.package_forward(config, CLASSES)
    assert families.model_name_of(forward.model) == name
    variables, state, metrics = _abstract_step(forward, config)
    params = _leaves(variables["params"])
    kernels = [p for p in params if p.endswith("/kernel")]
    assert any(p.endswith("/conv/kernel") for p in kernels)  # ConvBN layers
    assert state.params.keys() == variables["params"].keys()
    assert _leaves(state.oscillation).keys() == _leaves(variables["oscillation"]).keys()
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


def _rules_of(forward) -> dict:
    rules = forward.quantized.rules
    return {k: any(getattr(r, k) for r in rules) for k in ("per_channel", "fold_bn")}


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_every_setup_builds_and_takes_a_train_step(setup):
    config = _config(quant__setup=setup)
    forward = models.package_forward(config, CLASSES)
    variables, state, _ = _abstract_step(forward, config)
    scales = [p for p in _leaves(variables["params"]) if split_quantizer_param(p.split("/")[-1])]
    assert bool(scales) == (setup != "float")
    assert state.params.keys() == variables["params"].keys()


def _output_scales(params) -> list[str]:
    return [p for p in _leaves(params) if p.endswith(("/input_scale", "/output_scale"))]


def _init(forward: RulesForward) -> dict:
    """The abstract variables of the quantized model's ``init`` (before calibration)."""
    x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
    return jax.eval_shape(
        lambda k, x: forward.quantized.init(k, x, train=False), jax.random.key(0), x
    )


def _init_params(forward: RulesForward) -> dict:
    return _leaves(_init(forward)["params"])


def test_the_model_and_quant_options_reach_the_model_and_its_rules():
    blocks = dict(model__block_setting=TEST_BLOCKS)  # three blocks: cheap to trace
    base = _config(**blocks)
    forward = models.package_forward(base, CLASSES)
    assert not any(_rules_of(forward).values())
    params = _init_params(forward)
    assert params["features_0/weight_scale"].shape == ()
    assert params["features_0/conv/kernel"].shape[-1] == 8  # 32 channels times 0.25
    assert _output_scales(params)

    options = _config(
        quant__per_channel=True,
        model__fold_bn=True,
        model__dtype="bfloat16",
        model__width_multiplier=0.5,
        **blocks,
    )
    forward = models.package_forward(options, CLASSES)
    assert forward.model.dtype == jnp.bfloat16 and forward.model.width_multiplier == 0.5
    assert _rules_of(forward) == {"per_channel": True, "fold_bn": True}
    variables, state, _ = _abstract_step(forward, options)
    params = _leaves(variables["params"])
    assert params["features_0/conv/kernel"].shape[-1] == 16
    assert params["features_0/weight_scale"].shape[-1] == 16  # one scale per channel
    assert _leaves(state.params) == params
    x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
    for mode in ("eval", "float_eval"):
        logits = jax.eval_shape(functools.partial(forward.logits, mode=mode), variables, x)
        assert logits.dtype == jnp.bfloat16 and logits.shape == (2, CLASSES)

    weights_only = _config(quant__quantize_activations=False, **blocks)
    params = _init_params(models.package_forward(weights_only, CLASSES))
    assert "features_0/weight_scale" in params and not _output_scales(params)


def test_the_optimizer_trains_every_quantizer_parameter_with_the_quantizer_rate():
    # A ConvBN keeps its kernel at conv/kernel and its weight scale beside: both the kernel
    # and the scale must get their own rates (the scale at SGD's would turn negative).
    config = _config(quant__setup="all", model__block_setting=TEST_BLOCKS)
    params = _init(models.package_forward(config, CLASSES))["params"]
    labels = _leaves(optim.param_labels(params))
    quantizer = {p for p in labels if split_quantizer_param(p.split("/")[-1])}
    assert {"features_0/weight_scale", "features_1/depthwise/weight_scale"} <= quantizer
    assert "features_1/depthwise_out/output_scale" in quantizer and len(quantizer) > 20
    for path, label in labels.items():
        assert label == ("quant" if path in quantizer else "model"), path


@pytest.mark.parametrize(
    "name, setting, match",
    [
        ("resnet18", ((1, 16, 1, 1),), "it applies to mobilenet_v2, not resnet18"),
        ("mobilenet_v2", ((1, 16, 1),), r"\(expansion, channels, repeats, stride\)"),
        ("mobilenet_v2", ((1, 16, 0, 1),), r"\(expansion, channels, repeats, stride\)"),
        ("mobilenet_v2", (), r"\(expansion, channels, repeats, stride\)"),
    ],
)
def test_a_block_setting_the_family_cannot_take_is_refused(name, setting, match):
    config = tiny_config(model__name=name, model__block_setting=setting)
    with pytest.raises(ValueError, match=rf"^config\.model\.block_setting = .* {match}"):
        build.validate(config)


@pytest.mark.slow
def test_another_family_trains_end_to_end_with_folded_per_channel_quantizers(tmp_path):
    config = tiny_config(
        model__name="resnet18",
        model__block_setting=None,
        model__fold_bn=True,
        quant__per_channel=True,
        data__image_size=IMAGE,
        data__channels=3,
        train__epochs=1,
    )
    config.model.width_multiplier = 0.125
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert summary["qat_post_bn"] is not None and np.isfinite(summary["oscillating_end"])
    ctx = context.open_run(config, str(tmp_path), write_metrics=False)
    try:
        forward, state = phases.restore_qat_state(ctx)
    finally:
        context.close_run(ctx)
    params = _leaves(state.params)
    assert isinstance(forward.model, families.ResNet) and "layer1_0/conv1/conv/kernel" in params
    assert np.shape(params["layer1_0/conv1/weight_scale"])[-1] == 8  # per channel
