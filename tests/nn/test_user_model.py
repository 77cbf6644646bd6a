"""A user's own Flax model, quantized by rules and trained in the user's own optax loop
(issue 13, point 4): a small ResNet written here with plain ``flax.linen`` layers only, in
the style of Flax's ``examples/imagenet`` (``ResNetBlock``, ``nn.BatchNorm(use_running_average=
not train)``, a projection shortcut, global mean pooling, ``nn.Dense``).

The model is trained in float first (plain Flax, plain optax), then quantized at W4A4 by the
``LSQ_paper`` rules, calibrated and trained twice from the same start with the same batches:
once with iterative freezing and dampening, once without either (tracking only, the negative
control). Both runs call the *same* jitted step with the freezing threshold and the dampening
weight as float32 arguments, so the step must compile exactly once for both runs.

The learning rate is far above the paper's (SGD 0.05 with momentum instead of 0.0033), the
oscillation EMA momentum is 0.01 instead of 0.001 and the dampening weight ends at 1.0 instead
of the MobileNetV2 recipe's 0.1, so that oscillations build up, freeze and are damped within
300 steps of a CPU test. The oscillating fraction is the paper's (``ema_osc > OSC_LEVEL`` among
the tracked weights, frozen ones included): a weight frozen late still counts until its
frequency EMA decays, so freezing alone lowers it slowly and dampening does most of the work.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oscqat_jax import oscillation, schedules
from oscqat_jax.nn import paper_rules, param_labels, quantize_model
from oscqat_jax.training.data.arrays import load_digits

SEED = 0
BATCH = 64
FLOAT_STEPS = 150
QAT_STEPS = 300
WEIGHT_LR = 0.05  # SGD with momentum 0.9 on kernels, biases and BN parameters
SCALE_LR = 1e-4  # Adam on the quantizer scales (the paper's separate optimizer)
OSC_MOMENTUM = 0.01  # EMA momentum of tracking and freezing (the paper's 0.001 is for 100k steps)
FREEZE_THRESHOLD = (0.02, 0.01)  # f_th: 0 for the first quarter of QAT, then cosine 0.02 -> 0.01
DAMPENING_WEIGHT = (0.2, 1.0)  # lambda: 0.2 for the first quarter, then cosine 0.2 -> 1.0


# ----------------------------------------------------------------------------- the user's model


class ResNetBlock(nn.Module):
    """Two 3x3 convs with BN and ReLU, plus the input (projected when the shape changes).

    ``(N, H, W, C_in) -> (N, H / s, W / s, filters)``.
    """

    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if residual.shape != y.shape:
            residual = nn.Conv(
                self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj"
            )(residual)
            residual = norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class SmallResNet(nn.Module):
    """Stem conv, two ResNet blocks (the second strided and projected), mean pooling, dense.

    ``(N, 8, 8, 1)`` float32 images -> ``(N, num_classes)`` logits.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(16, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x))
        x = ResNetBlock(16)(x, train)
        x = ResNetBlock(32, strides=(2, 2))(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


# The paper's LSQ_paper setup at W4A4 for this model: stem weights and the classifier at 8 bits,
# every other conv with 4-bit weights (tracked, frozen, dampened) and 4-bit inputs.
RULES = paper_rules("LSQ_paper", n_bits=4, first_conv="conv_init", classifier="head")


# Every test reads the trained runs of the module's fixtures (float plus two QAT runs).
pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the user's loop


def batches(images, labels, steps, seed):
    """``steps`` shuffled ``(images, labels)`` batches of ``BATCH`` (reshuffled every epoch)."""
    rng = np.random.default_rng(seed)
    per_epoch = len(images) // BATCH
    order = np.concatenate([rng.permutation(len(images)) for _ in range(steps // per_epoch + 1)])
    for i in range(steps):
        idx = order[i * BATCH : (i + 1) * BATCH]
        yield images[idx], labels[idx]


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
    """Top-1 of ``(N, classes)`` logits against ``(N,)`` integer labels."""
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == labels))


def init_key():
    # XLA's RngBitGenerator: the init compiles about 4x faster on CPU than with threefry.
    return jax.random.key(SEED, impl="rbg")


@pytest.fixture(scope="module")
def digits():
    return load_digits(image_size=8)


@pytest.fixture(scope="module")
def float_model(digits):
    """``(variables, val accuracy)`` of the float model after plain Flax/optax training."""
    model = SmallResNet()
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(init_key(), digits.train_images[:1])
    tx = optax.sgd(WEIGHT_LR, momentum=0.9)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return cross_entropy(logits, labels), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
        updates_p, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates_p)
        return {**variables, **updates, "params": params}, opt_state

    for images, labels in batches(digits.train_images, digits.train_labels, FLOAT_STEPS, SEED):
        variables, opt_state = step(variables, opt_state, images, labels)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, digits.val_images)
    return variables, accuracy(logits, digits.val_labels)


