"""The parity gate of the plain models (issue 22): each family's plain Flax model, quantized by
the rules ``setup_rules`` makes of a ``QuantSetup``, against the package's ctx model with the
same weights (mapped by ``oscqat_jax.models.plain.from_package``).

For one case (family x setup x per-channel x fold_bn), both are calibrated on the same batch
(every scale, zero point, signedness and range accumulator must agree), give the same eval
logits, then run the same few QAT steps (SGD on kernels and scales, dampening in the loss,
an aggressive tracking momentum and a random oscillation history so that weights oscillate and
freeze): the same logits, dampening terms, gradients of every parameter (weights, BN, scales),
updated parameters, oscillation and freezing state, and running BatchNorm statistics (both
keep PyTorch's unbiased running variance) after every step. The ``float`` setup compares the
float model (eval and train logits, gradients, statistics).

Models are cut down (narrow, few blocks, 32x32 images) so that compiles stay cheap; both take
the depth-wise fast path (``shifted``). Tiers: the quick tests below run one case and
the negative controls (the other families' stored references are
tests/models/test_plain_reference.py's); ``python tests/models/test_plain_parity.py [family ...]`` runs the whole matrix
(every family x setup x per-channel x fold_bn, hours of CPU) and prints its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from unittest.mock import patch

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

if __name__ == "__main__":  # run as a script from a clone: the package is the repository's
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from oscqat_jax.models import efficientnet_lite as old_lite
from oscqat_jax.models import mobilenet_v2 as old_v2
from oscqat_jax.models import mobilenet_v3 as old_v3
from oscqat_jax.models import plain
from oscqat_jax.models import resnet as old_resnet
from oscqat_jax.nn.collect import dampening_total
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.rules import QuantRule
from oscqat_jax.nn.setups import QuantSetup

CLASSES = 10
BATCH = 4
IMAGE = 32
STEPS = 3
FREEZE_THRESHOLDS = (0.0, 0.3, 0.25)  # freezing off, then on: some weights freeze
OSC_MOMENTUM = 0.2  # far above the paper's, so that the frequencies move within 3 steps
DAMPENING_WEIGHT = 0.1
KERNEL_LR = 0.5
SCALE_LR = 1e-4
RTOL = 1e-6
# The one difference by design: the float setup has no rules, so the plain model is plain
# conv + BN, while the ctx model with fold_bn folds BN even in its float modes; the two
# agree up to float32 rounding (measured up to 6.2e-6, ResNet-18 train logits).
FLOAT_FOLD_RTOL = 1e-4
IMPL = "shifted"


# ------------------------------------------------------------------------ families and setups


@dataclasses.dataclass(frozen=True)
class Family:
    """A cut-down model of one family, as a ctx model and as a plain model. ``patch`` cuts
    the ctx model down the same way (it reads its block table from a module constant)."""

    name: str
    package: Callable
    plain: Callable
    options: dict
    plain_options: dict = dataclasses.field(default_factory=dict)
    patch: Callable = contextlib.nullcontext

    def package_model(self, setup: QuantSetup, fold_bn: bool):
        return self.package(quant_setup=setup, fold_bn=fold_bn, **self.options)

    def plain_model(self):
        return self.plain(**self.options, **self.plain_options)


V3_SMALL = old_v3.SMALL_SETTING[:5]  # SE + ReLU, stride 2, residual, SE + hard-swish 5x5
V3_LARGE = (*old_v3.LARGE_SETTING[:5], old_v3.LARGE_SETTING[6])  # no expand, SE, hard-swish
LITE_STAGES = old_lite.STAGES[:3]  # depth-wise separable, inverted residuals, 5x5


def _families() -> dict[str, Family]:
    common = dict(num_classes=CLASSES)
    mobile = dict(common, depthwise_impl=IMPL)
    resnet_depths = functools.partial(
        patch.dict, old_resnet.DEPTHS, {18: (1, 1, 1, 2), 50: (1,) * 4}
    )
    families = [
        Family(
            "mobilenet_v2",
            old_v2.MobileNetV2,
            plain.MobileNetV2,
            dict(mobile, width_multiplier=0.25, block_setting=old_v2.SMALL_INPUT_SETTING[:2]),
        ),
        Family(
            "resnet18",
            functools.partial(old_resnet.ResNet, depth=18),
            functools.partial(plain.ResNet, depth=18),
            dict(common, width_multiplier=0.125),
            dict(stage_sizes=(1, 1, 1, 2)),
            resnet_depths,
        ),
        Family(
            "resnet50",
            functools.partial(old_resnet.ResNet, depth=50),
            functools.partial(plain.ResNet, depth=50),
            dict(common, width_multiplier=0.0625),
            dict(stage_sizes=(1,) * 4),
            resnet_depths,
        ),
        Family(
            "mobilenet_v3_small",
            functools.partial(old_v3.MobileNetV3, variant="small"),
            functools.partial(plain.MobileNetV3, variant="small"),
            dict(mobile, width_multiplier=0.25),
            dict(block_setting=V3_SMALL),
            functools.partial(patch.dict, old_v3.SETTINGS, {"small": V3_SMALL}),
        ),
        Family(
            "mobilenet_v3_large",
            functools.partial(old_v3.MobileNetV3, variant="large"),
            functools.partial(plain.MobileNetV3, variant="large"),
            dict(mobile, width_multiplier=0.25),
            dict(block_setting=V3_LARGE),
            functools.partial(patch.dict, old_v3.SETTINGS, {"large": V3_LARGE}),
        ),
        Family(
            "efficientnet_lite0",
            functools.partial(old_lite.EfficientNetLite, variant="lite0"),
            functools.partial(plain.EfficientNetLite, variant="lite0"),
            dict(mobile, width_multiplier=0.25),
            dict(stages=LITE_STAGES),
            functools.partial(patch.object, old_lite, "STAGES", LITE_STAGES),
        ),
    ]
    return {f.name: f for f in families}


FAMILIES = _families()
WEIGHT_ONLY = (("*", None, "float"),)  # the trainer's weight-only quantization (BN study)
SETUPS = {
    "LSQ_paper": QuantSetup("LSQ_paper", 4),
    "all": QuantSetup("all", 4),
    "FP_logits": QuantSetup("FP_logits", 4),
    "LSQ": QuantSetup("LSQ", 4),
    "fc4": QuantSetup("fc4", 4),
    "fc4_dw8": QuantSetup("fc4_dw8", 4),
    "float": QuantSetup("float"),
    "weight_only": QuantSetup("LSQ_paper", 3, overrides=WEIGHT_ONLY),
    # Every other option of QuantSetup at once: bit widths, asymmetric grids (zero points),
    # range methods, LSQ gradient scaling, tracking 8-bit weights, a weight override.
    "options": QuantSetup(
        "all",
        3,
        n_bits_act=5,
        weight_symmetric=False,
        act_symmetric=False,
        weight_range_method="current_minmax",
        act_range_method="running_minmax",
        grad_scale=True,
        max_bits=8,
        overrides=(("*depthwise*", 6, None),),
    ),
}


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    setup: str
    per_channel: bool
    fold_bn: bool

    def __str__(self):
        return (
            f"{self.family}/{self.setup}/{'per-channel' if self.per_channel else 'per-tensor'}"
            f"/{'fold' if self.fold_bn else 'no-fold'}"
        )

    @property
    def quant_setup(self) -> QuantSetup:
        return dataclasses.replace(SETUPS[self.setup], per_channel=self.per_channel)


CORNERS = ((False, False), (True, True), (False, True), (True, False))  # (per-channel, fold)


def all_cases(families=None) -> list[Case]:
    """Every case, ordered so that a run cut short has covered the most: in round ``r`` each
    setup ``i`` takes the family and (per-channel, fold) combination ``r + i``, families
    varying fastest, so every setup, family and combination comes early."""
    families = list(families or FAMILIES)
    combos = [(f, c) for c in CORNERS for f in families]
    return [
        Case(combos[(r + i) % len(combos)][0], s, *combos[(r + i) % len(combos)][1])
        for r in range(len(combos))
        for i, s in enumerate(SETUPS)
    ]


# ---------------------------------------------------------------------------------- helpers


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30) if b.size else 1.0
    return float(np.max(np.abs(a - b)) / scale) if a.size else 0.0


def compare(got, want, what: str, measured: dict, rtol: float = RTOL) -> None:
    """Same leaves; integer and bool leaves equal, float leaves within ``rtol`` (relative to
    the largest magnitude of the leaf); records the worst difference under ``what``."""
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want), (
        f"{what}: leaves differ: only plain {sorted(set(got) - set(want))[:5]}, "
        f"only package {sorted(set(want) - set(got))[:5]}"
    )
    for key, value in want.items():
        value = np.asarray(value)
        if value.dtype == np.bool_ or np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(got[key], value, err_msg=f"{what} {key}")
            continue
        diff = max_rel_diff(got[key], value)
        measured[what] = max(measured.get(what, 0.0), diff)
        assert diff <= rtol, f"{what} {key}: relative difference {diff:.2e}"


def images(seed: int, count: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    shape = (BATCH, IMAGE, IMAGE, 3)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(count)]


def labels(seed: int, count: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.integers(0, CLASSES, BATCH)) for _ in range(count)]


def perturbed(variables, seed: int):
    """``variables`` with non-trivial BatchNorm parameters and running statistics."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name, parent = path[-1].key, path[-2].key if len(path) > 1 else ""
        if parent == "bn" and name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if parent == "bn" and name in ("bias", "mean"):
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        if parent == "bn" and name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


