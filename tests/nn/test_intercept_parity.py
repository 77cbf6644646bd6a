"""The rules path is the package's method (issue 13, point 4): MobileNetV2 written here with
plain ``flax.linen`` layers only, quantized by ``paper_rules("LSQ_paper")``, against the
package's own ``MobileNetV2`` with the same weights, both taking the depth-wise fast path
(``depthwise_impl="shifted"``, the CPU default) so that the rules path's use of it is checked too.

Both are calibrated on the same batches (the scales must come out the same), then give the
same fake-quantized logits in eval mode and run the same few QAT steps (SGD on kernels and
scales, dampening in the loss, aggressive tracking so that weights oscillate and freeze):
the same logits, dampening terms, gradients of every kernel and scale, and oscillation and
freezing state after every step. A rule list that leaves the depth-wise convs float must
break the parity (negative control).

Naming: the plain model gives each conv the package's path (``features_3/expand``) and puts
its BatchNorm beside it (``features_3/expand_bn``) where the package nests it (``.../bn``).
Known difference, not compared: the running variance (the package stores PyTorch's unbiased
batch variance, ``nn.BatchNorm`` the biased one); train mode normalises with batch
statistics, so it does not enter any compared value.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from oscqat_jax.models.common import make_divisible
from oscqat_jax.models.mobilenet_v2 import LAST_CHANNELS, SMALL_INPUT_SETTING, STEM_CHANNELS
from oscqat_jax.models.mobilenet_v2 import MobileNetV2 as PackageMobileNetV2
from oscqat_jax.nn.collect import dampening_total
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import QuantRule, paper_rules
from oscqat_jax.nn.setups import QuantSetup

WIDTH = 0.25
# The first two stages of SMALL_INPUT_SETTING (blocks features_1..3, head features_4): the
# expansion-1 block, a stride-2 block and a residual block are all there; the full 17 blocks
# give the same (exact) parity but cost minutes of CPU compile per model.
BLOCKS = SMALL_INPUT_SETTING[:2]
CLASSES = 10
BATCH = 8
STEPS = 4
FREEZE_THRESHOLDS = (0.0, 0.3, 0.25, 0.2)  # changes every step: the step must not recompile
OSC_MOMENTUM = 0.2  # far above the paper's, so that the frequencies move within 4 steps
DAMPENING_WEIGHT = 0.1
KERNEL_LR = 0.5
SCALE_LR = 1e-4
RTOL = 1e-6


# --------------------------------------------------------------- the user's model, plain Flax


def conv_bn(parent_x, name, features, kernel, *, strides=1, groups=1, relu6=True, train=False):
    """A bias-free conv with PyTorch padding, BatchNorm (``name_bn``) and ReLU6; call from a
    compact method."""
    x = nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=(kernel - 1) // 2,
        feature_group_count=groups,
        use_bias=False,
        name=name,
    )(parent_x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        name=f"{name}_bn",
    )(x)
    return jax.nn.relu6(x) if relu6 else x


class InvertedResidual(nn.Module):
    features: int
    strides: int
    expand_ratio: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = int(round(x.shape[-1] * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = conv_bn(y, "expand", hidden, 1, train=train)
        y = conv_bn(y, "depthwise", hidden, 3, strides=self.strides, groups=hidden, train=train)
        y = conv_bn(y, "project", self.features, 1, relu6=False, train=train)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    num_classes: int = 1000
    width: float = 1.0
    block_setting: tuple = SMALL_INPUT_SETTING

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv_bn(
            x, "features_0", make_divisible(STEM_CHANNELS * self.width), 3, strides=2, train=train
        )
        index = 1
        for t, c, n, s in self.block_setting:
            for repeat in range(n):
                x = InvertedResidual(
                    make_divisible(c * self.width),
                    s if repeat == 0 else 1,
                    t,
                    name=f"features_{index}",
                )(x, train)
                index += 1
        x = conv_bn(
            x,
            f"features_{index}",
            make_divisible(LAST_CHANNELS * max(1.0, self.width)),
            1,
            train=train,
        )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


RULES = paper_rules("LSQ_paper", 4, first_conv="features_0", classifier="classifier")
PLAIN = quantize_model(MobileNetV2(CLASSES, WIDTH, BLOCKS), RULES, depthwise_impl="shifted")
PACKAGE = PackageMobileNetV2(
    num_classes=CLASSES,
    width_multiplier=WIDTH,
    quant_setup=QuantSetup("LSQ_paper", 4),
    depthwise_impl="shifted",
    block_setting=BLOCKS,
)


# ------------------------------------------------------------------- mapping between the two


def to_plain(tree):
    """Package names -> plain names: ``<layer>/bn/<leaf>`` becomes ``<layer>_bn/<leaf>``."""
    out = {}
    for key, value in traverse_util.flatten_dict(tree).items():
        if len(key) >= 3 and key[-2] == "bn":
            key = (*key[:-3], f"{key[-3]}_bn", key[-1])
        out[key] = value
    return traverse_util.unflatten_dict(out)


def flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def max_rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    return float(np.max(np.abs(a - b)) / scale) if a.size else 0.0


def assert_same_tree(got, want, what, measured, *, exact_keys=()):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want), f"{what}: different leaves"
    for key, value in want.items():
        if value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer):
            np.testing.assert_array_equal(got[key], value, err_msg=f"{what} {key}")
            continue
        diff = max_rel_diff(got[key], value)
        measured[what] = max(measured.get(what, 0.0), diff)
        assert diff <= RTOL, f"{what} {key}: relative difference {diff:.2e}"


# --------------------------------------------------------------------------------- the runs


def batches(seed, count):
    rng = np.random.default_rng(seed)
    images = [
        jnp.asarray(rng.standard_normal((BATCH, 32, 32, 3)), jnp.float32) for _ in range(count)
    ]
    labels = [jnp.asarray(rng.integers(0, CLASSES, BATCH)) for _ in range(count)]
    return images, labels


def package_variables():
    """The package model's variables with non-trivial BatchNorm parameters and statistics."""
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = jax.jit(PACKAGE.init)(jax.random.key(0), x, QuantContext.create("eval"))
    rng = np.random.default_rng(1)

    def perturb(path, leaf):
        name = path[-1].key
        if name == "scale" and path[-2].key == "bn":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if name in ("bias", "mean") and path[-2].key == "bn":
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


