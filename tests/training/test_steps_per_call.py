"""``train.steps_per_call`` = K: K train steps in one compiled call (oscqat_jax.training.calls).

What must hold: each step reads the batch and the schedule row it reads with K = 1 (the
device gathers the resident images from the host's plan, or K host batches are stacked), calls
end at every flush, epoch end, checkpoint and stop, every phase runs exactly its steps, the
K-step program compiles once, and a run ends in the state of K = 1 (float32 rounding in the
floats, integers and frozen masks identical); a resumed run with K > 1 ends bit for bit in the
state of the uninterrupted one. Each comparison has a negative control that must fail it.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import types

import jax
import numpy as np
import pytest
from testkit import (
    ROOT,
    TESTS,
    assert_trees_equal,
    restore_final,
    run_pickling_script,
    tiny_config,
)

from oscqat_jax.training import build, calls, context, data, loop, models, phases, trainer
from oscqat_jax.training import step as step_lib
from oscqat_jax.training.data import arrays, base, resident

# ----------------------------------------------------------------------------- call lengths


def _calls(total, k, every, stop_at=0, start=0):
    lengths, done = [], start
    while done < total:
        n = calls.call_length(done, steps_per_call=k, total=total, every=every, stop_at=stop_at)
        lengths.append(n)
        done += n
        if done == stop_at:
            break
    return lengths


def _flush_steps(total, every, stop_at=0):
    """The steps after which the loop looks at the state (K = 1's flushes)."""
    steps = {s for s in range(1, total + 1) if any(s % n == 0 for n in every)} | {total}
    return steps | ({stop_at} if 0 < stop_at < total else set())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 100])
