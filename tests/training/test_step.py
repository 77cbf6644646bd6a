"""Tests of oscqat_jax.training.step: the schedule table, the loss and accuracy helpers, and the
train, eval and BN-statistics steps on a tiny 3-bit MobileNetV2 (8x8 one-channel images), the
plain model quantized by rules as the trainer builds it (``models.package_forward``).

Every train-step expectation is recomputed outside the step: gradients by ``jax.grad`` of a
loss written here (log-softmax over the quantized model's own ``apply``), the dampening term
per layer from docs/method.md §7, directions by the optimizer's own ``tx.update``, integers
and BN moments with NumPy. Compiles dominate the run
time, so each step variant is compiled once per module and its states are shared by the tests.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from testkit import TEST_BLOCKS, assert_trees_equal, tiny_config

from oscqat_jax.nn import collect
from oscqat_jax.training import config as config_lib
from oscqat_jax.training import models, optim
from oscqat_jax.training import step as step_lib

N_BITS = 3
INT_RANGE = (-(2 ** (N_BITS - 1)), 2 ** (N_BITS - 1) - 1)  # signed weight grid
CONFIG = tiny_config()
assert (CONFIG.model.name, CONFIG.model.width_multiplier, CONFIG.model.block_setting) == (
    "mobilenet_v2",
    0.25,
    TEST_BLOCKS,
)
assert (CONFIG.quant.setup, CONFIG.quant.n_bits) == ("LSQ_paper", N_BITS)
FORWARD = models.package_forward(CONFIG, num_classes=4)
BATCH, IMAGE_SHAPE = 4, (8, 8, 1)
STEPS = 3
# Every column changes every step (the step must not recompile), and the freezing threshold
# is positive from the first step on.
SCHEDULES = step_lib.Schedules(
    model_lr=lambda t: 0.1 / (1.0 + t),
    quant_lr=lambda t: 0.01 * (1.0 + t),
    freeze_threshold=lambda t: 0.1 * t,
    dampening_weight=lambda t: 0.5 * t,
)
TABLE = SCHEDULES.table(STEPS)
QAT = step_lib.StepConfig(oscillations=step_lib.OscillationSettings(dampen=True))
UNTRACKED = step_lib.StepConfig(
    oscillations=step_lib.OscillationSettings(track=False, dampen=False)
)
FLOAT_TRAIN = step_lib.StepConfig(
    mode="float_train", oscillations=step_lib.OscillationSettings(dampen=True)
)


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((BATCH, *IMAGE_SHAPE)).astype(np.float32)
    return images, rng.permutation(4).astype(np.int32)


def flat(tree) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def is_quantizer_leaf(path: str) -> bool:
    return path.endswith("_scale") or path.endswith("_zero_point")


def kernel_of(params: dict, site: str) -> np.ndarray:
    """The kernel a weight quantizer at ``site`` quantizes (a ConvBN's lies in its conv)."""
    return (
        params[f"{site}/conv/kernel"]
        if f"{site}/conv/kernel" in params
        else params[f"{site}/kernel"]
    )


def dampening_by_layer(state) -> float:
    """docs/method.md §7 in NumPy, summed over every quantized layer (8-bit ones included)
    before any weight is frozen: ``(w_q - clip(w))**2`` summed over the output channels and
    averaged over the rest. The tracked layers are the 3-bit ones, the others 8-bit."""
    params = flat(state.params)
    tracked = collect.oscillation_states(state.oscillation)
    assert not any(np.any(osc.frozen) for osc in tracked.values())
    sites = [p.removesuffix("/weight_scale") for p in params if p.endswith("/weight_scale")]
    assert len(sites) == 11 and len(tracked) == 9
    total = 0.0
    for site in sites:
        w = np.asarray(kernel_of(params, site), np.float64)
        scale = np.float64(params[f"{site}/weight_scale"])
        bits = N_BITS if site in tracked else 8
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        w_q = scale * np.clip(np.round(w / scale), low, high)
        w_clipped = np.clip(w, scale * low, scale * high)
        total += np.mean(np.sum((w_q - w_clipped) ** 2, axis=-1))
    return total


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sharded():
    return step_lib.Sharded.over_all_devices(fast_compile=True)


@pytest.fixture(scope="module")
def variables():
    """Float-initialised, then calibrated on one batch (as the program does); on the host."""
    images = jnp.asarray(batch(100)[0])
    init = jax.jit(FORWARD.init, compiler_options=step_lib.FAST_COMPILE)
    floats = init(jax.random.key(0), images)
    fast = step_lib.FAST_COMPILE
    return jax.device_get(FORWARD.calibrate(floats, [images], jax.random.key(1), fast))


@pytest.fixture(scope="module")
def opt():
    return optim.create_optimizer(
        config_lib.base_config().optimizer,
        total_steps=STEPS,
        steps_per_epoch=STEPS,
        train_quantizers=True,
    )


def run_steps(cfg, variables, opt, sharded, steps):
    """States (host copies, the initial one first) and metrics of ``steps`` jitted steps on
    ``batch(0)``, ``batch(1)``, ... with the rows of TABLE; plus the jitted step, its trace
    count and the last (live) state."""
    traces = []
    step_fn = step_lib.make_train_step(FORWARD, opt.tx, cfg)

    def counted(*args):
        traces.append(1)
        return step_fn(*args)

    train_step = sharded.jit_train_step(counted)
    state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
    states, metrics = [jax.device_get(state)], []
    for t in range(steps):
        hparams = step_lib.hparams_at(TABLE, t)
        state, m = train_step(state, sharded.put_batch(batch(t)), hparams)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return types.SimpleNamespace(
        states=states, metrics=metrics, train_step=train_step, traces=traces, live=state
    )


@pytest.fixture(scope="module")
def qat_run(variables, opt, sharded):
    return run_steps(QAT, variables, opt, sharded, STEPS)


@pytest.fixture(scope="module")
def untracked_run(variables, opt, sharded):
    return run_steps(UNTRACKED, variables, opt, sharded, 2)


@pytest.fixture(scope="module")
def reference_step(opt):
    """The first train step written out: ``jax.grad`` of ``task + weight * dampening`` (a
    log-softmax over the quantized model's ``apply`` in train mode), the optimizer's
    ``tx.update`` from a fresh state, and ``p - lr * direction`` with the quantizer rate on
    ``*_scale`` leaves."""

    @functools.partial(jax.jit, compiler_options=step_lib.FAST_COMPILE)
    def step(state, images, labels, hparams, dampening_weight):
        def loss(params):
            logits, aux = FORWARD.quantized.apply(
                dict(state.variables, params=params),
                images,
                mode="train",
                freeze_threshold=hparams["freeze_threshold"],
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.split(state.rng)[1]},
                train=True,
            )
            log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
            task = -jnp.mean(log_p[jnp.arange(labels.shape[0]), labels])
            return task + dampening_weight * aux.dampening, (task, aux.dampening, aux.updates)

        grads, (task, damp, mutated) = jax.grad(loss, has_aux=True)(state.params)
        directions, opt_state = opt.tx.update(grads, opt.tx.init(state.params), state.params)

        def move(path, p, d):
            quantizer = is_quantizer_leaf(path[-1].key)
            return p - (hparams["quant_lr"] if quantizer else hparams["model_lr"]) * d

        params = jax.tree_util.tree_map_with_path(move, state.params, directions)
        return dict(
            params=flat(params),
            opt_state=opt_state,
            grads=grads,
            task=task,
            damp=damp,
            mutated=mutated,
        )

    def first_step(state, dampening_weight):
        hparams = step_lib.hparams_at(TABLE, 0)
        out = step(state, *batch(0), hparams, np.float32(dampening_weight))
        return types.SimpleNamespace(**jax.device_get(out))

    return first_step


