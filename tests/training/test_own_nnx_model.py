"""Your own ``flax.nnx`` model in the training program (training/nnx_forward.py,
training/models.py): ``configs/own_nnx_model.py`` (the CNN of ``demos/nnx_cnn.py``) run end to
end through ``python train.py`` at tiny sizes, resumed exactly, exported to both formats and
checked; the NNX forward against a Linen twin with the same weights through the trainer's own
step; and the NNX models the program cannot take refused at start-up in one sentence."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from testkit import ROOT, assert_trees_equal, restore_final

from oscqat_jax.nn import QuantRule, quantize_model
from oscqat_jax.nn.bn import reestimate_bn_nnx
from oscqat_jax.training import forward as forward_lib
from oscqat_jax.training import models, trainer
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.config import check_config_file
from oscqat_jax.training.nnx_forward import NNXForward

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_FILE = os.path.join(ROOT, "configs", "own_nnx_model.py")
# The shipped config at tiny sizes: 8x8 digits, a width-8 CNN (at width 4 nothing oscillates
# in 22 steps), one float epoch of 11 steps (1437 images, batches of 128), two QAT epochs of
# 11 steps each, checkpoints every 6.
TINY = {
    "data.image_size": 8,
    "data.batch_size": 128,
    "model.kwargs.width": 8,
    "float_train.epochs": 1,
    "train.epochs": 2,
    "train.log_every": 4,
    "train.checkpoint_every": 6,
    "eval.bn_batches": 2,
}
TOTAL_STEPS = 22


def own_config(**overrides) -> ml_collections.ConfigDict:
    """configs/own_nnx_model.py with :data:`TINY` and ``overrides`` (dotted field names)."""
    check_config_file(CONFIG_FILE)
    namespace: dict = {}
    exec(compile(open(CONFIG_FILE).read(), CONFIG_FILE, "exec"), namespace)  # noqa: S102
    config = namespace["get_config"]()
    for field, value in {**TINY, **overrides}.items():
        *groups, name = field.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


@dataclasses.dataclass(frozen=True)
class FakeSource:
    """What :func:`models.forward_of` reads of a data source."""

    num_classes: int = 10
    image_shape: tuple = (8, 8, 1)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("nnx_run"))
    command = [
        sys.executable,
        "train.py",
        f"--config={CONFIG_FILE}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in TINY.items()),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_run_logs_float_qat_oscillations_and_pre_and_post_bn_evaluations(nnx_run):
    workdir, stdout = nnx_run
    assert "demos.nnx_cnn:make_model(depth=2, width=8) on digits" in stdout
    rows = _rows(workdir)
    assert any("float/loss" in r for r in rows)
    qat = [r for r in rows if "qat/loss" in r]
    assert qat[-1]["step"] == TOTAL_STEPS
    assert all("qat/osc/oscillating" in r and "qat/osc/frozen" in r for r in qat)
    assert any(r["qat/osc/oscillating"] > 0 for r in qat)  # 4-bit weights do oscillate
    evals = [r for r in rows if "eval/top1_pre_bn" in r]
    assert [r["step"] for r in evals] == [11, 22]
    for r in evals:
        assert 0 <= r["eval/top1_post_bn"] <= 100
        # The nnx.List's items are layers of their own in the records ("blocks/0/conv").
        assert "eval/layer/blocks/0/conv/frozen" in r
        assert any(k.startswith("eval/bn_mean_shift/") for k in r)
    # Chance is 10 %: the CNN learnt digits through train.py.
    assert evals[-1]["eval/top1_post_bn"] > 25
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == str(TOTAL_STEPS)


def _beside(workdir: str, tmp_path, name: str) -> str:
    """A new workdir holding ``workdir``'s float model (its cache: no float phase again)."""
    other = str(tmp_path / name)
    os.makedirs(other)
    shutil.copytree(os.path.join(workdir, "float_model"), os.path.join(other, "float_model"))
    return other


