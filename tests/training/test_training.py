"""End-to-end tests of the training program on a tiny depth-wise network and stand-in data."""

import glob
import json
import os
import re
import textwrap

import jax
import numpy as np
import pytest
from testkit import (
    ROOT,
    TESTS,
    assert_trees_equal,
    qat_schedules_with_model_lr,
    restore_final,
    run_pickling_script,
    tiny_config,
)

from oscqat_jax.nn import collect
from oscqat_jax.training import build, context, data, evaluation, models, phases, trainer
from oscqat_jax.training import step as step_lib


@pytest.fixture(scope="module")
def running_bn_stats():
    """The BN statistics each evaluation of ``full_run`` started from (before re-estimation)."""
    return []


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, running_bn_stats):
    workdir = str(tmp_path_factory.mktemp("full"))
    config = tiny_config(float_train__epochs=1)
    epoch_record = evaluation.Evaluator.epoch_record

    def recording_epoch_record(self, state):
        running_bn_stats.append(jax.device_get(state.batch_stats))
        return epoch_record(self, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.Evaluator, "epoch_record", recording_epoch_record)
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


def _bn_batch_statistics(config, state) -> list[dict[str, np.ndarray]]:
    """Each BN re-estimation batch's per-layer means and unbiased variances (float64),
    keyed ``<layer path>/mean`` and ``<layer path>/var``, computed on ``state``'s weights."""
    from flax import traverse_util

    source = data.load_dataset(config.data)
    forward = models.package_forward(config, source.num_classes)
    # The statistics pass with the trainer's XLA options, so its per-batch values are the
    # trainer's bit for bit; the average over batches is computed here.
    bn_fn = jax.jit(step_lib.make_bn_stats_step(forward), compiler_options=step_lib.FAST_COMPILE)
    variables = {k: state[k] for k in ("params", "batch_stats", "oscillation", "quant_stats")}
    batches = source.train_batches(
        0, batch_size=config.data.batch_size, seed=config.seed + context.SEED_OFFSETS["bn_batches"]
    )
    out = []
    for _ in range(config.eval.bn_batches):
        one = traverse_util.flatten_dict(
            jax.device_get(bn_fn(variables, next(batches)[0])), sep="/"
        )
        out.append({k: np.asarray(v, np.float64) for k, v in one.items()})
    source.close()
    return out