@pytest.fixture(scope="module")
def qat_expected(qat_run, reference_step):
    return reference_step(qat_run.states[0], TABLE["dampening_weight"][0])


# ----------------------------------------------------------------------------- schedules


def test_table_gives_rates_the_update_count_and_the_rest_the_iteration_number():
    schedules = step_lib.Schedules(
        model_lr=lambda t: t,
        quant_lr=lambda t: 10 * t,
        freeze_threshold=lambda t: t / 100,
        dampening_weight=lambda t: 2.0 * t,
    )
    table = schedules.table(5)
    assert set(table) == {"model_lr", "quant_lr", "freeze_threshold", "dampening_weight"}
    for column in table.values():
        assert column.dtype == np.float32 and column.shape == (5,)
    np.testing.assert_array_equal(table["model_lr"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(table["quant_lr"], [0, 10, 20, 30, 40])
    np.testing.assert_allclose(table["freeze_threshold"], [0.01, 0.02, 0.03, 0.04, 0.05])
    np.testing.assert_array_equal(table["dampening_weight"], [2, 4, 6, 8, 10])

    row = step_lib.hparams_at(table, 3)
    assert set(row) == set(table)
    assert (row["model_lr"], row["quant_lr"], row["dampening_weight"]) == (3, 30, 8)
    assert row["freeze_threshold"] == np.float32(0.04)
    assert all(v.dtype == np.float32 and v.shape == () for v in row.values())


def test_table_without_dampening_weight_is_zeros():
    table = step_lib.Schedules(lambda t: 0.5, lambda t: 0.25, lambda t: 0.1 * t).table(4)
    assert table["dampening_weight"].dtype == np.float32
    np.testing.assert_array_equal(table["dampening_weight"], np.zeros(4))
    np.testing.assert_array_equal(table["model_lr"], np.full(4, 0.5, np.float32))
    np.testing.assert_allclose(table["freeze_threshold"], [0.1, 0.2, 0.3, 0.4])


# ----------------------------------------------------------------------------- loss, accuracy


def test_cross_entropy_equals_numpy_log_softmax():
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32) * 3
    labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = -log_p[np.arange(6), labels].mean()
    cross_entropy = jax.jit(step_lib.cross_entropy)
    np.testing.assert_allclose(cross_entropy(logits, labels), want, rtol=1e-6)
    in_bf16 = cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
    assert in_bf16.dtype == jnp.float32 and in_bf16.shape == ()


def test_topk_correct_by_hand():
    logits = np.array([[0.1, 0.5, 0.2], [0.9, 0.0, 0.3], [0.2, 0.1, 0.7]], np.float32)
    labels = np.array([2, 0, 1], np.int32)
    for k, want in [(1, [0, 1, 0]), (2, [1, 1, 0]), (3, [1, 1, 1]), (5, [1, 1, 1])]:
        got = step_lib.topk_correct(logits, labels, k)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


# ----------------------------------------------------------------------------- train state


def test_create_state_keeps_the_collections_and_starts_the_optimizer(variables, opt):
    key = jax.random.PRNGKey(7)
    state = step_lib.create_state(variables, opt.tx, key)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(state.rng, key)
    assert set(state.variables) == {"params", "batch_stats", "oscillation", "quant_stats"}
    for name, collection in state.variables.items():
        assert collection is variables[name], name
    fresh = jax.eval_shape(opt.tx.init, variables["params"])
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(fresh)
    for got, want in zip(*map(jax.tree_util.tree_leaves, (state.opt_state, fresh)), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype) and not np.any(np.asarray(got))

    float_only = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    state = step_lib.create_state(float_only, opt.tx, key)
    assert state.oscillation == {} and state.quant_stats == {}


# ----------------------------------------------------------------------------- train step


def test_first_step_moves_kernels_by_the_model_rate_and_scales_by_the_quantizer_rate(
    qat_run, qat_expected
):
    before, after, want = qat_run.states[0], qat_run.states[1], qat_expected
    got = flat(after.params)
    assert set(got) == set(want.params)
    for path, value in got.items():
        np.testing.assert_allclose(value, want.params[path], rtol=1e-5, atol=1e-7, err_msg=path)
    # Scale gradients sum many rounding residuals: two compiled programs agree to ~1e-4.
    assert_trees_equal(after.opt_state, want.opt_state, rtol=1e-4, atol=1e-5)
    assert_trees_equal(after.batch_stats, want.mutated["batch_stats"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        qat_run.metrics[0]["grad_norm"],
        np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in flat(want.grads).values())),
        rtol=1e-4,
    )

    # Adam's first update is lr * g / (|g| + eps): each scale with a gradient moves by the
    # quantizer rate (0.01), never by the model rate (0.1).
    quant_lr, model_lr = TABLE["quant_lr"][0], TABLE["model_lr"][0]
    grads = flat(want.grads)
    moved = {
        path: float(np.abs(got[path] - flat(before.params)[path]))
        for path in got
        if is_quantizer_leaf(path) and abs(float(grads[path])) > 1e-4
    }
    assert len(moved) >= 5, moved
    np.testing.assert_allclose(list(moved.values()), quant_lr, rtol=1e-3)
    kernels = [p for p in got if p.endswith("kernel")]
    assert max(float(np.abs(got[p] - flat(before.params)[p]).max()) for p in kernels) > 1e-3
    assert not np.isclose(quant_lr, model_lr)