@pytest.mark.slow
def test_resumed_and_four_steps_per_call_runs_end_in_the_uninterrupted_state(
    nnx_run, tmp_path, capsys
):
    workdir, _ = nnx_run
    config = own_config()
    resumed = _beside(workdir, tmp_path, "resumed")
    trainer.train_and_evaluate(own_config(**{"train.stop_at_step": 9}), resumed)
    assert "Float model: loaded from" in capsys.readouterr().out
    assert restore_final(resumed, config)[0] == 9
    trainer.train_and_evaluate(config, resumed)
    assert "Resuming QAT from step 9" in capsys.readouterr().out
    step_a, state_a = restore_final(workdir, config)
    step_b, state_b = restore_final(resumed, config)
    assert step_a == step_b == TOTAL_STEPS
    assert_trees_equal(state_a, state_b)  # exactly
    last = {k: v for k, v in _rows(workdir)[-1].items() if k.startswith("eval/")}
    assert last and last == {k: v for k, v in _rows(resumed)[-1].items() if k.startswith("eval/")}

    k4 = _beside(workdir, tmp_path, "k4")
    trainer.train_and_evaluate(own_config(**{"train.steps_per_call": 4}), k4)
    assert "up to 4 steps per call" in capsys.readouterr().out
    _, state_c = restore_final(k4, config)
    assert_trees_equal(state_a["oscillation"], state_c["oscillation"], atol=1e-5)
    assert_trees_equal(state_a["params"], state_c["params"], atol=1e-4)