@jax.jit
def package_calibrate(variables, x):
    ctx = QuantContext.create("calibrate")
    _, mutated = PACKAGE.apply(variables, x, ctx, mutable=["params", "quant_stats", "oscillation"])
    return {**variables, **mutated}


@jax.jit
def package_eval(variables, x):
    return PACKAGE.apply(variables, x, QuantContext.create("eval"))


def package_forward(variables, x, freeze_threshold):
    ctx = QuantContext.create("train", freeze_threshold=freeze_threshold, osc_momentum=OSC_MOMENTUM)
    logits, mutated = PACKAGE.apply(
        variables, x, ctx, mutable=["batch_stats", "oscillation", "dampening"]
    )
    updates = {k: mutated[k] for k in ("batch_stats", "oscillation")}
    return logits, dampening_total(mutated), updates


def plain_forward(variables, x, freeze_threshold):
    logits, aux = PLAIN.apply(
        variables,
        x,
        train=True,
        mode="train",
        mutable=["batch_stats"],
        freeze_threshold=freeze_threshold,
        osc_momentum=OSC_MOMENTUM,
    )
    return logits, aux.dampening, aux.updates


def with_oscillation_history(variables, seed):
    """``variables`` with a random oscillation history: ``ema_osc`` uniform in [0, 1) and
    ``prev_dir`` in {-1, 0, 1}, so that some weights freeze within the few steps of a test
    (the same history, by path, for both models)."""
    rng = np.random.default_rng(seed)

    def history(path, leaf):
        name = path[-1].key
        if name == "ema_osc":
            return jnp.asarray(rng.uniform(0, 1, leaf.shape), leaf.dtype)
        if name == "prev_dir":
            return jnp.asarray(rng.integers(-1, 2, leaf.shape), leaf.dtype)
        return leaf

    oscillation = jax.tree_util.tree_map_with_path(history, variables["oscillation"])
    return {**variables, "oscillation": oscillation}