def test_loss_is_task_loss_plus_weighted_dampening_loss(qat_run, qat_expected):
    want = qat_expected
    m = qat_run.metrics[0]
    np.testing.assert_allclose(m["task_loss"], want.task, rtol=1e-5)
    np.testing.assert_allclose(m["dampening_loss"], want.damp, rtol=1e-5)
    np.testing.assert_allclose(
        m["dampening_loss"], dampening_by_layer(qat_run.states[0]), rtol=1e-5
    )
    assert float(m["dampening_loss"]) > 0.01
    np.testing.assert_allclose(m["loss"], m["task_loss"] + 0.5 * m["dampening_loss"], rtol=1e-6)
    # The metrics follow the table's row of each step, not the first one.
    for t, m in enumerate(qat_run.metrics):
        row = step_lib.hparams_at(TABLE, t)
        assert (m["lr"], m["quant_lr"]) == (row["model_lr"], row["quant_lr"])
        assert m["dampening_weight"] == row["dampening_weight"] == 0.5 * (t + 1)
        assert m["freeze_threshold"] == row["freeze_threshold"]
        np.testing.assert_allclose(
            m["loss"], m["task_loss"] + m["dampening_weight"] * m["dampening_loss"], rtol=1e-6
        )


def test_without_dampening_the_term_has_weight_zero(untracked_run, qat_run, reference_step):
    for t, m in enumerate(untracked_run.metrics):
        assert TABLE["dampening_weight"][t] > 0
        assert m["dampening_weight"] == 0 and m["dampening_loss"] == 0
        assert m["loss"] == m["task_loss"]
    # The same first step as the dampened run, but its parameters follow the task loss alone.
    want = reference_step(untracked_run.states[0], 0.0)
    got = flat(untracked_run.states[1].params)
    for path, value in got.items():
        np.testing.assert_allclose(value, want.params[path], rtol=1e-5, atol=1e-7, err_msg=path)
    np.testing.assert_allclose(untracked_run.metrics[0]["task_loss"], want.task, rtol=1e-5)
    dampened = flat(qat_run.states[1].params)
    assert any(
        not np.allclose(got[p], dampened[p], rtol=1e-4, atol=1e-6)
        for p in got
        if p.endswith("kernel")
    )