@pytest.mark.parametrize(
    "total, every, stop_at",
    [(12, (5, 6, 4), 0), (12, (12, 6), 0), (44, (20, 44), 0), (30, (7, 10, 9), 13), (5, (50,), 0)],
)
def test_calls_end_at_every_flush_and_run_exactly_the_phase(k, total, every, stop_at):
    lengths = _calls(total, k, every, stop_at)
    ends = set(np.cumsum(lengths).tolist())
    flushes = _flush_steps(total, every, stop_at)
    assert sum(lengths) == (stop_at or total)
    assert all(1 <= n <= k for n in lengths)
    assert {s for s in flushes if s <= (stop_at or total)} <= ends
    # Between two flushes the calls are full (K steps) but the last.
    bounds = sorted(s for s in flushes | {0} if s <= (stop_at or total))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        inside = [n for n, end in zip(lengths, np.cumsum(lengths), strict=True) if lo < end <= hi]
        assert inside == [k] * ((hi - lo) // k) + ([(hi - lo) % k] if (hi - lo) % k else [])


def test_a_resumed_phase_calls_from_its_checkpoint_as_the_uninterrupted_one_did():
    every = (5, 6, 4)
    uninterrupted = np.cumsum(_calls(12, 4, every)).tolist()
    resumed = (4 + np.cumsum(_calls(12, 4, every, start=4))).tolist()
    assert resumed == [e for e in uninterrupted if e > 4]
    assert uninterrupted == [4, 5, 6, 8, 10, 12]


# ----------------------------------------------------------------------------- device batches


@pytest.fixture(scope="module")
def digits():
    return dataclasses.replace(arrays.load_digits(image_size=16), max_shift=2, flip=True)


def test_device_batches_are_the_host_batches_bit_for_bit(digits):
    batch_size, seed = 32, 3
    per_epoch = base.steps_per_epoch(digits, batch_size)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = resident.put(digits, sharding)
    gather = jax.jit(lambda d, p: resident.gather(d, p, max_shift=2, flip=True))
    start = per_epoch - 2  # across an epoch's end: a new permutation
    plans = digits.train_plans(start, batch_size=batch_size, seed=seed)
    for step in range(start, start + 4):
        images, labels = jax.device_get(gather(on_device, resident.plan_arrays(next(plans))))
        want = base.train_batch(
            digits, step, batch_size=batch_size, seed=seed, max_shift=2, flip=True
        )
        np.testing.assert_array_equal(images, want[0])
        np.testing.assert_array_equal(labels, want[1])
    # Negative control: the plan of the next step is another batch.
    shifted = next(digits.train_plans(start + 1, batch_size=batch_size, seed=seed))
    other, _ = jax.device_get(gather(on_device, resident.plan_arrays(shifted)))
    assert not np.array_equal(
        other, base.train_batch(digits, start, batch_size=32, seed=3, max_shift=2, flip=True)[0]
    )
    # Every augmentation took part.
    plan = next(digits.train_plans(start, batch_size=batch_size, seed=seed))
    assert plan.mirror.any() and not plan.mirror.all() and len(set(plan.dy.tolist())) == 5


def test_each_process_plans_its_own_rows(digits):
    whole = next(digits.train_plans(50, batch_size=32, seed=1))
    for p in range(2):
        part = next(digits.train_plans(50, batch_size=32, seed=1, process_index=p, process_count=2))
        for got, want in zip(dataclasses.astuple(part), dataclasses.astuple(whole), strict=True):
            np.testing.assert_array_equal(got, want[16 * p : 16 * p + 16])


def test_only_an_in_memory_split_within_the_limit_is_resident(digits):
    size = resident.nbytes(digits)
    assert size == digits.train_images.nbytes + digits.train_labels.nbytes
    assert size > 2**20  # 1437 images of 16x16x1 float32: 1.4 MiB
    assert resident.fits(digits, 2) and not resident.fits(digits, 1)
    assert not resident.fits(object(), 1024)  # a file-based source


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4"])
def test_steps_per_call_must_be_a_positive_int(value):
    config = tiny_config()
    with config.train.ignore_type():
        config.train.steps_per_call = value
    with pytest.raises(ValueError) as error:
        build.validate(config)
    assert str(error.value) == (
        f"config.train.steps_per_call = {value!r} is not valid: use a positive int (1: one "
        "train step per call)."
    )


# ----------------------------------------------------------------------------- the loop


class _Writer:
    """Records what the loop logs: ``(step, means)`` per flush."""

    def __init__(self):
        self.records = []

    def write(self, step, means, prefix=""):
        self.records.append((step, dict(means)))


@pytest.fixture(scope="module")
def calibrated():
    return _calibrate()


def _calibrate():
    """The tiny config's QAT variables after range initialisation (host copy)."""
    config = _loop_config(1)
    source = data.load_dataset(config.data)
    ctx = context.Context(
        config, "", source, step_lib.Sharded.over_all_devices(fast_compile=True), None
    )
    forward = models.forward_of(config, source)
    return jax.device_get(phases.calibrate(ctx, forward, phases.init_variables(forward, ctx)))


def _loop_config(k, seed=0):
    # 12 steps in 2 epochs of 6; flushes after 5, 6, 10, 12: calls of K = 4 are 4,1,1,4,2.
    config = tiny_config(
        train__steps_per_call=k, train__log_every=5, data__max_shift=1, data__flip=True
    )
    config.seed = seed
    return config


def _run_loop(config, variables, phase="qat"):
    """The loop of the ``qat`` (or ``float``) phase over ``variables`` (no checkpoints): the
    final state (host), the logged records and the K-step program (None for K = 1:
    ``jitted`` and the abstract arguments of its ``first_call``)."""
    source = data.load_dataset(config.data)
    writer = _Writer()
    ctx = context.Context(
        config, "", source, step_lib.Sharded.over_all_devices(fast_compile=True), writer
    )
    per_epoch = ctx.steps_per_epoch
    model = models.forward_of(config, source)  # the float phase runs it unquantized
    if phase == "qat":
        total = config.train.epochs * per_epoch
        opt = build.optimizer(config, phase="qat", total_steps=total, steps_per_epoch=per_epoch)
        schedules = build.qat_schedules(config, opt, total)
        step_config = build.qat_step_config(config)
    else:
        total = config.float_train.epochs * per_epoch
        opt = build.optimizer(config, phase="float", total_steps=total, steps_per_epoch=per_epoch)
        schedules, step_config = build.float_schedules(opt), build.FLOAT_STEP
    programs = []
    jit_multi_step = step_lib.Sharded.jit_multi_step

    def recorded(self, *args):
        program = types.SimpleNamespace(jitted=jit_multi_step(self, *args), first_call=None)
        programs.append(program)

        def call(*call_args):
            if program.first_call is None:  # abstract, with shardings: for lowering again
                program.first_call = jax.tree_util.tree_map(_abstract, call_args)
            return program.jitted(*call_args)

        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_lib.Sharded, "jit_multi_step", recorded)
        state, complete = loop.train_phase(
            ctx,
            state=ctx.sharded.replicate(
                step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(ctx.seed("qat_state")))
            ),
            step_fn=step_lib.make_train_step(model, opt.tx, step_config),
            table=schedules.table(total),
            total_steps=total,
            prefix=phase,
            ckpt=None,
            on_epoch_end=None,
        )
    assert complete
    return jax.device_get(state), writer.records, (programs[0] if programs else None)


