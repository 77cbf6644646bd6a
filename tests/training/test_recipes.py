"""Every recipe in configs/ builds its model, optimizer and schedules and runs a step."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testkit import ROOT

from oscqat_jax.nn import intercept
from oscqat_jax.training import build as build_lib
from oscqat_jax.training import context, data, models, phases
from oscqat_jax.training import step as step_lib

CONFIGS = os.path.join(ROOT, "configs")
FAMILIES = ("mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_small")
RECIPES = [
    (family, f"w{bits}_{method}")
    for family in FAMILIES
    for bits in (4, 3)
    for method in ("lsq", "damp", "freeze")
] + [("bn_study", "mobilenet_v2"), ("bn_study", "resnet18")]
# Recipes differing only in numbers (bits aside) share one step program: "lsq" and "freeze"
# differ only in the freezing threshold, an argument of the step. Each distinct program is
# traced; the cheapest to compile (weight-only ResNet-18, tracked) runs for real, and the
# training tests run every mode for real on a small MobileNetV2.
_SLOW = pytest.mark.slow
TRACED = [
    ("mobilenet_v2", "w4_freeze"),
    pytest.param("mobilenet_v2", "w3_damp", marks=_SLOW),
    pytest.param("efficientnet_lite0", "w4_damp", marks=_SLOW),
    pytest.param("efficientnet_lite0", "w3_freeze", marks=_SLOW),
    pytest.param("mobilenet_v3_small", "w4_damp", marks=_SLOW),
    pytest.param("mobilenet_v3_small", "w3_freeze", marks=_SLOW),
    pytest.param("bn_study", "mobilenet_v2", marks=_SLOW),
]
TRACED_IDS = [
    "mobilenet_v2:w4_freeze",
    "mobilenet_v2:w3_damp",
    "efficientnet_lite0:w4_damp",
    "efficientnet_lite0:w3_freeze",
    "mobilenet_v3_small:w4_damp",
    "mobilenet_v3_small:w3_freeze",
    "bn_study:mobilenet_v2",
]
EXECUTED = ("bn_study", "resnet18")


def load_recipe(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def on_stand_in_data(config):
    """The recipe with ImageNet replaced by a few random 32x32 images."""
    config.data.name = "synthetic"
    config.data.image_size = 32
    config.data.num_classes = 10
    config.data.num_train = 8
    config.data.num_val = 4
    config.data.batch_size = 4
    config.data.eval_batch_size = 4
    return config


def test_recipe_values_follow_the_paper():
    c = load_recipe("mobilenet_v2", "w4_freeze")
    assert (c.quant.n_bits, c.quant.n_bits_act, c.optimizer.lr) == (4, 4, 0.0033)
    assert (c.osc_freeze.threshold, c.osc_freeze.threshold_final) == (0.1, 0.01)
    assert c.optimizer.weight_decay == 5e-5 and c.osc_damp.weight is None
    assert c.optimizer.quant_lr == 1e-5 and c.data.batch_size == 128 and c.train.epochs == 90
    c = load_recipe("mobilenet_v2", "w3_damp")
    assert (c.optimizer.lr, c.optimizer.weight_decay) == (0.01, 2.5e-5)
    assert (c.osc_damp.weight, c.osc_damp.weight_final) == (0.0, 0.1)
    assert c.osc_freeze.threshold == 0.0
    c = load_recipe("efficientnet_lite0", "w3_freeze")
    assert (c.osc_freeze.threshold, c.osc_freeze.threshold_final) == (0.1, 0.005)
    assert c.osc_damp.weight is None and c.train.epochs == 50  # freezes, no dampening
    c = load_recipe("bn_study", "resnet18")
    assert c.model.name == "resnet18" and not c.quant.quantize_activations
    assert c.train.epochs == 20 and c.quant.n_bits == 3
    with pytest.raises(ValueError, match="w3 or w4"):
        load_recipe("mobilenet_v2", "w8_lsq")


def build(name, arg):
    """The recipe's config on stand-in data, its forward (the plain model quantized by the
    recipe's rules), optimizer and schedule table."""
    config = on_stand_in_data(load_recipe(name, arg))
    build_lib.validate(config)
    dataset = data.load_dataset(config.data)
    model = models.package_forward(config, dataset.num_classes)
    per_epoch = data.steps_per_epoch(dataset, config.data.batch_size)
    total = config.train.epochs * per_epoch
    opt = build_lib.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=per_epoch)
    table = build_lib.qat_schedules(config, opt, total).table(total)
    step_fn = step_lib.make_train_step(model, opt.tx, build_lib.qat_step_config(config))
    # Late enough for freezing and dampening to be on, early enough for a sizeable rate.
    hparams = step_lib.hparams_at(table, (3 * total) // 4)
    return config, dataset, model, opt, table, step_fn, hparams


@pytest.mark.parametrize("name, arg", RECIPES, ids=[f"{n}:{a}" for n, a in RECIPES])
def test_every_recipe_builds_its_model_optimizer_and_schedules(name, arg):
    config, dataset, model, opt, table, _, hparams = build(name, arg)
    assert model.model.num_classes == dataset.num_classes
    assert model.model.width_multiplier == config.model.width_multiplier
    np.testing.assert_allclose(table["model_lr"][0], config.optimizer.lr, rtol=1e-6)
    np.testing.assert_allclose(table["quant_lr"], config.optimizer.quant_lr, rtol=1e-6)
    assert abs(float(table["model_lr"][-1])) < 0.01 * config.optimizer.lr  # cosine to 0
    if config.osc_freeze.threshold:
        assert table["freeze_threshold"][0] == 0.0
        np.testing.assert_allclose(
            table["freeze_threshold"][-1], config.osc_freeze.threshold_final, rtol=1e-3
        )
    else:
        assert not np.any(table["freeze_threshold"])
    if config.osc_damp.weight is not None:
        np.testing.assert_allclose(table["dampening_weight"][-1], 0.1, rtol=1e-3)
    assert all(v.dtype == np.float32 for v in hparams.values())


def paper_cosine(t: int, start: float, final: float, total: int, before: float) -> float:
    """docs/method.md §6/§7 at the 1-based iteration ``t`` of ``total``: ``before`` until
    ``t0 = 0.25 * total``, then ``final + (start - final) * (1 + cos(pi (t - t0) / (T - t0))) / 2``."""
    t0 = 0.25 * total
    if t < t0:
        return before
    return final + 0.5 * (start - final) * (1.0 + math.cos(math.pi * (t - t0) / (total - t0)))


ANNEALED = [
    ("mobilenet_v2", "w4_freeze", "freeze_threshold", 0.1, 0.01),
    ("mobilenet_v2", "w3_freeze", "freeze_threshold", 0.1, 0.011),
    ("mobilenet_v2", "w4_damp", "dampening_weight", 0.0, 0.1),
    ("mobilenet_v2", "w3_damp", "dampening_weight", 0.0, 0.1),
    ("efficientnet_lite0", "w3_freeze", "freeze_threshold", 0.1, 0.005),
]


@pytest.mark.parametrize(
    "name, arg, column, start, final", ANNEALED, ids=[f"{n}:{a}" for n, a, *_ in ANNEALED]
)
def test_annealed_schedules_follow_the_paper_cosine_at_every_milestone(
    name, arg, column, start, final
):
    """The table's row ``i`` holds the value at iteration ``i + 1`` (the reference counts
    from 1). On the stand-in data a recipe of E epochs has T = 2 E steps (8 images, batch 4),
    so t0 = T / 4 is a whole iteration and the milestones below land on exact cosines."""
    config, _, _, _, table, _, _ = build(name, arg)
    assert config.osc_freeze.anneal_start == config.osc_damp.anneal_start == 0.25
    values = table[column]
    total = len(values)
    assert total == 2 * config.train.epochs and total % 4 == 0
    t0 = total // 4
    # Before the anneal start the threshold is 0 (tracking only) and lambda its start, 0.
    before = 0.0
    by_hand = {
        1: before,  # the first iteration
        t0 - 1: before,  # the last one before the anneal start
        t0: start,  # the anneal start: cos(0) = 1
        t0 + (total - t0) // 3: final + 0.75 * (start - final),  # cos(pi/3) = 1/2
        t0 + 2 * (total - t0) // 3: final + 0.25 * (start - final),  # cos(2 pi/3) = -1/2
        total: final,  # the last iteration: cos(pi) = -1
    }
    assert (total - t0) % 3 == 0
    for t, want in by_hand.items():
        np.testing.assert_allclose(values[t - 1], want, rtol=1e-6, atol=1e-9, err_msg=f"t={t}")
    # Every iteration against the formula, float32 cosines against float64 ones: an absolute
    # error of a few ulps of the start value (1e-7 of 0.1).
    want = [paper_cosine(t, start, final, total, before) for t in range(1, total + 1)]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-8)
    assert values[t0] != values[t0 - 1]  # just after the anneal start it has moved