def with_oscillation_history(variables, seed: int):
    """Random ``ema_osc`` in [0, 1) and ``prev_dir`` in {-1, 0, 1} (the same by path for both
    models), so that some weights freeze within the steps."""
    if "oscillation" not in variables:
        return variables
    rng = np.random.default_rng(seed)

    def history(path, leaf):
        name = path[-1].key
        if name == "ema_osc":
            return jnp.asarray(rng.uniform(0, 1, leaf.shape), leaf.dtype)
        if name == "prev_dir":
            return jnp.asarray(rng.integers(-1, 2, leaf.shape), leaf.dtype)
        return leaf

    return {
        **variables,
        "oscillation": jax.tree_util.tree_map_with_path(history, variables["oscillation"]),
    }


def sgd(params, grads):
    def update(path, p, g):
        return p - (SCALE_LR if path[-1].key.endswith(("_scale", "_zero_point")) else KERNEL_LR) * g

    return jax.tree_util.tree_map_with_path(update, params, grads)


def make_step(forward):
    """One SGD step on ``CE + DAMPENING_WEIGHT * dampening`` of ``forward(variables, x, f_th)
    -> (logits, dampening, updates)``; returns new variables, logits, dampening, gradients."""

    def step(variables, x, y, freeze_threshold):
        def loss_fn(params):
            logits, damp, updates = forward({**variables, "params": params}, x, freeze_threshold)
            task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return task + DAMPENING_WEIGHT * damp, (logits, damp, updates)

        grads, (logits, damp, updates) = jax.grad(loss_fn, has_aux=True)(variables["params"])
        new = {**variables, **updates, "params": sgd(variables["params"], grads)}
        return new, logits, damp, grads

    return jax.jit(step)


