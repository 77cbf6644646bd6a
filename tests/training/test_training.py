"""End-to-end tests of the training program on a tiny depth-wise network and stand-in data."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from testkit import ROOT, TESTS, assert_trees_equal, restore_final, tiny_config

from oscqat_jax.training import build, context, data, evaluation, phases, trainer
from oscqat_jax.training import step as step_lib


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    config = tiny_config(float_train__epochs=1)
    summary = trainer.train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_a_full_run_writes_metrics_plots_and_a_summary(full_run):
    workdir, _, summary = full_run
    for name in ("metrics.jsonl", "accuracy.png", "oscillations.png", "threshold_distance.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for key in ("float", "qat_pre_bn", "qat_post_bn", "oscillating_peak", "frozen_end"):
        assert summary[key] is not None, key
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    qat_rows = [r for r in rows if "qat/loss" in r]
    assert qat_rows and all(
        "qat/freeze_threshold" in r and "qat/dampening_weight" in r for r in qat_rows
    )
    eval_rows = [r for r in rows if "eval/top1_post_bn" in r]
    assert len(eval_rows) == 2  # one per epoch
    assert any(k.startswith("eval/layer/") for k in eval_rows[-1])
    # Freezing ran: thresholds were 0 until the anneal start, then positive.
    thresholds = [r["qat/freeze_threshold"] for r in qat_rows]
    assert thresholds[0] == 0.0 and thresholds[-1] > 0.0


def test_a_stopped_and_resumed_run_ends_in_the_same_state(full_run, tmp_path):
    workdir, config, full_summary = full_run
    resumed = str(tmp_path / "resumed")
    trainer.train_and_evaluate(tiny_config(float_train__epochs=1, train__stop_at_step=3), resumed)
    step, _ = restore_final(resumed, config)
    assert step == 3
    summary = trainer.train_and_evaluate(tiny_config(float_train__epochs=1), resumed)
    # The summary covers the whole run, the part before the stop included.
    for key in ("qat_pre_bn", "qat_post_bn", "oscillating_peak", "frozen_end"):
        np.testing.assert_allclose(summary[key], full_summary[key], rtol=1e-6, err_msg=key)
    step_a, state_a = restore_final(workdir, config)
    step_b, state_b = restore_final(resumed, config)
    assert step_a == step_b == 12
    assert_trees_equal(state_a, state_b)


def test_a_checkpoint_of_another_bit_width_is_refused(full_run):
    workdir, _, _ = full_run
    with pytest.raises(ValueError, match="n_bits"):
        trainer.train_and_evaluate(tiny_config(float_train__epochs=1, quant__n_bits=4), workdir)


def test_evaluate_mode_reads_the_newest_checkpoint(full_run):
    workdir, config, summary = full_run
    result = trainer.evaluate_checkpoint(config, workdir)
    assert result["step"] == 12
    np.testing.assert_allclose(result["top1_post_bn"], summary["qat_post_bn"], atol=1e-6)


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    config = tiny_config(optimizer__lr=1e12, train__checkpoint_every=2, train__log_every=1)
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        trainer.train_and_evaluate(config, str(tmp_path))


class _NaNAtStep:
    """A source whose training batch of one step holds a NaN pixel."""

    def __init__(self, source, bad_step):
        self.source, self.bad_step = source, bad_step

    def __getattr__(self, name):
        return getattr(self.source, name)

    def train_batches(self, start_step, **kwargs):
        for step, (images, labels) in enumerate(
            self.source.train_batches(start_step, **kwargs), start_step
        ):
            if step == self.bad_step:
                images = images.copy()
                images[0, 0, 0, 0] = np.nan
            yield images, labels


def test_an_injected_nan_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    load = data.load_dataset
    # The 0-based batch 4 is the 5th step; checkpoints are written after steps 2 and 4.
    monkeypatch.setattr(data, "load_dataset", lambda c: _NaNAtStep(load(c), 4))
    config = tiny_config(train__checkpoint_every=2, train__log_every=1)
    workdir = str(tmp_path / "run")
    with pytest.raises(
        FloatingPointError, match=r"at step 5; stopping \(the last good checkpoint \(step 4\)"
    ):
        trainer.train_and_evaluate(config, workdir)
    step, state = restore_final(workdir, config)
    assert step == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_a_corrupted_newest_checkpoint_is_reported_and_the_previous_one_used(
    full_run, tmp_path, caplog
):
    import shutil

    workdir, config, _ = full_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    newest = os.path.join(copy, "checkpoints", "12", "state")
    for root, _, files in os.walk(newest):  # every file of the newest state cut in half
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
    result = trainer.evaluate_checkpoint(config, copy)
    assert result["step"] == 8  # checkpoints every 4 steps: 12 is damaged, 8 is used
    assert "cannot be read" in caplog.text
    assert any(
        n.startswith("12.unreadable-") for n in os.listdir(os.path.join(copy, "checkpoints"))
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model__name", "alexnet", "model.name"),
        ("quant__setup", "int8", "quant.setup"),
        ("quant__n_bits", 9, "quant.n_bits"),
        ("osc_freeze__threshold", -0.1, "osc_freeze.threshold"),
        ("osc_damp__anneal_start", 1.0, "osc_damp.anneal_start"),
        ("osc_damp__weight", -1.0, "osc_damp.weight"),
        ("model__pretrained", "/nonexistent/weights.pth", "model.pretrained"),
        ("model__pretrained_layout", "keras", "model.pretrained_layout"),
        ("data__name", "imagenet_folder", "data.dir"),
        ("data__tfds_format", "parquet", "data.tfds_format"),
        ("data__num_workers", -1, "data.num_workers"),
        ("distributed__process_id", 2, "distributed.process_id"),
    ],
)
def test_bad_configuration_fails_before_any_work(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import Mesh
    from testkit import tiny_config
    from oscqat_jax.training import build, context, data, phases, step as step_lib

    config = tiny_config()
    dataset = data.load_dataset(config.data)
    mesh4 = step_lib.Sharded(Mesh(np.asarray(jax.devices()), ("data",)), step_lib.FAST_COMPILE)
    mesh1 = step_lib.Sharded(Mesh(np.asarray(jax.devices()[:1]), ("data",)), step_lib.FAST_COMPILE)
    assert mesh4.num_devices == 4

    def run(sharded):
        ctx = context.Context(config, "", dataset, sharded, None)
        float_model = build.build_model(config, dataset.num_classes, quantize=False)
        model = build.build_model(config, dataset.num_classes)
        variables = phases.calibrate(ctx, model, phases.init_variables(float_model, ctx))
        opt = build.optimizer(config, phase="qat", total_steps=12, steps_per_epoch=6)
        table = build.qat_schedules(config, opt, 12).table(12)
        fn = step_lib.make_train_step(model, opt.tx, step_lib.StepConfig(
            oscillations=step_lib.OscillationSettings(
                dampen=True, momentum=config.osc_freeze.ema_momentum)))
        train_step = sharded.jit_train_step(fn)
        state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
        initial = jax.device_get(state.params)
        # Three steps: with 3-bit activations the network is discontinuous, so once a value
        # lands on a rounding threshold in one run and not the other (a different reduction
        # order moves it by an ulp), the runs part ways legitimately; that takes a few steps.
        for step in range(3):
            hparams = step_lib.hparams_at(table, step + 4)  # freezing and dampening active
            state, _ = train_step(state, sharded.put_batch(ctx.train_batch(step)), hparams)
        moved = max(float(np.max(np.abs(x - y))) for x, y in zip(
            jax.tree_util.tree_leaves(initial), jax.tree_util.tree_leaves(jax.device_get(state.params))))
        assert moved > 1e-3, moved
        assert train_step._cache_size() == 1, "the train step was recompiled"
        return jax.device_get(state)

    a, b = run(mesh4), run(mesh1)
    worst = 0.0
    for name in ("params", "batch_stats", "oscillation"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(a, name)),
                        jax.tree_util.tree_leaves(getattr(b, name)), strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)))
    print("MAX_DIFF", worst)
    """
)