@pytest.mark.slow
def test_exports_agree_with_jax_and_the_export_check_passes(nnx_run, tmp_path, capsys):
    from oscqat_jax import deploy, export
    from oscqat_jax.deploy import check
    from oscqat_jax.training import context

    workdir, _ = nnx_run
    config = own_config()
    native, onnx_file = str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")
    manifest = trainer.export_checkpoint(config, workdir, native)
    assert manifest["model"]["kind"] == "nnx"
    trainer.export_checkpoint(config, workdir, onnx_file, export_format="onnx")

    ctx = context.open_run(config, workdir, write_metrics=False)
    try:
        forward, step, variables = trainer.restore_for_export(ctx)
        images = np.concatenate([batch[0] for batch in ctx.eval_batches()])
    finally:
        context.close_run(ctx)
    assert step == TOTAL_STEPS and isinstance(forward, NNXForward)
    want = np.asarray(forward.logits(variables, images, "eval"))
    # The file loads into a model quantized by the same rules (its other values discarded).
    model = forward.bound(forward.quantized_state)  # as quantized, nothing trained
    export.load_export(native, model=model)
    np.testing.assert_allclose(np.asarray(model(images)), want, atol=1e-5)
    got_onnx = deploy.run_onnx(onnx_file, images)
    np.testing.assert_allclose(got_onnx, want, atol=1e-4)

    argv = [onnx_file, f"--config={CONFIG_FILE}", f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
    assert check.main(argv) == 0
    assert "Top-1 agreement: 100.00 %" in capsys.readouterr().out
    # The control: the check rebuilds the model from the config, so another width fails.
    assert check.main([*argv, "--config.model.kwargs.width=6"]) == 1
    assert "model.kwargs.width 8 → 6" in capsys.readouterr().err


# ----------------------------------------------------------------------------- start-up

REFUSALS = [
    ({"model.name": "own_models:nnx_factory"}, r"returns a flax\.nnx model but takes no 'rngs'"),
    ({"model.name": "own_models:NNXNet"}, r"cannot take the data's float32 image batch"),
    ({"model.name": "own_models:NNXTwoInputs"}, r"takes 2 inputs \(x, mask\)"),
    ({"model.train_flag": "train"}, r"has no argument 'train' \(config\.model\.train_flag\)"),
    ({"model.classifier": "fc"}, r"config\.model\.classifier \(module_path 'fc'\) matches no"),
    ({"model.first_conv": "blocks/.*"}, r"config\.model\.first_conv .* is meant for one"),
]


@pytest.mark.parametrize(
    "overrides, match",
    REFUSALS,
    ids=[",".join(f"{k}={v}" for k, v in overrides.items()) for overrides, _ in REFUSALS],
)
def test_what_does_not_fit_is_refused_in_one_sentence(overrides, match, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    config = own_config(**overrides)
    if overrides.get("model.name", "").startswith("own_models:"):
        config.model.kwargs = {}
    with pytest.raises(ValueError, match=match) as error:
        models.forward_of(config, FakeSource())
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_the_controls_of_the_refusals_build_nnx_forwards(monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    forward = models.forward_of(own_config(), FakeSource())
    assert isinstance(forward, NNXForward) and forward.has_batchnorm
    sites = {r.module_path for r in forward.rules}
    assert {"stem/conv", "head"} <= sites
    # The nnx.Module class itself serves as the factory too.
    by_class = models.forward_of(own_config(**{"model.name": "demos.nnx_cnn:CNN"}), FakeSource())
    assert by_class.template(None, None, None) == forward.template(None, None, None)
    config = own_config(**{"model.name": "own_models:NNXNoBatchNorm"})
    config.model.kwargs = {}
    config.model.first_conv = "stem"
    assert not models.forward_of(config, FakeSource()).has_batchnorm


def test_the_seed_reaches_the_model_and_the_float_state_fits_the_quantized_one(monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    forward = models.forward_of(own_config(), FakeSource())
    image = jnp.zeros((1, 8, 8, 1))
    a, b = (jax.jit(forward.init)(jax.random.PRNGKey(s), image) for s in (0, 1))
    kernels = [v["params"]["blocks"]["0"]["conv"]["kernel"] for v in (a, b)]
    assert not np.allclose(*kernels)  # the key seeds the weights
    assert_trees_equal(a, jax.jit(forward.init)(jax.random.PRNGKey(0), image))
    assert sorted(a) == ["batch_stats", "params"]
    # The float model's variables are a part of the quantized model's (same paths).
    template = forward.template(None, None, None)
    flat = forward_lib.with_values(template, a)
    assert jax.tree_util.tree_structure(flat) == jax.tree_util.tree_structure(template)


# ----------------------------------------------------------------------------- the forward

FEATURES, CLASSES = 8, 5
BN = dict(momentum=0.9, epsilon=1e-5)
RULES = (
    QuantRule("head", weight_bits=8, act_bits=8),
    QuantRule("stem", weight_bits=8, act_bits=None),
    QuantRule(".*", weight_bits=4, act_bits=4),
)
HPARAMS = dict(model_lr=0.5, quant_lr=1e-4, dampening_weight=0.1)
THRESHOLDS = (0.0, 0.0, 0.05, 0.05, 0.05, 0.02)  # freezing starts at the third step
SETTINGS = step_lib.OscillationSettings(dampen=True, momentum=0.3)
BNS = ("stem_bn", "dw_bn")


class LinenTwin(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(FEATURES, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn", **BN)(x))
        y = nn.Conv(FEATURES, (3, 3), feature_group_count=FEATURES, name="dw")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="dw_bn", **BN)(y))
        x = x + nn.Conv(FEATURES, (1, 1), name="pw")(y)
        return nn.Dense(CLASSES, name="head")(jnp.mean(x, axis=(1, 2)))


class NNXTwin(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, FEATURES, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(FEATURES, rngs=rngs, **BN)
        self.dw = nnx.Conv(FEATURES, FEATURES, (3, 3), feature_group_count=FEATURES, rngs=rngs)
        self.dw_bn = nnx.BatchNorm(FEATURES, rngs=rngs, **BN)
        self.pw = nnx.Conv(FEATURES, FEATURES, (1, 1), rngs=rngs)
        self.head = nnx.Linear(FEATURES, CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        x = nnx.relu(self.stem_bn(x))
        y = nnx.relu(self.dw_bn(self.dw(x)))
        x = x + self.pw(y)
        return self.head(jnp.mean(x, axis=(1, 2)))


def _batch(seed: int):
    key = jax.random.key(seed)
    images = 2.0 * jax.random.normal(key, (16, 8, 8, 3), jnp.float32)
    return images, jax.random.randint(jax.random.fold_in(key, 1), (16,), 0, CLASSES)


class _WithoutThreshold:
    """A forward that loses the freezing threshold on its way to the layers (the control)."""

    def __init__(self, inner):
        self.inner = inner

    def train(self, variables, images, **kwargs):
        return self.inner.train(variables, images, **{**kwargs, "freeze_threshold": 0.0})

    def logits(self, variables, images, mode):
        return self.inner.logits(variables, images, mode)


def _run(forward, variables):
    """A trainer step per threshold from ``variables``: the losses and the final state."""
    tx = optax.identity()
    step = jax.jit(
        step_lib.make_train_step(forward, tx, step_lib.StepConfig(oscillations=SETTINGS)),
        compiler_options=step_lib.FAST_COMPILE,
    )
    state = step_lib.create_state(variables, tx, jax.random.PRNGKey(0))
    losses = []
    for i, threshold in enumerate(THRESHOLDS):
        hparams = {k: np.float32(v) for k, v in {**HPARAMS, "freeze_threshold": threshold}.items()}
        state, metrics = step(state, _batch(10 + i), hparams)
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1  # the moving threshold never recompiled the step
    return np.asarray(losses), jax.device_get(state)


def _twins():
    """The NNX and the Linen forward, and their calibrated variables from the same weights."""
    nnx_forward = NNXForward.create(NNXTwin, RULES)
    linen = forward_lib.RulesForward(quantize_model(LinenTwin(), RULES))
    calibration = [_batch(seed)[0] for seed in (1, 2)]
    floats = nnx_forward.init(jax.random.PRNGKey(3), calibration[0][:1])
    linen_floats = forward_lib.with_values(
        jax.jit(linen.init)(jax.random.PRNGKey(0), calibration[0][:1]), floats
    )
    assert_trees_equal(linen_floats, floats)  # the same weights under the same names
    key = jax.random.PRNGKey(4)
    return (
        (nnx_forward, nnx_forward.calibrate(floats, calibration, key)),
        (linen, linen.calibrate(linen_floats, calibration, key)),
    )


def _close(a, b, rtol=1e-5) -> float:
    """Asserts the same structure and each leaf of ``a`` within ``rtol`` of the largest
    value of ``b``'s; returns the worst such relative difference."""
    leaves = jax.tree_util.tree_leaves_with_path(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    worst = 0.0
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(a), strict=True):
        if not np.size(want):
            continue
        want = np.asarray(want, np.float64)
        rel = np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-30)
        assert rel <= rtol, f"{jax.tree_util.keystr(path)}: {rel:.3g}"
        worst = max(worst, float(rel))
    return worst


def test_nnx_and_its_linen_twin_take_the_same_steps_through_the_trainers_step():
    (nnx_forward, nnx_vars), (linen, linen_vars) = _twins()
    _close(nnx_vars, linen_vars)  # calibrated scales, signedness, range sums, tracking
    images = _batch(5)[0]
    _close(nnx_forward.logits(nnx_vars, images, "eval"), linen.logits(linen_vars, images, "eval"))
    nnx_losses, nnx_state = _run(nnx_forward, nnx_vars)
    linen_losses, linen_state = _run(linen, linen_vars)
    np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-5)
    worst = {
        name: _close(getattr(nnx_state, name), getattr(linen_state, name))
        for name in ("params", "batch_stats", "oscillation", "quant_stats")
    }
    print(f"\nworst relative differences after {len(THRESHOLDS)} steps: {worst}")
    # The schedule froze weights and moved BN: the compared state is not the calibrated one.
    frozen = sum(int(np.sum(v["frozen"])) for v in linen_state.oscillation.values())
    assert frozen > 0
    moved = nnx_state.batch_stats["stem_bn"]["mean"] - nnx_vars["batch_stats"]["stem_bn"]["mean"]
    assert np.max(np.abs(moved)) > 1e-3
    # The control: a threshold that does not reach the NNX layers freezes nothing.
    _, lost = _run(_WithoutThreshold(nnx_forward), nnx_vars)
    assert sum(int(np.sum(v["frozen"])) for v in lost.oscillation.values()) == 0


def test_bn_statistics_batch_by_batch_equal_the_nnx_verb_over_all_batches():
    (forward, variables), _ = _twins()
    images = [_batch(20 + i)[0] for i in range(3)]
    ours = forward.average_bn([jax.jit(forward.bn_statistics)(variables, x) for x in images])
    model = reestimate_bn_nnx(forward.bound(variables), images)
    verb = {
        n: {"mean": getattr(model, n).mean[...], "var": getattr(model, n).var[...]} for n in BNS
    }
    assert_trees_equal(ours, verb, atol=1e-6, rtol=1e-6)
    # The control: the running statistics were not already these.
    assert np.max(np.abs(ours["dw_bn"]["var"] - variables["batch_stats"]["dw_bn"]["var"])) > 1e-3