# ------------------------------------------------------------------------------- the two runs


class PackageRun:
    """The ctx model of a case: init, calibrate, eval, train steps."""

    def __init__(self, model):
        self.model = model

    def init(self):
        x = jnp.zeros((1, IMAGE, IMAGE, 3), jnp.float32)
        return jax.jit(self.model.init)(jax.random.key(0), x, QuantContext.create("eval"))

    def calibrate(self, variables, batches):
        @jax.jit
        def one(variables, x):
            ctx = QuantContext.create("calibrate")
            _, mutated = self.model.apply(
                variables, x, ctx, mutable=["params", "quant_stats", "oscillation"]
            )
            return {**variables, **mutated}

        for x in batches:
            variables = one(variables, x)
        return variables

    def eval(self, variables, x, mode="eval"):
        return jax.jit(lambda v, x: self.model.apply(v, x, QuantContext.create(mode)))(variables, x)

    def forward(self, mode):
        def forward(variables, x, freeze_threshold):
            ctx = QuantContext.create(
                mode, freeze_threshold=freeze_threshold, osc_momentum=OSC_MOMENTUM
            )
            logits, mutated = self.model.apply(
                variables, x, ctx, mutable=["batch_stats", "oscillation", "dampening"]
            )
            updates = {k: mutated[k] for k in ("batch_stats", "oscillation") if k in mutated}
            damp = dampening_total(mutated) if "dampening" in mutated else jnp.zeros(())
            return logits, damp, updates

        return forward