def with_float_weights(quant_variables, float_variables):
    """``quant_variables`` with every leaf that the float model also has taken from it."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(quant_variables))
    trained = flax.traverse_util.flatten_dict(flax.core.unfreeze(float_variables))
    missing = set(trained) - set(flat)
    assert not missing, f"the quantized model lost float variables {sorted(missing)[:3]}"
    flat.update(trained)
    return flax.traverse_util.unflatten_dict(flat)


def make_qat_step(quantized, tx):
    """The user's jitted QAT step; threshold and weight are float32 scalar arguments."""

    @jax.jit
    def step(variables, opt_state, images, labels, freeze_threshold, dampening_weight):
        def loss_fn(params):
            logits, aux = quantized.apply(
                {**variables, "params": params},
                images,
                train=True,
                mode="train",
                freeze_threshold=freeze_threshold,
                osc_momentum=jnp.float32(OSC_MOMENTUM),
                mutable=["batch_stats"],
            )
            task = cross_entropy(logits, labels)
            return task + dampening_weight * aux.dampening, (aux.updates, aux.dampening)

        grads, (updates, damp) = jax.grad(loss_fn, has_aux=True)(variables["params"])
        updates_p, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates_p)
        return {**variables, **updates, "params": params}, opt_state, damp

    return step