def test_tracking_advances_the_oscillation_collection(qat_run, qat_expected):
    states = qat_run.states
    assert_trees_equal(states[1].oscillation, qat_expected.mutated["oscillation"])
    # The second step's forward saw the first step's weights: prev_int holds their integers.
    tracked = collect.oscillation_states(states[2].oscillation)
    assert len(tracked) == 9  # every 3-bit conv; the 8-bit stem and classifier are not tracked
    params = flat(states[1].params)
    changed = 0
    for path, osc in tracked.items():
        w_int = np.clip(
            np.round(kernel_of(params, path) / params[f"{path}/weight_scale"]), *INT_RANGE
        )
        np.testing.assert_array_equal(osc.prev_int, w_int, err_msg=path)
        before = collect.oscillation_states(states[0].oscillation)[path]
        changed += int(np.sum(osc.prev_int != before.prev_int))
        assert bool(osc.freezing_started) and not bool(before.freezing_started)
    assert changed > 0
    sizes = sum(np.size(s.ema_osc) for s in tracked.values())
    assert qat_run.metrics[-1]["osc/num_weights"] == sizes


def test_without_tracking_the_oscillation_collection_stays_bit_identical(untracked_run):
    initial = untracked_run.states[0]
    for state in untracked_run.states[1:]:
        assert_trees_equal(state.oscillation, initial.oscillation)
        before, after = flat(initial.params), flat(state.params)
        assert all(not np.array_equal(after[p], before[p]) for p in before if "kernel" in p)


def test_float_train_leaves_quantizers_and_oscillation_alone(variables, opt, sharded, qat_run):
    run = run_steps(FLOAT_TRAIN, variables, opt, sharded, 1)
    before, after = (flat(s.params) for s in run.states)
    quantizer = [p for p in before if is_quantizer_leaf(p)]
    assert len(quantizer) == 21  # 11 weight scales, 10 input scales
    for path in quantizer:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    kernels = [p for p in before if p.endswith("kernel")]
    assert all(not np.array_equal(after[p], before[p]) for p in kernels)
    assert_trees_equal(run.states[1].oscillation, run.states[0].oscillation)
    assert_trees_equal(run.states[1].quant_stats, run.states[0].quant_stats)
    assert not any(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(run.states[1].batch_stats),
            jax.tree_util.tree_leaves(run.states[0].batch_stats),
            strict=True,
        )
    )
    m = run.metrics[0]
    assert m["dampening_weight"] == 0 and m["dampening_loss"] == 0
    assert not any(k.startswith("osc/") for k in m)
    assert any(k.startswith("osc/") for k in qat_run.metrics[0])
    # Same batch and weights, quantizers off: another loss than the quantized step's.
    assert abs(float(m["task_loss"]) - float(qat_run.metrics[0]["task_loss"])) > 1e-4