def test_the_final_checkpoint_holds_the_re_estimated_bn_statistics(full_run, running_bn_stats):
    from flax import traverse_util

    workdir, config, _ = full_run
    step, state = restore_final(workdir, config)
    assert step == 12 and len(running_bn_stats) == 2  # evaluated after epochs 1 and 2
    per_batch = _bn_batch_statistics(config, state)
    assert len(per_batch) == config.eval.bn_batches == 2
    # docs/method.md §8 (the reference's BN momentum 1): the plain average of the per-batch
    # means and of the per-batch unbiased variances, whatever the running statistics were.
    want = {k: np.mean([b[k] for b in per_batch], axis=0) for k in per_batch[0]}
    stored = traverse_util.flatten_dict(state["batch_stats"], sep="/")
    running = traverse_util.flatten_dict(running_bn_stats[-1], sep="/")
    assert set(stored) == set(want) == set(running) and len(want) >= 20
    for key, value in want.items():
        assert np.max(np.abs(per_batch[0][key] - per_batch[1][key])) > 0, key
        # The trainer sums and divides in float32: a few ulps from the float64 average.
        np.testing.assert_allclose(stored[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
        assert np.max(np.abs(running[key] - value)) > 1e-3 * np.max(np.abs(value)), key
    # The final record logs how far the replaced running statistics were from the new ones.
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    final = [r for r in rows if "eval/top1_post_bn" in r][-1]
    assert final["step"] == 12
    mismatch = collect.bn_mismatch(running_bn_stats[-1], state["batch_stats"])
    assert {k.split("/")[0] for k in mismatch} == {"bn_mean_shift", "bn_std_error"}
    for key, value in mismatch.items():
        assert value > 0.0, key
        np.testing.assert_allclose(final[f"eval/{key}"], value, rtol=1e-12, err_msg=key)


@pytest.mark.slow
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


def test_a_workdir_of_the_ctx_models_is_refused_naming_the_formats(full_run, tmp_path):
    import shutil

    from etils import epath

    from oscqat_jax.training import checksums

    workdir, config, _ = full_run
    copy = str(tmp_path / "old")
    shutil.copytree(workdir, copy)
    # Every checkpoint as the program wrote it before the format was recorded.
    for item in glob.glob(os.path.join(copy, "*", "*", "metadata")):
        with open(os.path.join(item, "metadata")) as f:
            metadata = json.load(f)
        del metadata["format_version"]
        with open(os.path.join(item, "metadata"), "w") as f:
            json.dump(metadata, f)
        os.remove(os.path.join(item, checksums.CHECKSUMS))
        checksums.write_checksums(epath.Path(item))
    checkpoints = {
        path: open(path, "rb").read()
        for path in glob.glob(os.path.join(copy, "*", "*", "**"), recursive=True)
        if os.path.isfile(path)
    }
    assert any("float_model" in p for p in checkpoints) and len(checkpoints) > 20
    for run in (
        lambda: trainer.train_and_evaluate(config, copy),
        lambda: trainer.evaluate_checkpoint(config, copy),
    ):
        with pytest.raises(ValueError) as info:
            run()
        assert re.fullmatch(
            r"The checkpoint of step \d+ in \S+ has checkpoint format 1 and this program reads "
            r"format 2 \(the variable paths of the package's models changed since\), so it "
            r"cannot be resumed, evaluated or exported; train again in another --workdir, or "
            r"use the oscqat_jax version that wrote it\.",
            str(info.value),
        ), str(info.value)
    for path, content in checkpoints.items():
        assert open(path, "rb").read() == content, path


def test_evaluate_mode_reads_the_newest_checkpoint(full_run):
    workdir, config, summary = full_run
    result = trainer.evaluate_checkpoint(config, workdir)
    assert result["step"] == 12
    np.testing.assert_allclose(result["top1_post_bn"], summary["qat_post_bn"], atol=1e-6)


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    # The divergence stop off: at this rate it would stop the run before the loss is NaN.
    config = tiny_config(
        optimizer__lr=1e12,
        train__checkpoint_every=2,
        train__log_every=1,
        train__divergence_factor=0.0,
    )
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


@pytest.mark.slow
def test_an_injected_nan_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    load = data.load_dataset
    # The 0-based batch 4 is the 5th step; checkpoints are written after steps 2 and 4. Step
    # 5's loss is the first computed from checkpoint 4's weights: a NaN there does not
    # confirm them, so step 2 is the last good checkpoint and step 4 is moved aside.
    monkeypatch.setattr(data, "load_dataset", lambda c: _NaNAtStep(load(c), 4))
    config = tiny_config(train__checkpoint_every=2, train__log_every=1)
    workdir = str(tmp_path / "run")
    with pytest.raises(
        FloatingPointError, match=r"at step 5; stopping \(the last good checkpoint \(step 2\)"
    ):
        trainer.train_and_evaluate(config, workdir)
    step, state = restore_final(workdir, config)
    assert step == 2
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.diverged-at-5"))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def _nan_learning_rate_at(bad_step):
    """``build.qat_schedules`` whose table has a NaN model learning rate at 0-based ``bad_step``:
    that step's loss is finite (computed before the update), the state after it is not."""
    return qat_schedules_with_model_lr(bad_step, np.nan)


# log_every=3, checkpoint_every=2: flushes after steps 2 (checkpoint), 3 (log), 4
# (checkpoint) and 6 (log, checkpoint, end of epoch); NaN steps are 1-based.
@pytest.mark.parametrize(
    "injected, nan_step, message",
    [
        # 0-based batch 3, a checkpoint step: the loss check flushes before the save.
        pytest.param("pixel", 4, "The training loss became nan at step 4", marks=pytest.mark.slow),
        # Flushed with step 6, whose loss is NaN as well: the first bad step is named.
        pytest.param("pixel", 5, "The training loss became nan at step 5", marks=pytest.mark.slow),
        # A finite loss and a NaN state at a checkpoint step: the state check refuses it.
        ("learning_rate", 4, "The train state after step 4 holds non-finite values"),
    ],
    ids=["pixel_at_checkpoint_step", "pixel_before_a_flush_of_two", "learning_rate"],
)
@pytest.mark.slow
def test_a_nan_between_flushes_names_an_older_finite_checkpoint(
    injected, nan_step, message, tmp_path, monkeypatch
):
    if injected == "pixel":
        load = data.load_dataset
        monkeypatch.setattr(data, "load_dataset", lambda c: _NaNAtStep(load(c), nan_step - 1))
    else:
        monkeypatch.setattr(build, "qat_schedules", _nan_learning_rate_at(nan_step - 1))
    config = tiny_config(train__log_every=3, train__checkpoint_every=2)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as stopped:
        trainer.train_and_evaluate(config, workdir)
    text = str(stopped.value)
    assert text.startswith(message), text
    named = int(re.search(r"the last good checkpoint \(step (\d+)\)", text).group(1))
    assert named < nan_step and os.path.isdir(os.path.join(workdir, "checkpoints", str(named)))
    step, state = restore_final(workdir, config)
    assert step == named  # the newest checkpoint: none was written from a bad state
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)


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
    import os, pickle, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import Mesh
    from testkit import tiny_config
    from oscqat_jax.training import build, context, data, models, phases, step as step_lib

    config = tiny_config()
    # A seed whose four steps freeze weights and round every value the same way on one and
    # four devices (see below): seed 0 parts ways at the third step.
    config.seed = 4
    dataset = data.load_dataset(config.data)
    mesh4 = step_lib.Sharded(Mesh(np.asarray(jax.devices()), ("data",)), step_lib.FAST_COMPILE)
    mesh1 = step_lib.Sharded(Mesh(np.asarray(jax.devices()[:1]), ("data",)), step_lib.FAST_COMPILE)
    assert mesh4.num_devices == 4

    def run(sharded):
        ctx = context.Context(config, "", dataset, sharded, None)
        model = models.package_forward(config, dataset.num_classes)
        variables = phases.calibrate(ctx, model, phases.init_variables(model, ctx))
        opt = build.optimizer(config, phase="qat", total_steps=12, steps_per_epoch=6)
        table = build.qat_schedules(config, opt, 12).table(12)
        # Momentum 0.5: one reversal lifts ema_osc from 0 to 0.5 > the threshold 0.25, so a
        # weight that moves at step 2 and back at step 3 is frozen for step 4. A light
        # dampening weight (0.02) lets the few weights that move do so.
        fn = step_lib.make_train_step(model, opt.tx, step_lib.StepConfig(
            oscillations=step_lib.OscillationSettings(dampen=True, momentum=0.5)))
        train_step = sharded.jit_train_step(fn)
        state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
        initial = jax.device_get(state.params)
        losses, shards = [], None
        # Four steps: with 3-bit activations the network is discontinuous, so once a value
        # lands on a rounding threshold in one run and not the other (a different reduction
        # order moves it by an ulp), the runs part ways legitimately; that takes a few steps.
        for step in range(4):
            hparams = dict(step_lib.hparams_at(table, step), freeze_threshold=np.float32(0.25),
                           dampening_weight=np.float32(0.02))
            batch = sharded.put_batch(ctx.train_batch(step))
            if shards is None:
                rows = batch[0].shape[0]
                shards = [(s.device.id, *s.index[0].indices(rows)[:2], s.data.shape)
                          for s in batch[0].addressable_shards]
            state, metrics = train_step(state, batch, hparams)
            losses.append(np.asarray(metrics["loss"]))
        moved = max(float(np.max(np.abs(x - y))) for x, y in zip(
            jax.tree_util.tree_leaves(initial), jax.tree_util.tree_leaves(jax.device_get(state.params))))
        assert moved > 1e-3, moved
        assert train_step._cache_size() == 1, "the train step was recompiled"
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
        return dict(state={{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}},
                    losses=np.asarray(losses), shards=shards)

    with open(sys.argv[1], "wb") as f:
        pickle.dump({{"four": run(mesh4), "one": run(mesh1)}}, f)
    """
)


def _parts(flat_state: dict, part: str) -> dict:
    return {k: v for k, v in flat_state.items() if k.startswith(f".{part}")}


@pytest.mark.slow
def test_four_devices_match_one_device_on_the_same_global_batch(tmp_path):
    script = SHARDED_SCRIPT.format(root=ROOT, tests=TESTS)
    runs = run_pickling_script(script, str(tmp_path / "runs.pkl"))
    four, one = runs["four"], runs["one"]
    # The global batch of 8 rows really is split: one quarter per device, in order.
    assert sorted(s[1:] for s in four["shards"]) == [
        (r, r + 2, (2, 16, 16, 1)) for r in range(0, 8, 2)
    ]
    assert len({s[0] for s in four["shards"]}) == 4
    assert [s[1:] for s in one["shards"]] == [(0, 8, (8, 16, 16, 1))]
    frozen = [
        sum(int(np.sum(v)) for k, v in run["state"].items() if k.endswith("['frozen']"))
        for run in (four, one)
    ]
    assert frozen[0] == frozen[1] > 0, frozen  # freezing took part in both runs
    assert set(four["state"]) == set(one["state"])
    # Only the reductions over the batch differ (four partial sums then an all-reduce, or
    # one sum): float32 rounding of the order, which four steps carry into the parameters
    # and BN statistics (values up to ~1) at about 1e-7. Integer and boolean state (frozen,
    # frozen_int, prev_dir, step) must agree exactly, which these tolerances enforce.
    for part in ("params", "batch_stats", "oscillation"):
        assert_trees_equal(_parts(four["state"], part), _parts(one["state"], part), atol=1e-6)
    # Range initialisation's MSE search losses are sums over the calibration batch of up to
    # ~400: the same rounding, relative.
    want = _parts(one["state"], "quant_stats")
    assert want
    assert_trees_equal(_parts(four["state"], "quant_stats"), want, atol=1e-6, rtol=1e-6)
    # SGD's momentum traces and Adam's moments of the scales: relative rounding on values up
    # to ~10, and absolute on a scale's gradient, a sum of thousands of terms of ~1 that
    # largely cancel (the classifier's weight scale: ~0.013; off by up to 1.5e-5 between
    # the processes of test_multihost.py, by 5e-7 here).
    assert_trees_equal(
        _parts(four["state"], "opt_state"), _parts(one["state"], "opt_state"), atol=1e-4, rtol=1e-5
    )
    assert len(four["losses"]) == 4
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-6)


@pytest.mark.slow
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
    forward = models.package_forward(config, dataset.num_classes)
    variables = jax.device_get(phases.init_variables(forward, ctx))
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


@pytest.mark.slow
def test_export_mode_writes_the_integer_model_of_the_checkpoint(full_run, tmp_path):
    from oscqat_jax import export

    workdir, config, _ = full_run
    output = str(tmp_path / "model.npz")
    manifest = trainer.export_checkpoint(config, workdir, output)
    assert manifest["weights"]
    # The exported model computes what the checkpoint computes after BN re-estimation.
    ctx = context.open_run(config, workdir, write_metrics=False)
    forward, state = phases.restore_qat_state(ctx)
    model, variables = export.load_export(output, model=forward.quantized)
    bn_fn = ctx.sharded.jit_batch_fn(step_lib.make_bn_stats_step(forward))
    reference = dict(
        state.variables,
        batch_stats=evaluation.reestimate_bn(ctx, bn_fn, state.variables, forward.average_bn),
    )
    images = next(ctx.eval_batches())[0]
    want = forward.logits(reference, images, "eval")
    got = model.apply(variables, images, train=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="suffix"):
        trainer.export_checkpoint(config, workdir, str(tmp_path / "model.onnx"))