def oscillation_fractions(variables) -> dict[str, float]:
    """Fractions of the tracked weights that oscillate (``ema_osc > OSC_LEVEL``) and that are
    frozen, over every tracked kernel of the ``oscillation`` collection together."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["oscillation"]))
    ema_osc = [np.asarray(v).ravel() for k, v in flat.items() if k[-1] == "ema_osc"]
    frozen = [np.asarray(v).ravel() for k, v in flat.items() if k[-1] == "frozen"]
    ema_osc, frozen = np.concatenate(ema_osc), np.concatenate(frozen)
    return {
        "oscillating": float(np.mean(ema_osc > oscillation.OSC_LEVEL)),
        "frozen": float(np.mean(frozen)),
        "num_weights": ema_osc.size,
    }


@pytest.fixture(scope="module")
def qat_runs(digits, float_model):
    """Both QAT runs from the same calibrated start: ``{"remedies": ..., "plain": ...}``,
    each ``{"history": [(step, oscillating, frozen)], "variables": ..., "accuracy": ...}``,
    plus ``"compiles"`` (compilations of the shared step) and ``"calibrated"``."""
    float_variables, _ = float_model
    quantized = quantize_model(SmallResNet(), RULES)
    init = jax.jit(functools.partial(quantized.init, train=False))
    init_variables = init(init_key(), digits.train_images[:1])
    # One batch of 256 images: each further batch would compile the calibration again (the
    # range estimators' state appears with the first batch).
    calibrated = quantized.calibrate(
        with_float_weights(init_variables, float_variables),
        [digits.train_images[:256]],
        train=False,
    )
    tx = optax.multi_transform(
        {"weights": optax.sgd(WEIGHT_LR, momentum=0.9), "quantizer": optax.adam(SCALE_LR)},
        param_labels(calibrated["params"]),
    )
    step = make_qat_step(quantized, tx)
    evaluate = jax.jit(functools.partial(quantized.apply, train=False, mode="eval"))
    threshold = schedules.freeze_threshold_schedule(*FREEZE_THRESHOLD, QAT_STEPS)
    weight = schedules.dampening_weight_schedule(*DAMPENING_WEIGHT, QAT_STEPS)

    runs = {}
    for name, remedies in (("remedies", True), ("plain", False)):
        variables, opt_state = calibrated, tx.init(calibrated["params"])
        history = []
        data = batches(digits.train_images, digits.train_labels, QAT_STEPS, SEED + 1)
        for t, (images, labels) in enumerate(data, start=1):
            f_th = threshold(t) if remedies else jnp.float32(0.0)
            lam = weight(t) if remedies else jnp.float32(0.0)
            variables, opt_state, _ = step(variables, opt_state, images, labels, f_th, lam)
            if t % 25 == 0 or t == QAT_STEPS:
                s = oscillation_fractions(variables)
                history.append((t, s["oscillating"], s["frozen"]))
        runs[name] = {
            "history": history,
            "variables": variables,
            "accuracy": accuracy(evaluate(variables, digits.val_images), digits.val_labels),
        }
    runs["compiles"] = step._cache_size()
    runs["calibrated"] = calibrated
    runs["quantized"] = quantized
    return runs


# ----------------------------------------------------------------------------- the assertions

TRACKED = {
    "ResNetBlock_0/Conv_0",
    "ResNetBlock_0/Conv_1",
    "ResNetBlock_1/Conv_0",
    "ResNetBlock_1/Conv_1",
    "ResNetBlock_1/conv_proj",
}


def test_the_rules_track_exactly_the_4_bit_kernels(qat_runs):
    # The stem and the classifier have 8-bit weights (LSQ_paper): quantized, not tracked.
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(qat_runs["calibrated"]))
    tracked = {"/".join(k[1:-1]) for k in flat if k[0] == "oscillation" and k[-1] == "ema_osc"}
    assert tracked == TRACKED
    params = qat_runs["calibrated"]["params"]
    for path in (*TRACKED, "conv_init", "head"):
        layer = functools.reduce(lambda node, key: node[key], path.split("/"), params)
        assert float(layer["weight_scale"]) > 0, path
    assert "input_scale" not in params["conv_init"]  # the image stays float


def test_the_step_compiles_once_for_both_runs(qat_runs):
    # 2 x QAT_STEPS calls with a threshold and a weight that change every step (and are 0 in
    # the control run): one compiled program.
    assert qat_runs["compiles"] == 1


def test_freezing_leaves_weights_frozen_and_the_control_none(qat_runs):
    final = {name: qat_runs[name]["history"][-1] for name in ("remedies", "plain")}
    assert final["remedies"][2] > 0.005
    assert final["plain"][2] == 0.0
    # Nothing froze in the first quarter, while the threshold was 0.
    quarter = [h for h in qat_runs["remedies"]["history"] if h[0] < QAT_STEPS // 4]
    assert quarter and all(frozen == 0.0 for _, _, frozen in quarter)


def test_remedies_lower_the_oscillating_fraction(qat_runs):
    plain = qat_runs["plain"]["history"][-1][1]
    remedies = qat_runs["remedies"]["history"][-1][1]
    # Oscillations really appear without remedies, and freezing + dampening cut them down.
    assert plain > 0.02
    assert remedies < 0.5 * plain


def test_accuracy_is_sane(float_model, qat_runs):
    _, float_accuracy = float_model
    assert float_accuracy > 0.9
    for name in ("remedies", "plain"):
        # W4A4 after a short, aggressive QAT run on an easy task: within 5 points of float
        # (a broken scale or a transposed kernel would drop it to chance, 10 %).
        assert qat_runs[name]["accuracy"] > float_accuracy - 0.05, name