def make_step(forward):
    """One SGD step on ``CE + DAMPENING_WEIGHT * dampening``; returns the new variables, the
    logits, the dampening term and the gradients."""

    def step(variables, x, labels, freeze_threshold):
        def loss_fn(params):
            logits, damp, updates = forward({**variables, "params": params}, x, freeze_threshold)
            task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return task + DAMPENING_WEIGHT * damp, (logits, damp, updates)

        grads, (logits, damp, updates) = jax.grad(loss_fn, has_aux=True)(variables["params"])

        def sgd(path, p, g):
            lr = SCALE_LR if path[-1].key.endswith("_scale") else KERNEL_LR
            return p - lr * g

        params = jax.tree_util.tree_map_with_path(sgd, variables["params"], grads)
        return {**variables, **updates, "params": params}, logits, damp, grads

    return jax.jit(step)


@pytest.fixture(scope="module")
def calibrated():
    images, _ = batches(2, 1)  # one batch: a second one only adds a compile (new quant_stats)
    package = package_variables()
    plain = to_plain(package)
    for x in images:
        package = package_calibrate(package, x)
    plain = PLAIN.calibrate(plain, images, train=False)
    return package, plain


def test_calibration_gives_the_package_scales(calibrated):
    package, plain = calibrated
    measured = {}
    assert_same_tree(plain["params"], to_plain(package["params"]), "params", measured)
    assert_same_tree(plain["quant_stats"], package["quant_stats"], "quant_stats", measured)
    print("calibration max rel diff", measured)


def test_eval_logits_match_and_a_missing_depthwise_rule_breaks_them(calibrated):
    package, plain = calibrated
    images, _ = batches(3, 1)
    want = package_eval(package, images[0])
    got = jax.jit(PLAIN.apply)(plain, images[0])
    diff = max_rel_diff(got, want)
    print("eval logits max rel diff", diff)
    assert diff <= RTOL
    # Negative control: the same rules behind one that keeps depth-wise convs float.
    float_depthwise = quantize_model(
        PLAIN.model,
        (QuantRule(".*", weight_bits=None, act_bits=None, depthwise=True), *RULES),
        depthwise_impl="shifted",
    )
    assert max_rel_diff(jax.jit(float_depthwise.apply)(plain, images[0]), want) > 1e-3


@pytest.mark.slow
def test_train_steps_match_logits_gradients_and_oscillation_state(calibrated):
    package, plain = calibrated
    package = with_oscillation_history(package, 5)
    plain = with_oscillation_history(plain, 5)
    images, labels = batches(4, STEPS)
    package_step, plain_step = make_step(package_forward), make_step(plain_forward)
    measured = {}
    for x, y, f_th in zip(images, labels, FREEZE_THRESHOLDS, strict=True):
        package, want_logits, want_damp, want_grads = package_step(package, x, y, f_th)
        plain, logits, damp, grads = plain_step(plain, x, y, f_th)
        assert_same_tree({"l": logits}, {"l": want_logits}, "logits", measured)
        assert_same_tree({"d": damp}, {"d": want_damp}, "dampening", measured)
        assert_same_tree(grads, to_plain(want_grads), "gradients", measured)
        assert_same_tree(plain["params"], to_plain(package["params"]), "params", measured)
        assert_same_tree(plain["oscillation"], package["oscillation"], "oscillation", measured)
        means = {
            k: v for k, v in flat(to_plain(package["batch_stats"])).items() if k.endswith("mean")
        }
        got_means = {k: v for k, v in flat(plain["batch_stats"]).items() if k.endswith("mean")}
        assert_same_tree(got_means, means, "running means", measured)
    print("train max rel diff", measured)
    frozen = [np.mean(v) for k, v in flat(plain["oscillation"]).items() if k.endswith("/frozen")]
    print("frozen fraction per layer", np.round(frozen, 3))
    assert 0 < np.mean(frozen) < 1, "some weights, not all, must freeze for the comparison to bite"
    assert float(damp) > 0
    assert plain_step._cache_size() == 1  # four freezing thresholds, one compilation