def test_step_counts_updates_and_moves_the_rng(qat_run):
    states = qat_run.states
    for t, state in enumerate(states):
        assert state.step.dtype == np.int32 and int(state.step) == t
    for before, after in zip(states[:-1], states[1:], strict=True):
        np.testing.assert_array_equal(after.rng, jax.random.split(before.rng)[0])
        assert not np.array_equal(after.rng, before.rng)


def test_the_jitted_step_compiles_once_while_the_hparams_change(qat_run, sharded):
    for column in TABLE.values():
        assert len(set(column.tolist())) == STEPS  # every value changes every step
    assert qat_run.train_step._cache_size() == 1
    assert len(qat_run.traces) == 1
    images = sharded.put_batch(batch(0))
    # Tracing shares jit's cache: new float32 values reuse the trace ...
    row = {k: np.float32(v + 1) for k, v in step_lib.hparams_at(TABLE, 0).items()}
    qat_run.train_step.trace(qat_run.live, images, row)
    assert len(qat_run.traces) == 1
    # ... but a Python float (weakly typed) is another signature: a new trace and compile.
    qat_run.train_step.trace(qat_run.live, images, dict(row, freeze_threshold=0.3))
    assert len(qat_run.traces) == 2


# ----------------------------------------------------------------------------- eval, BN stats


def test_eval_step_leaves_padded_rows_out(variables):
    eval_step = step_lib.make_eval_step(FORWARD, "eval")
    # One compile for the step's sums and the logits the expectations are worked out from.
    sums_and_logits = jax.jit(
        lambda v, b: (eval_step(v, b), FORWARD.quantized.apply(v, b[0], train=False)),
        compiler_options=step_lib.FAST_COMPILE,
    )
    images, labels = batch(5)
    mask = np.array([1, 1, 1, 0], np.float32)
    logits = np.asarray(sums_and_logits(variables, (images, labels, mask))[1], np.float64)
    # Row 0 right, rows 1 and 2 wrong at top-1; the padded row 3 would be right.
    labels = np.array(
        [logits[0].argmax(), logits[1].argmin(), logits[2].argmin(), logits[3].argmax()], np.int32
    )
    sums = jax.device_get(sums_and_logits(variables, (images, labels, mask))[0])

    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    losses = -log_p[np.arange(BATCH), labels]
    np.testing.assert_allclose(sums["loss"], losses[:3].sum(), rtol=1e-5)
    assert (sums["top1"], sums["top5"], sums["count"]) == (1, 3, 3)  # top-5 of 4 classes: all

    unmasked = (images, labels, np.ones_like(mask))
    everything = jax.device_get(sums_and_logits(variables, unmasked)[0])
    np.testing.assert_allclose(everything["loss"], losses.sum(), rtol=1e-5)
    assert (everything["top1"], everything["top5"], everything["count"]) == (2, 4, 4)


def stem_output(variables, images):
    """The first conv's output in float64: 3x3, stride 2, padding 1, 8-bit weights, float input."""
    p = variables["params"]["features_0"]
    scale = np.float32(p["weight_scale"])
    w = scale * np.clip(np.round(p["conv"]["kernel"] / scale), -128, 127)
    x = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = images.shape[1] // 2, images.shape[2] // 2
    out = np.zeros((images.shape[0], h, wd, w.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += x[:, dy : dy + 2 * h : 2, dx : dx + 2 * wd : 2, :] @ w[dy, dx].astype(np.float64)
    return out


def test_bn_stats_step_returns_each_layers_batch_moments(variables, sharded):
    bn_step = sharded.jit_batch_fn(step_lib.make_bn_stats_step(FORWARD))
    batches = [batch(6)[0], batch(7)[0] * 2 + 1]
    sown = [jax.device_get(bn_step(variables, sharded.put_batch(x))) for x in batches]
    for one in sown:
        assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(
            variables["batch_stats"]
        )

    outputs = [stem_output(variables, x) for x in batches]
    means = [y.mean((0, 1, 2)) for y in outputs]
    variances = [y.var((0, 1, 2), ddof=1) for y in outputs]
    for got, mean, var in zip(sown, means, variances, strict=True):
        np.testing.assert_allclose(got["features_0"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["features_0"]["bn"]["var"], var, rtol=1e-5)
    biased = outputs[0].var((0, 1, 2))  # what BN normalises with; not what it records
    assert not np.allclose(sown[0]["features_0"]["bn"]["var"], biased, rtol=1e-3)

    reestimated = FORWARD.average_bn(sown)
    assert jax.tree_util.tree_structure(reestimated) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )
    np.testing.assert_allclose(
        reestimated["features_0"]["bn"]["mean"], np.mean(means, 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        reestimated["features_0"]["bn"]["var"], np.mean(variances, 0), rtol=1e-5
    )