class PlainRun:
    """The plain model of a case, quantized by the setup's rules."""

    def __init__(self, model, setup: QuantSetup, fold_bn: bool, rules=None):
        self.model = model
        self.qmodel = plain.quantize(model, setup, fold_bn=fold_bn)
        if rules is not None:
            self.qmodel = dataclasses.replace(self.qmodel, rules=rules)
        self.float = setup.name == "float"

    def calibrate(self, variables, batches):
        return self.qmodel.calibrate(variables, batches, train=False)

    def eval(self, variables, x):
        if self.float:
            return jax.jit(lambda v, x: self.model.apply(v, x, train=False))(variables, x)
        return jax.jit(self.qmodel.apply)(variables, x)

    def forward(self):
        def forward(variables, x, freeze_threshold):
            if self.float:
                logits, updates = self.model.apply(
                    variables, x, train=True, mutable=["batch_stats"]
                )
                return logits, jnp.zeros(()), dict(updates)
            logits, aux = self.qmodel.apply(
                variables,
                x,
                train=True,
                mode="train",
                mutable=["batch_stats"],
                freeze_threshold=freeze_threshold,
                osc_momentum=OSC_MOMENTUM,
            )
            return logits, aux.dampening, aux.updates

        return forward


def run_case(
    case: Case, *, rules=None, plain_fold_bn=None, train=True, rtol: float = RTOL
) -> dict[str, float]:
    """Runs one case; raises AssertionError at the first disagreement; returns the worst
    relative difference per quantity. For the negative controls: ``rules`` replaces the plain
    model's rules, ``plain_fold_bn`` its folding, ``train=False`` stops after eval."""
    if case.setup == "float" and case.fold_bn:
        rtol = max(rtol, FLOAT_FOLD_RTOL)
    with FAMILIES[case.family].patch():
        fold = case.fold_bn if plain_fold_bn is None else plain_fold_bn
        return _run_case(case, rules, fold, train, rtol)


def _run_case(case: Case, rules, plain_fold_bn: bool, train: bool, rtol: float) -> dict:
    family = FAMILIES[case.family]
    setup = case.quant_setup
    package = PackageRun(family.package_model(setup, case.fold_bn))
    new = PlainRun(family.plain_model(), setup, plain_fold_bn, rules)
    measured: dict[str, float] = {}
    want = perturbed(package.init(), seed=1)
    got = plain.from_package(want)
    if not new.float:
        calibration = images(2, 1)
        want = package.calibrate(want, calibration)
        got = new.calibrate(got, calibration)
        for collection in ("params", "quant_stats", "oscillation"):
            compare(
                got[collection], plain.from_package(want)[collection], collection, measured, rtol
            )
    x = images(3, 1)[0]
    compare(
        {"l": new.eval(got, x)},
        {"l": package.eval(want, x, "float_eval" if new.float else "eval")},
        "eval logits",
        measured,
        rtol,
    )
    if not train:
        return measured
    want = with_oscillation_history(want, 5)
    got = with_oscillation_history(got, 5)
    package_step = make_step(package.forward("float_train" if new.float else "train"))
    plain_step = make_step(new.forward())
    for x, y, f_th in zip(images(4, STEPS), labels(4, STEPS), FREEZE_THRESHOLDS, strict=True):
        want, want_logits, want_damp, want_grads = package_step(want, x, y, f_th)
        got, logits, damp, grads = plain_step(got, x, y, f_th)
        compare({"l": logits}, {"l": want_logits}, "train logits", measured, rtol)
        compare({"d": damp}, {"d": want_damp}, "dampening", measured, rtol)
        compare(grads, plain.from_package({"g": want_grads})["g"], "gradients", measured, rtol)
        mapped = plain.from_package(want)
        for collection in ("params", "batch_stats", "oscillation"):
            if collection in want:
                compare(got[collection], mapped[collection], collection, measured, rtol)
    if "oscillation" in got:
        frozen = [np.mean(v) for k, v in flat(got["oscillation"]).items() if k.endswith("frozen")]
        measured["frozen fraction"] = float(np.mean(frozen)) if frozen else 0.0
    return measured


