"""ONNX export of the plain model families (``oscqat_jax.models``), quantized by rules.

Every family, cut down (narrow, few blocks, small images), quantized at W4A4 ``LSQ_paper``
(and MobileNetV3-Small per-channel with BN folded), its variables filled on the host (an
eager init compiles every initializer on its own: over a minute of a cold run), calibrated on
one batch, exported by
``oscqat_jax.export.onnx.export_model_onnx`` in both containers and run in ONNX Runtime:
the top-1 classes must be the JAX eval model's, the logits equal up to float summation
order (``tolerance``, as tests/deploy/test_onnx_export.py argues: the same integers and
scales, XLA against MLAS). Every depth-wise conv must be one grouped Conv (``group`` equal
to its channels), not the shifted slices the models run on the CPU, and every conv of the
model one Conv node (MobileNetV3's hard-swish reads its conv twice). The int8 container
requantizes each QLinearConv's output from a rounded int32 bias, which can move an
activation that lies within that rounding of a threshold by one step; its logits are
compared exactly with that requantization replaced by its float fallback, and with it the
top-1 classes and the largest difference are reported.

Image sizes leave an odd number of positions at the global pool (1x1, or 7x7 for the
stride-4 MobileNetV2), so the pooled features, re-quantized on their own grid, never sit
on the exact half-step ties that XLA and ONNX Runtime round differently (see
tests/deploy/test_onnx_export.py); ``LSQ_paper`` quantizes no sum of quantized values, so
min-max ranges of one batch put no value on such a tie either. Negative control: one weight
integer of the classifier changed by one step moves the ONNX logits far beyond the
tolerance.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import traverse_util
from onnx import numpy_helper

from oscqat_jax import models as families
from oscqat_jax.export.onnx import (
    INPUT_NAME,
    _integer,
    export_model_onnx,
    inference_session,
    run_onnx,
)
from oscqat_jax.models import efficientnet_lite, mobilenet_v2, mobilenet_v3
from oscqat_jax.nn.setups import QuantSetup

CLASSES = 10
BATCH = 8
# Cheap calibration (the MSE search compiles slowly): weights by min-max, activations by
# running min-max over the two batches (not the current batch's: see the module docstring).
MINMAX = dict(weight_range_method="current_minmax", act_range_method="running_minmax")
W4A4 = QuantSetup("LSQ_paper", 4, **MINMAX)
MOBILE = dict(num_classes=CLASSES, width_multiplier=0.25)


@dataclasses.dataclass(frozen=True)
class Family:
    build: functools.partial
    image: int  # height = width


FAMILIES = {
    "mobilenet_v2": Family(
        functools.partial(
            families.MobileNetV2, block_setting=mobilenet_v2.SMALL_INPUT_SETTING[:2], **MOBILE
        ),
        28,
    ),
    "resnet18": Family(
        functools.partial(
            families.ResNet,
            depth=18,
            num_classes=CLASSES,
            width_multiplier=0.125,
            stage_sizes=(1, 1, 1, 1),
        ),
        32,
    ),
    "resnet50": Family(
        functools.partial(
            families.ResNet,
            depth=50,
            num_classes=CLASSES,
            width_multiplier=0.0625,
            stage_sizes=(1,) * 4,
        ),
        32,
    ),
    "mobilenet_v3_small": Family(
        functools.partial(
            families.MobileNetV3,
            variant="small",
            block_setting=mobilenet_v3.SMALL_SETTING[:5],
            **MOBILE,
        ),
        16,
    ),
    "mobilenet_v3_large": Family(
        functools.partial(
            families.MobileNetV3,
            variant="large",
            block_setting=(*mobilenet_v3.LARGE_SETTING[:5], mobilenet_v3.LARGE_SETTING[6]),
            **MOBILE,
        ),
        16,
    ),
    "efficientnet_lite0": Family(
        functools.partial(
            families.EfficientNetLite,
            variant="lite0",
            stages=efficientnet_lite.STAGES[:3],
            **MOBILE,
        ),
        24,
    ),
}
CASES = {
    # name: (family, setup, fold_bn)
    **{name: (name, W4A4, False) for name in FAMILIES},
    "mobilenet_v3_small-per_channel-fold": (
        "mobilenet_v3_small",
        dataclasses.replace(W4A4, per_channel=True),
        True,
    ),
}
QUICK = "mobilenet_v2"
CASE_PARAMS = [c if c == QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


def host_variables(qmodel, image: np.ndarray, rng: np.random.Generator):
    """Every variable filled on the host from an abstract init: He-normal kernels (the
    classifier's too: Flax's N(0, 0.01) gives logits of ~0.05, on which a changed weight
    integer hides below the float tolerance), non-trivial BN (multipliers of both signs, some
    zero, shifts, running statistics), quantizer scales 1 until calibration sets them, zeros
    elsewhere."""
    abstract = jax.eval_shape(functools.partial(qmodel.init, train=False), jax.random.key(0), image)

    def fill(path, leaf):
        name, parent = path[-1].key, path[-2].key if len(path) > 1 else ""
        if leaf.dtype != jnp.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "kernel":
            std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) * std).astype(np.float32)
        if parent == "bn" and name == "scale":
            gamma = rng.uniform(0.5, 1.5, leaf.shape)
            gamma[rng.random(leaf.shape) < 0.1] *= -1
            gamma[rng.random(leaf.shape) < 0.05] = 0
            return gamma.astype(np.float32)
        if parent == "bn" and name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if parent == "bn":
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name.endswith("_scale") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


_PREPARED: dict = {}


def prepared(name: str):
    """``(quantized model, calibrated variables, test images, their JAX eval logits)`` of a
    case, once per module."""
    if name not in _PREPARED:
        family, setup, fold_bn = CASES[name]
        spec = FAMILIES[family]
        qmodel = families.quantize(spec.build(), setup, fold_bn=fold_bn)
        rng = np.random.default_rng(0)
        shape = (BATCH, spec.image, spec.image, 3)
        calibration, images = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        variables = host_variables(qmodel, images[:1], rng)
        variables = jax.device_get(qmodel.calibrate(variables, [calibration], train=False))
        logits = np.asarray(
            jax.jit(functools.partial(qmodel.apply, train=False))(variables, images)
        )
        _PREPARED[name] = qmodel, variables, images, logits
    return _PREPARED[name]


def tolerance(logits: np.ndarray) -> float:
    """Float summation order only (LSQ_paper leaves the logits unquantized)."""
    return 1e-4 * max(1.0, float(np.abs(logits).max()))


def conv_kernels(variables) -> list[np.ndarray]:
    return [
        v
        for k, v in traverse_util.flatten_dict(variables["params"]).items()
        if k[-1] == "kernel" and v.ndim == 4
    ]


def check_convs(proto: onnx.ModelProto, variables, container: str) -> None:
    """Every conv of the model is one Conv node in the int4 container, none emitted twice
    (MobileNetV3 emitted each conv before a hard-swish twice); each depth-wise conv has
    ``group`` = its channels, and no other conv is grouped. In the int8 container a conv
    whose output feeds both a quantizer and a float residual sum is both a QLinearConv and a
    float Conv, so there each kind is counted at most once per conv."""
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["Slice"] == 0, ops  # no shifted taps
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "QLinearConv")]
    kernels = len(conv_kernels(variables))
    if container == "int4":
        assert len(convs) == kernels, ops
    else:
        assert ops["Conv"] <= kernels and ops["QLinearConv"] <= kernels, ops
    groups = collections.Counter(
        g for n in convs if (g := next((a.i for a in n.attribute if a.name == "group"), 1)) > 1
    )
    channels = sorted(k.shape[-1] for k in conv_kernels(variables) if k.shape[2] == 1 < k.shape[3])
    assert not collections.Counter(channels) - groups, (groups, channels)
    assert set(groups) == set(channels), (groups, channels)


def export(name: str, container: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """``(proto, onnx logits, jax logits)`` of a case in ``container``."""
    qmodel, variables, images, logits = prepared(name)
    spec = FAMILIES[CASES[name][0]]
    proto = export_model_onnx(
        qmodel, variables, input_shape=(spec.image, spec.image, 3), container=container, train=False
    )
    check_convs(proto, variables, container)
    return proto, run_onnx(proto, images), logits


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_int4_qdq_export_gives_the_jax_logits(name):
    _, got, want = export(name, "int4")
    diff = float(np.abs(got - want).max())
    print(f"{name} int4: max |logit difference| {diff:.3g} (logits up to {np.abs(want).max():.3g})")
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert diff <= tolerance(want)


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_int8_container_gives_the_jax_logits(name, monkeypatch):
    proto, got, want = export(name, "int8")
    agree = int(np.sum(got.argmax(-1) == want.argmax(-1)))
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    print(
        f"{name} int8: top-1 agreement {agree} of {len(want)}, max |logit difference| "
        f"{np.abs(got - want).max():.3g} (logits up to {np.abs(want).max():.3g}); "
        f"{ops['QLinearConv']} QLinearConv, {ops['Conv']} float Conv"
    )
    assert ops["QLinearConv"] > 0
    # The arithmetic without the requantization flips (module docstring).
    monkeypatch.setattr(_integer, "emit_qlinear_conv", lambda *args: None)
    _, exact, _ = export(name, "int8")
    np.testing.assert_array_equal(exact.argmax(-1), want.argmax(-1))
    assert np.abs(exact - want).max() <= tolerance(want)


def test_one_weight_integer_changed_moves_the_onnx_logits(tmp_path):
    images = prepared(QUICK)[2]
    proto, got, want = export(QUICK, "int4")
    assert np.abs(got - want).max() <= tolerance(want)
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    weight_dq = next(n for n in proto.graph.node if n.output[0] == matmul.input[1])
    # Change the weight of the classifier input that is largest in ONNX Runtime's run, so
    # that the change must show in the logits.
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(matmul.input[0]))
    path = tmp_path / "probe.onnx"
    onnx.save(probe, path)
    features = inference_session(path).run([matmul.input[0]], {INPUT_NAME: images})[0]
    row = int(np.abs(features).max(axis=0).argmax())
    tensor = next(t for t in proto.graph.initializer if t.name == weight_dq.input[0])
    ints = numpy_helper.to_array(tensor).copy()
    ints[row, 0] = ints[row, 0] + 1 if ints[row, 0] < 127 else ints[row, 0] - 1
    tensor.CopyFrom(numpy_helper.from_array(ints, tensor.name))
    changed = float(np.abs(run_onnx(proto, images) - want).max())
    print(f"one classifier integer changed: max |logit difference| {changed:.3g}")
    assert changed > 3 * tolerance(want)  # the comparison above fails, by a margin