def _abstract(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _mismatches(a, b) -> list[str]:
    """The leaves of two train states that differ by more than float32 rounding of a few
    steps (floats), or at all (integers, booleans: step, frozen masks, integer EMAs' signs)."""
    out = []
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        if not np.issubdtype(x.dtype, np.floating):
            if not np.array_equal(x, y):
                out.append(name)
        elif not np.allclose(x, y, atol=1e-5 if "opt_state" in name else 1e-6, rtol=1e-5):
            out.append(name)
    return out


def _frozen(state) -> int:
    return sum(
        int(np.sum(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.oscillation)
        if jax.tree_util.keystr(path).endswith("['frozen']")
    )


@pytest.mark.slow
def test_k_steps_per_call_end_where_one_step_per_call_ends(calibrated):
    one, one_log, none = _run_loop(_loop_config(1), calibrated)
    many, many_log, program = _run_loop(_loop_config(4), calibrated)
    assert none is None and program is not None
    # Five calls of 4, 1, 1, 4 and 2 steps with every row of the table changing: one compile.
    assert program.jitted._cache_size() == 1
    assert int(one.step) == int(many.step) == 12
    assert _mismatches(one, many) == []
    assert _frozen(one) == _frozen(many) > 0  # freezing took part
    # The same flushes, the same means: the same batches and schedule rows, step by step.
    assert [s for s, _ in many_log] == [s for s, _ in one_log] == [5, 6, 10, 12]
    for (_, a), (_, b) in zip(one_log, many_log, strict=True):
        assert set(a) == set(b)
        for key in ("lr", "freeze_threshold", "dampening_weight", "quant_lr"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(
            [a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_the_loop_comparison_fails_for_other_batches(calibrated):
    # Negative control of the test above: the same start, K = 4, the batches of another seed.
    one, _, _ = _run_loop(_loop_config(1), calibrated)
    other, _, _ = _run_loop(_loop_config(4, seed=1), calibrated)
    assert len(_mismatches(one, other)) > 10


@pytest.mark.slow
def test_the_float_phase_with_k_steps_per_call_ends_in_the_state_of_one_step_per_call():
    # Three epochs of 6 steps, flushes after 5, 6, 10, 12, 15, 18: calls of 4, 1, 1, 4, 2, 3, 1, 2.
    # A stable rate: at the tiny config's 0.05 the loss on random images climbs for the
    # whole run and any difference, an ulp included, doubles every step or so.
    config = tiny_config(
        float_train__epochs=3, train__log_every=5, data__max_shift=1, data__flip=True
    )
    config.float_train.optimizer.lr = 0.01
    source = data.load_dataset(config.data)
    ctx = context.Context(
        config, "", source, step_lib.Sharded.over_all_devices(fast_compile=True), None
    )
    variables = jax.device_get(phases.init_variables(models.forward_of(config, source), ctx))
    config.train.steps_per_call = 1
    one, one_log, _ = _run_loop(config, variables, phase="float")
    config.train.steps_per_call = 4
    many, many_log, program = _run_loop(config, variables, phase="float")
    assert program.jitted._cache_size() == 1
    assert int(one.step) == int(many.step) == 18
    assert _mismatches(one, many) == []
    assert [s for s, _ in many_log] == [s for s, _ in one_log] == [5, 6, 10, 12, 15, 18]
    # Negative control: the batches of another seed end elsewhere.
    config.seed = 1
    other, _, _ = _run_loop(config, variables, phase="float")
    assert len(_mismatches(one, other)) > 10


# ----------------------------------------------------------------------------- whole runs


def _run_config(k, **overrides):
    # Two QAT epochs of 6 steps, flushes after 4 (checkpoint), 5 (log), 6 (epoch), 8
    # (checkpoint), 10 (log) and 12: with K = 4, calls of 4, 1, 1, 2, 2, 2. No float phase:
    # its rounding differences (see the float test below) would start QAT from weights an ulp
    # apart, and in a 3-bit network an ulp can move a value across a rounding threshold,
    # after which two correct runs part ways (as between one and four devices).
    return tiny_config(
        train__steps_per_call=k,
        train__log_every=5,
        train__checkpoint_every=4,
        data__max_shift=1,
        data__flip=True,
        **overrides,
    )


def _records(workdir) -> dict[int, dict]:
    import json

    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Whole runs through the trainer: K = 1; K = 4 with the images on the device; K = 4 with
    host batches; K = 4 stopped after step 5 (its state kept) and resumed."""
    out = {}

    def train(name, config):
        workdir = str(tmp_path_factory.mktemp(name))
        summary = trainer.train_and_evaluate(config, workdir)
        out[name] = (workdir, summary, *restore_final(workdir, config))

    train("one", _run_config(1))
    train("device", _run_config(4))
    train("host", _run_config(4, data__resident_max_mb=0))
    stopped = str(tmp_path_factory.mktemp("resumed"))
    trainer.train_and_evaluate(_run_config(4, train__stop_at_step=5), stopped)
    out["stopped_at"], out["stopped"] = restore_final(stopped, _run_config(4))
    summary = trainer.train_and_evaluate(_run_config(4), stopped)
    out["resumed"] = (stopped, summary, *restore_final(stopped, _run_config(4)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["device", "host"])
def test_a_run_with_k_steps_per_call_ends_in_the_state_of_one_step_per_call(runs, name):
    one_dir, one_summary, one_step, one = runs["one"]
    workdir, summary, step, state = runs[name]
    assert step == one_step == 12
    assert _mismatches(one, state) == []
    frozen = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["oscillation"])
        if jax.tree_util.keystr(path).endswith("['frozen']")
    ]
    assert sum(int(f.sum()) for f in frozen) > 0
    for key in ("float", "qat_pre_bn", "qat_post_bn", "frozen_end", "oscillating_peak"):
        np.testing.assert_allclose(summary[key], one_summary[key], rtol=1e-6, err_msg=key)
    # QAT and the evaluations logged at the same steps the same values.
    want, got = _records(one_dir), _records(workdir)
    assert sorted(got) == sorted(want)
    for s, row in want.items():
        assert set(got[s]) == set(row), s
        for key, value in row.items():
            if key.endswith(("lr", "freeze_threshold", "dampening_weight", "step")):
                assert got[s][key] == value, (s, key)
            elif isinstance(value, float) and not key.endswith("time"):
                np.testing.assert_allclose(
                    got[s][key], value, rtol=1e-4, atol=1e-6, err_msg=f"{s} {key}"
                )


@pytest.mark.slow
def test_a_resumed_run_with_k_steps_per_call_is_exact(runs):
    assert runs["stopped_at"] == 5  # mid-call: the stop ends a call of K = 4 after one step
    _, _, step, resumed = runs["resumed"]
    _, _, _, uninterrupted = runs["device"]
    assert step == 12
    assert_trees_equal(resumed, uninterrupted)


@pytest.mark.slow
def test_the_run_comparison_fails_for_another_run(runs):
    # The same run stopped 7 steps short (no extra run: the stopped one above): parameters,
    # statistics, tracking and optimizer states all differ, and the comparison must say so.
    assert len(_mismatches(runs["one"][3], runs["stopped"])) > 10


FOUR_DEVICES = textwrap.dedent(
    """
    import os, pickle, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path[:0] = [{root!r}, {tests!r}, os.path.join({tests!r}, "training")]
    import jax
    import test_steps_per_call as t
    assert jax.device_count() == 4
    variables = t._calibrate()
    out = {{}}
    for name, k, resident_mb in (("one", 1, 1024), ("device", 4, 1024), ("host", 4, 0)):
        config = t._loop_config(k)
        config.data.resident_max_mb = resident_mb
        state, records, multi = t._run_loop(config, variables)
        hlo = multi and multi.jitted.lower(*multi.first_call).compile().as_text()
        out[name] = dict(
            state=state, records=records, compiles=multi and multi.jitted._cache_size(),
            all_reduce=bool(hlo) and "all-reduce" in hlo,
            batch_sharding=multi and str(jax.tree_util.tree_leaves(multi.first_call[2]["inputs"])[0].sharding.spec),
        )
    with open(sys.argv[1], "wb") as f:
        pickle.dump(out, f)
    """
)


@pytest.mark.slow
def test_four_devices_split_each_step_of_a_call_and_end_where_one_step_per_call_ends(tmp_path):
    code = FOUR_DEVICES.format(root=ROOT, tests=TESTS)
    runs = run_pickling_script(code, str(tmp_path / "runs.pkl"))
    for name in ("device", "host"):
        run = runs[name]
        assert run["compiles"] == 1, name
        # Each step's batch (plan or images) is split over the devices, the BN statistics and
        # gradients are summed across them.
        assert run["batch_sharding"] == "P(None, 'data')", name
        assert run["all_reduce"], name
        assert _mismatches(runs["one"]["state"], run["state"]) == [], name
        assert [s for s, _ in run["records"]] == [s for s, _ in runs["one"]["records"]]
    assert _frozen(runs["one"]["state"]) == _frozen(runs["device"]["state"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "injected, message, kept",
    [
        # A NaN pixel in batch 4 (the 5th step), host batches (a wrapped source): the call of
        # steps 5-6 holds it, and the flush after step 6 names step 5.
        ("pixel", "The training loss became nan at step 5", 2),
        # A NaN learning rate at 0-based step 3, the images on the device: the state after
        # step 4, a checkpoint step, is refused.
        ("learning_rate", "The train state after step 4 holds non-finite values", 2),
    ],
)
def test_a_nan_inside_a_call_stops_where_one_step_per_call_stops(
    injected, message, kept, tmp_path, monkeypatch
):
    from testkit import qat_schedules_with_model_lr

    if injected == "pixel":
        from test_training import _NaNAtStep

        load = data.load_dataset
        monkeypatch.setattr(data, "load_dataset", lambda c: _NaNAtStep(load(c), 4))
    else:
        monkeypatch.setattr(build, "qat_schedules", qat_schedules_with_model_lr(3, np.nan))
    # Flushes after 2, 3, 4 and 6: calls of 2, 1, 1, 2 steps with K = 4.
    config = tiny_config(train__steps_per_call=4, train__log_every=3, train__checkpoint_every=2)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError) as stopped:
        trainer.train_and_evaluate(config, workdir)
    assert str(stopped.value).startswith(message), str(stopped.value)
    assert f"the last good checkpoint (step {kept})" in str(stopped.value)
    assert restore_final(workdir, config)[0] == kept