# ------------------------------------------------------------------------------------ tests

QUICK = Case("mobilenet_v2", "all", True, True)  # fold, per-channel, every hook, tied pool


def test_quick_case():
    measured = run_case(QUICK)
    print(QUICK, measured)
    assert 0 < measured["frozen fraction"] < 1, "some weights, not all, must freeze"


CONTROL = dataclasses.replace(QUICK, per_channel=False)


def _first_disagreement(**kwargs) -> str:
    with pytest.raises(AssertionError) as err:
        run_case(CONTROL, train=False, **kwargs)
    return str(err.value)


def test_folding_only_one_side_breaks_parity():
    assert "params" in _first_disagreement(plain_fold_bn=False)  # the calibrated weight scales


def test_float_depthwise_convs_break_parity():
    model = FAMILIES["mobilenet_v2"].plain_model()
    rules = plain.quantize(model, CONTROL.quant_setup, fold_bn=CONTROL.fold_bn).rules
    keep_float = QuantRule(".*", weight_bits=None, act_bits=None, depthwise=True)
    assert "params" in _first_disagreement(rules=(keep_float, *rules))


def test_a_pool_call_that_updates_the_range_breaks_parity(monkeypatch):
    """The tied pool quantizer fed to the head hook's range estimator a second time."""
    monkeypatch.setattr(
        plain.mobilenet_v2, "pool_and_requantize", lambda x, hook: hook(x.mean(axis=(1, 2)))
    )
    assert "features_4_out/output_" in _first_disagreement()  # the head hook's scale or range


def _report(records: dict, failures: dict, seconds: float) -> str:
    worst: dict[str, tuple[float, str]] = {}
    for case, measured in records.items():
        for what, diff in measured.items():
            if what != "frozen fraction" and diff >= worst.get(what, (-1.0, ""))[0]:
                worst[what] = (diff, str(case))
    lines = [
        f"plain parity matrix: {len(records)} cases passed, {len(failures)} failed, {seconds:.0f} s"
    ]
    lines += [
        f"  worst {what}: {diff:.2e} ({case})" for what, (diff, case) in sorted(worst.items())
    ]
    lines += [f"  FAILED {case}: {err}" for case, err in failures.items()]
    return "\n".join(lines)


def run_matrix(families=None) -> tuple[dict, dict, str]:
    records, failures, start = {}, {}, time.perf_counter()
    for case in all_cases(families):
        try:
            records[case] = run_case(case)
        except AssertionError as err:
            failures[case] = str(err).splitlines()[0]
        outcome = failures[case] if case in failures else "ok"
        print(case, outcome, {k: f"{v:.1e}" for k, v in records.get(case, {}).items()}, flush=True)
    return records, failures, _report(records, failures, time.perf_counter() - start)


# The whole matrix takes hours of CPU and runs as a script (module docstring); the suite's
# slow tier is the stored references' (tests/models/test_plain_reference.py), which cover
# every family and setup without running the ctx models.


if __name__ == "__main__":
    print(run_matrix(sys.argv[1:] or None)[2])