@pytest.mark.parametrize("name, arg", TRACED, ids=TRACED_IDS)
def test_recipe_step_traces(name, arg, monkeypatch):
    """The whole step traced abstractly: every shape and collection checked, nothing compiled
    (calibration's final host-side check of the scales has no values to read here)."""
    monkeypatch.setattr(intercept, "check_scales", lambda params: None)
    config, dataset, model, opt, _, step_fn, hparams = build(name, arg)
    images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)
    key = jax.random.PRNGKey(0)
    qmodel = model.quantized

    def calibrated(key, x):
        return qmodel.calibrate(qmodel.init(key, x, train=False), [x], train=False)

    variables = jax.eval_shape(calibrated, key, images)
    state = jax.eval_shape(lambda v: step_lib.create_state(v, opt.tx, key), variables)
    new_state, metrics = jax.eval_shape(step_fn, state, (images, labels), hparams)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    assert bool(state.oscillation) == config.quant.quantize_activations or name == "bn_study"


@pytest.mark.slow
def test_a_recipe_runs_a_real_step():
    name, arg = EXECUTED
    config, dataset, model, opt, _, step_fn, hparams = build(name, arg)
    sharded = step_lib.Sharded.over_all_devices(fast_compile=True)
    ctx = context.Context(config, "", dataset, sharded, None)
    variables = phases.calibrate(ctx, model, phases.init_variables(model, ctx))
    state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
    before = jax.device_get(state.params)
    batch = sharded.put_batch(ctx.train_batch(0))
    state, metrics = sharded.jit_train_step(step_fn)(state, batch, hparams)
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["osc/num_weights"]) > 0  # the 3-bit weights are tracked
    changed = [
        bool(np.any(a != b))
        for a, b in zip(
            jax.tree_util.tree_leaves(before),
            jax.tree_util.tree_leaves(jax.device_get(state.params)),
            strict=True,
        )
    ]
    assert all(changed)  # weight decay moves every parameter, gradients or not