def test_four_devices_match_one_device_on_the_same_global_batch():
    script = SHARDED_SCRIPT.format(root=ROOT, tests=TESTS)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split("MAX_DIFF")[1])
    assert worst <= 1e-5, worst


def test_pretrained_weights_are_the_starting_point(tmp_path):
    from flax import traverse_util

    config = tiny_config(
        # The smallest rates validation allows (a learning rate must be > 0): far below what
        # moves a float32 weight within the test's tolerance.
        optimizer__lr=1e-30,
        optimizer__weight_decay=0.0,
        optimizer__quant_lr=0.0,
        train__epochs=1,
    )
    dataset = data.load_dataset(config.data)
    ctx = context.Context(config, "", dataset, step_lib.Sharded.over_all_devices(), None)
    float_model = build.build_model(config, dataset.num_classes, quantize=False)
    variables = jax.device_get(phases.init_variables(float_model, ctx))
    source = jax.tree_util.tree_map(lambda v: np.asarray(v) * 1.5 + 0.01, variables)
    arrays = {
        "/".join((collection, *k)): v
        for collection in ("params", "batch_stats")
        for k, v in traverse_util.flatten_dict(source[collection]).items()
    }
    np.savez(tmp_path / "weights.npz", **arrays)
    config.model.pretrained = str(tmp_path / "weights.npz")
    config.model.pretrained_layout = "converted"
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config, workdir)
    _, state = restore_final(workdir, config)
    # With (near) zero learning rates and no decay, QAT leaves the loaded weights as they were.
    kernels = traverse_util.flatten_dict(source["params"])
    trained = traverse_util.flatten_dict(state["params"])
    assert kernels and all(k in trained for k in kernels)
    for key, value in kernels.items():
        np.testing.assert_allclose(trained[key], value, rtol=1e-6, err_msg="/".join(key))


def test_export_mode_writes_the_integer_model_of_the_checkpoint(full_run, tmp_path):
    from oscqat_jax import export
    from oscqat_jax.nn.config import QuantContext

    workdir, config, _ = full_run
    output = str(tmp_path / "model.npz")
    manifest = trainer.export_checkpoint(config, workdir, output)
    assert manifest["model"]["name"] == "mobilenet_v2" and manifest["weights"]
    model, variables = export.load_export(output)
    # The exported model computes what the checkpoint computes after BN re-estimation.
    ctx = context.open_run(config, workdir, write_metrics=False)
    qat_model, state = phases.restore_qat_state(ctx)
    bn_fn = ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(qat_model))
    reference = dict(
        state.variables, batch_stats=evaluation.reestimate_bn(ctx, bn_fn, state.variables)
    )
    images = next(ctx.eval_batches())[0]
    eval_context = QuantContext.create("eval")
    want = qat_model.apply(reference, images, eval_context)
    got = model.apply(variables, images, eval_context)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="suffix"):
        trainer.export_checkpoint(config, workdir, str(tmp_path / "model.onnx"))
