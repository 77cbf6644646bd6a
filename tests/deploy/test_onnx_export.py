"""Tests of the ONNX exporter (oscqat_jax.export.onnx) beyond tests/deploy/test_plain_onnx.py
(every family at W4A4, both containers, the negative control): every other paper setup on the
package's MobileNetV2 (a plain model quantized by rules), what the graph stores (integers at
their bit width, frozen weights at their frozen integers), and the lowering itself on small
traced functions (BN multipliers of any sign, a layer read twice, int8 containers).

Models are cut down (width 0.25, 10 classes, three inverted-residual blocks), their variables
filled on the host (BN multipliers of both signs and zero), calibrated on two batches of 8
images, then about a third of one tracked site's weights are frozen one step away from their
current integers; the logits are compared on the second batch.

Tolerance. The exported graph computes the same integers and scales as the JAX forward; what
differs is the floating-point summation order of convolutions and matmuls (XLA against
MLAS) and the BN folding, each a few float32 ulps. Measured differences are 0 to ~5e-6 on
logits of magnitude 1-10, so the comparison allows ``1e-4 * max(1, max |logits|)`` plus, when
the logits themselves are quantized, one step of their grid (a rounding of a logit that lies
an ulp from a rounding threshold may go either way).

Rounding ties. Where a quantized tensor is re-quantized without an affine layer in between,
``x / s`` can be exactly a half-integer, and then the last ulp decides: XLA divides by a
broadcast scale as a multiplication by its reciprocal (off by an ulp), ONNX Runtime and
numpy divide exactly, so such ties go different ways. Two such places are systematic and
avoided here. (1) Pooled features averaged over an even number M of positions and
re-quantized on their own grid (output-quantizing setups): the 28x28 input leaves 7x7
positions at the pool. (2) A residual sum of quantized tensors whose range came from the
current batch's min-max: the scale is then ``max / int_max``, and a sum equal to half that
maximum lands on ``1.5`` steps. Activation ranges here are MSE or running min-max over two
batches, as in training.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import traverse_util
from onnx import TensorProto, numpy_helper
from testkit import TEST_BLOCKS

from oscqat_jax import models as families
from oscqat_jax import quant
from oscqat_jax.deploy import export_model_onnx, export_onnx, run_onnx
from oscqat_jax.nn.setups import SETUPS, QuantSetup

NUM_CLASSES = 10
IMAGE = (28, 28, 3)
# Cheap calibration (the MSE search compiles slowly): weights by their min-max (the reference
# CLI's default), activations by running min-max over the two batches.
MINMAX = dict(weight_range_method="current_minmax", act_range_method="running_minmax")


def tiny_v2(setup: QuantSetup, fold_bn: bool = False) -> families.QuantizedModel:
    model = families.MobileNetV2(
        num_classes=NUM_CLASSES, width_multiplier=0.25, block_setting=TEST_BLOCKS
    )
    return families.quantize(model, setup, fold_bn=fold_bn)


def host_variables(qmodel, seed=0):
    """Random kernels (He normal), BN parameters and statistics (BN multipliers of both signs
    and zero), zero quantizer state; filled on the host from ``jax.eval_shape``."""
    x = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        collection, name = path[0].key, path[-1].key
        if collection not in ("params", "batch_stats") or leaf.dtype != np.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * std).astype(np.float32)
        if name == "var" or name.endswith("_scale"):
            return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        if name == "scale" and collection == "params":  # BN gamma: mostly positive, some not
            gamma = rng.uniform(0.5, 1.5, size=leaf.shape)
            gamma[rng.random(leaf.shape) < 0.1] *= -1
            gamma[rng.random(leaf.shape) < 0.05] = 0
            return gamma.astype(np.float32)
        return (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def kernel_of(params: dict, site: str) -> np.ndarray:
    """The latent kernel of a quantized site (a ConvBN's conv, or the layer's own)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return np.asarray(flat.get(f"{site}/conv/kernel", flat.get(f"{site}/kernel")))


def prepared(qmodel, seed=0):
    """``(variables, images, frozen site, plan)``: calibrated on two batches (``images`` is
    the second), with ~30 % of the first tracked site's weights frozen at their current
    integer +- 1."""
    plan = qmodel.plan(np.zeros((1, *IMAGE), np.float32), train=False)
    rng = np.random.default_rng(seed + 1)
    batches = [rng.normal(size=(8, *IMAGE)).astype(np.float32) for _ in range(2)]
    variables = qmodel.calibrate(host_variables(qmodel, seed), batches, train=False)
    variables = jax.device_get(variables)
    site = next(s for s, p in plan.items() if p.track_oscillations and p.kind == "conv_bn")
    n_bits = plan[site].weight.n_bits
    scale = traverse_util.flatten_dict(variables["params"], sep="/")[f"{site}/weight_scale"]
    w_int = np.asarray(
        quant.to_int(kernel_of(variables["params"], site), scale, n_bits=n_bits, signed=True)
    )
    _, int_max = quant.int_range(n_bits, True)
    state = variables["oscillation"]
    for part in site.split("/"):
        state = state[part]
    state["frozen"] = rng.random(w_int.shape) < 0.3
    state["frozen_int"] = np.where(w_int < int_max, w_int + 1, w_int - 1).astype(np.float32)
    return variables, batches[1], site, plan


def logits_step(qmodel, plan, variables) -> float:
    """One step of the logits' grid when the setup quantizes them, else 0."""
    hook = qmodel.model.quant_sites().logits
    if hook not in plan or not plan[hook].output.enabled:
        return 0.0
    return float(variables["params"][hook]["output_scale"])


def tolerance(reference: np.ndarray, step: float) -> float:
    """See the module docstring."""
    return 1e-4 * max(1.0, float(np.abs(reference).max())) + step


def weight_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The integer initializers that a DequantizeLinear reads as its data: the weights."""
    inits = {t.name: t for t in model.graph.initializer}
    return {
        n.input[0]: inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }


def export_and_compare(qmodel, variables, images, plan):
    """Exports at batch 1, runs the batch of ``images`` in ONNX Runtime; returns
    ``(proto, jax logits)`` after checking logits and top-1."""
    proto = export_model_onnx(qmodel, variables, input_shape=IMAGE, train=False)
    expected = np.asarray(jax.jit(functools.partial(qmodel.apply, train=False))(variables, images))
    got = run_onnx(proto, images)
    tol = tolerance(expected, logits_step(qmodel, plan, variables))
    assert got.shape == expected.shape == (len(images), NUM_CLASSES)
    print(f"max |logit difference| {np.abs(got - expected).max():.3g} (tolerance {tol:.3g})")
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    return proto, expected


# The paper's setups other than LSQ_paper (test_plain_onnx.py's and the w3a3 fixture's), each
# with one more option: together per-tensor and per-channel weights, W4 and W3, BN folded
# into the kernel, quantized outputs, residual sums, pooled features and logits.
SETUP_CASES = {
    "all": (QuantSetup(name="all", n_bits=3, per_channel=True, **MINMAX), True),
    "fc4": (QuantSetup(name="fc4", n_bits=4, **MINMAX), True),
    "fc4_dw8": (QuantSetup(name="fc4_dw8", n_bits=3, **MINMAX), False),
    "LSQ": (QuantSetup(name="LSQ", n_bits=3, per_channel=True, **MINMAX), False),
    "FP_logits": (QuantSetup(name="FP_logits", n_bits=4, **MINMAX), False),
}
QUICK_SETUP = "all"  # the most quantizers


def test_the_setup_cases_are_every_paper_setup():
    assert set(SETUP_CASES) | {"LSQ_paper"} == set(SETUPS) - {"float"}


@pytest.mark.parametrize(
    "name",
    [n if n == QUICK_SETUP else pytest.param(n, marks=pytest.mark.slow) for n in SETUP_CASES],
)
def test_every_paper_setup_exports_with_the_jax_logits(name):
    setup, fold_bn = SETUP_CASES[name]
    qmodel = tiny_v2(setup, fold_bn)
    variables, images, _, plan = prepared(qmodel, seed=1)
    export_and_compare(qmodel, variables, images, plan)


@pytest.fixture(scope="module")
def w3a3():
    """A W3A3 tiny MobileNetV2 (LSQ_paper, MSE ranges), exported."""
    qmodel = tiny_v2(QuantSetup(n_bits=3))
    variables, images, site, plan = prepared(qmodel, seed=2)
    proto, _ = export_and_compare(qmodel, variables, images, plan)
    return plan, variables, site, proto


def test_weights_are_stored_as_integers_at_their_bit_width(w3a3):
    plan, _, _, proto = w3a3
    onnx.checker.check_model(proto, full_check=True)
    bits = sorted(p.weight.n_bits for p in plan.values() if p.weight.enabled)
    weights = weight_initializers(proto)
    types = sorted(t.data_type for t in weights.values())
    # LSQ_paper at 3 bits: the first conv and the classifier at 8 bits, every other layer at 3.
    assert bits.count(8) == 2 and set(bits) == {3, 8}
    expected = sorted(TensorProto.INT4 if b <= 4 else TensorProto.INT8 for b in bits)
    assert types == expected
    for tensor in weights.values():
        ints = numpy_helper.to_array(tensor).astype(np.int64)
        if tensor.data_type == TensorProto.INT4:
            assert ints.min() >= -4 and ints.max() <= 3  # the 3-bit grid inside int4
    # No kernel is also stored in float: every float initializer is a scalar or a vector
    # (scales, biases, BN multipliers, clip bounds).
    floats = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert floats and all(sum(d > 1 for d in t.dims) <= 1 for t in floats)


def test_frozen_weights_are_exported_at_their_frozen_integers(w3a3):
    _, variables, site, proto = w3a3
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    state = traverse_util.flatten_dict(variables["oscillation"], sep="/")
    current = np.asarray(
        quant.to_int(
            kernel_of(variables["params"], site),
            flat[f"{site}/weight_scale"],
            n_bits=3,
            signed=True,
        )
    )
    frozen = np.where(state[f"{site}/frozen"], state[f"{site}/frozen_int"], current)
    assert state[f"{site}/frozen"].any() and not np.array_equal(frozen, current)

    def oihw(a):
        return np.transpose(a, (3, 2, 0, 1))

    stored = [
        numpy_helper.to_array(t).astype(np.float32) for t in weight_initializers(proto).values()
    ]
    assert any(s.shape == oihw(frozen).shape and np.array_equal(s, oihw(frozen)) for s in stored)
    assert not any(
        s.shape == oihw(current).shape and np.array_equal(s, oihw(current)) for s in stored
    )


def test_bn_multipliers_of_any_sign_fold_into_the_conv():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    mul = np.array([1.5, -0.7, 0.0, 0.3, 2.0, -1.0], np.float32)
    mean = rng.normal(size=6).astype(np.float32)
    beta = rng.normal(size=6).astype(np.float32)
    images = rng.normal(size=(3, 9, 9, 4)).astype(np.float32)

    def fn(x):
        p = quant.quant_params(0.2, x_shape=kernel.shape, n_bits=4, signed=True)
        w = quant.dequantize_with(quant.to_int_with(kernel, p), p)
        y = jax.lax.conv_general_dilated(
            x, w, (2, 2), ((1, 0), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return ((y - mean) * mul + beta).reshape(x.shape[0], -1)

    proto = export_onnx(fn, images[:1])
    np.testing.assert_allclose(run_onnx(proto, images), jax.jit(fn)(images), rtol=0, atol=1e-5)
    weight_dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scale = inits[weight_dq.input[1]]
    # The positive multipliers moved into the (now per-channel) scale; the others stay a Mul.
    np.testing.assert_allclose(scale, 0.2 * np.where(mul > 0, mul, 1.0), rtol=1e-6)
    assert any(n.op_type == "Mul" for n in proto.graph.node)


def test_a_primitive_without_lowering_is_named():
    def fn(x):
        return jax.lax.cumsum(x, axis=1)

    with pytest.raises(NotImplementedError, match="cumsum"):
        export_onnx(fn, np.zeros((1, 4, 4, 3), np.float32))


def test_the_file_is_written_and_runs(tmp_path):
    def fn(x):
        p = quant.quant_params(0.25, x_shape=x.shape, n_bits=3, signed=False)
        return quant.dequantize_with(quant.to_int_with(jax.nn.relu(x), p), p).mean(axis=(1, 2))

    images = 4 * np.random.default_rng(0).normal(size=(5, 4, 4, 2)).astype(np.float32)
    path = tmp_path / "act.onnx"
    export_onnx(fn, images[:2], path)
    got = run_onnx(path, images)
    # Clipped at the 3-bit grid's top (7 steps), although uint4 reaches 15.
    np.testing.assert_allclose(got, jax.jit(fn)(images), rtol=0, atol=1e-6)
    assert got.max() <= 7 * 0.25


# --------------------------------------------------------------------------- int8 containers
#
# ``container="int8"`` runs each conv between two quantizers as a QLinearConv and the
# classifier as a MatMulInteger (other convs stay float, on int8 kernels dequantized at load).
# Accumulation is exact; a QLinearConv requantizes its output onto
# the next quantizer's grid from ``(acc + bias) * s_x s_w / s_y`` with the float offset
# rounded to the int32 ``bias``, so an activation whose value lies within that rounding (a
# small fraction of one accumulator step) of a rounding threshold can land one step away from
# the JAX model's. The checks below compare the requantized integers (at most one step off, on
# at most ``MAX_FLIPPED`` of them), layers fed by equal integers exactly, and whole networks
# exactly without the requantization (and report their agreement with it).

MAX_FLIPPED = 0.01


def _toy_int8_fn(params):
    """A two-layer network with what the int8 lowering handles: an asymmetric 4-bit input
    quantizer (zero point 3), a 1x1 conv with per-channel 4-bit weights and BN multipliers of
    both signs and zero, ReLU6, a 3-bit unsigned quantizer, a depth-wise 3x3 conv (stride 2)
    with per-tensor 3-bit weights, and a float output. Returns ``(output, the 3-bit
    integers)``, both flattened per image."""
    kernel1, kernel2, mul1, add1, mul2, add2, w_scale1 = params

    def fn(x):
        p = quant.quant_params(0.3, 3.0, x_shape=x.shape, n_bits=4, signed=False)
        x = quant.dequantize_with(quant.to_int_with(x, p), p)
        pw = quant.quant_params(w_scale1, x_shape=kernel1.shape, n_bits=4, signed=True)
        w1 = quant.dequantize_with(quant.to_int_with(kernel1, pw), pw)
        y = jax.lax.conv_general_dilated(
            x, w1, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = jax.nn.relu6(y * mul1 + add1)
        pa = quant.quant_params(0.25, x_shape=y.shape, n_bits=3, signed=False)
        y_int = quant.to_int_with(y, pa)
        y = quant.dequantize_with(y_int, pa)
        pw2 = quant.quant_params(0.1, x_shape=kernel2.shape, n_bits=3, signed=True)
        w2 = quant.dequantize_with(quant.to_int_with(kernel2, pw2), pw2)
        z = jax.lax.conv_general_dilated(
            y,
            w2,
            (2, 2),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=kernel2.shape[-1],
        )
        n = x.shape[0]
        return (z * mul2 + add2).reshape(n, -1), y_int.reshape(n, -1)

    return fn


@pytest.fixture(scope="module")
def toy_int8():
    """``(images, int8 proto, JAX outputs, JAX 3-bit integers, parameters)`` of
    :func:`_toy_int8_fn`."""
    rng = np.random.default_rng(5)
    params = (
        rng.normal(size=(1, 1, 5, 6)).astype(np.float32) * 0.3,
        rng.normal(size=(3, 3, 1, 6)).astype(np.float32) * 0.2,
        np.array([1.5, -0.7, 0.0, 0.3, 2.0, -1.0], np.float32),
        rng.normal(size=6).astype(np.float32),
        rng.uniform(0.5, 1.5, size=6).astype(np.float32),
        rng.normal(size=6).astype(np.float32),
        rng.uniform(0.05, 0.1, size=(1, 1, 1, 6)).astype(np.float32),
    )
    fn = _toy_int8_fn(params)
    images = 2 * rng.normal(size=(16, 7, 7, 5)).astype(np.float32)
    proto = export_onnx(fn, images[:1], container="int8")
    out, ints = (np.asarray(a) for a in jax.jit(fn)(images))
    return images, proto, out, ints, params


def _run_all(proto, images) -> list[np.ndarray]:
    from oscqat_jax.export.onnx import inference_session

    session = inference_session(proto)
    return session.run(None, {session.get_inputs()[0].name: images})


def _compare_toy(proto, images, out, ints) -> tuple[float, float]:
    """``(share of requantized integers that differ, largest output difference on images whose
    integers all agree)``, after checking every integer is at most one step off."""
    got_out, got_ints = _run_all(proto, images)
    steps = np.abs(got_ints - ints)
    same = ~(steps > 0).any(axis=1)
    flipped = float(np.mean(steps > 0))
    worst = float(np.abs(got_out - out)[same].max()) if same.any() else np.inf
    return flipped, worst, float(steps.max())


def _ops(proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _initializer(proto, node, index) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == node.input[index])


def _edited(proto, node_op, index, edit):
    """A copy of ``proto`` with input ``index`` (an initializer) of the first ``node_op``
    node (``"Conv"``: the DequantizeLinear of its kernel) replaced by ``edit(its array)``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    node = next(n for n in copy.graph.node if n.op_type == node_op)
    if node_op == "Conv":
        node = next(n for n in copy.graph.node if n.output[0] == node.input[1])
    tensor = _initializer(copy, node, index)
    edited = edit(numpy_helper.to_array(tensor).copy())
    tensor.CopyFrom(numpy_helper.from_array(edited, tensor.name))
    return copy


def test_int8_containers_run_the_layers_on_integer_kernels(toy_int8):
    images, proto, out, ints, params = toy_int8
    onnx.checker.check_model(proto, full_check=True)
    ops = _ops(proto)
    # The pointwise conv feeds a quantizer (QLinearConv); the depth-wise one feeds the float
    # output, a float Conv of the dequantized 3-bit integers and the int8 kernel.
    assert ops.get("QLinearConv") == 1 and ops.get("Conv") == 1
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    kernel_dq = next(n for n in proto.graph.node if n.output[0] == conv.input[1])
    assert kernel_dq.op_type == "DequantizeLinear"
    assert _initializer(proto, kernel_dq, 0).data_type == onnx.TensorProto.INT8
    qconv = next(n for n in proto.graph.node if n.op_type == "QLinearConv")
    x_zp, w, w_scale, w_zp, y_zp, bias = (
        numpy_helper.to_array(_initializer(proto, qconv, i)) for i in (2, 3, 4, 5, 7, 8)
    )
    # Inputs in uint8 with their zero point (asymmetric grid [0, 15], zero point 3); weights
    # int8 per output channel (axis 0 of OIHW), zero point 0; int32 bias.
    assert x_zp.dtype == np.uint8 and int(x_zp) == 3
    assert w.dtype == np.int8 and w.shape == (6, 5, 1, 1) and w_scale.shape == (6,)
    assert w_zp.dtype == np.int8 and not w_zp.any() and bias.dtype == np.int32
    assert y_zp.dtype == np.uint8 and int(y_zp) == 0
    # Per output channel: the trained 4-bit integers times a whole factor f (the scale divided
    # by f), negated where BN's multiplier is negative; zero where it is zero.
    kernel1, _, mul1, _, _, _, w_scale1 = params
    trained = np.transpose(
        np.asarray(quant.to_int(kernel1, w_scale1, n_bits=4, signed=True)), (3, 2, 0, 1)
    )
    for c in (0, 1, 3, 4, 5):
        factor = np.float64(w_scale1.reshape(-1)[c]) * abs(mul1[c]) / w_scale[c]
        assert abs(factor - round(factor)) < 1e-4 and 1 <= round(factor) <= 127
        np.testing.assert_array_equal(w[c], round(factor) * np.sign(mul1[c]) * trained[c])
    assert not w[2].any()
    flipped, worst, steps = _compare_toy(proto, images, out, ints)
    print(
        f"toy int8: {flipped:.2%} of the 3-bit integers one step off; max |output diff| "
        f"on the other images {worst:.3g}"
    )
    assert steps <= 1 and flipped <= MAX_FLIPPED and worst <= 1e-5


def _one_step(where: int):
    """An edit moving the ``where``-th stored integer by one trained step: the greatest
    common divisor of its output channel's integers (the channel's factor, see
    ``integer_kernel``), down at the top of int8."""

    def edit(w):
        channel = np.abs(w[np.unravel_index(where, w.shape)[0]])
        step = int(np.gcd.reduce(channel[channel > 0]))
        flat = w.reshape(-1)
        flat[where] += step if int(flat[where]) + step <= 127 else -step
        return w

    return edit


@pytest.mark.parametrize(
    "node_op, index, edit",
    [
        ("QLinearConv", 3, _one_step(7)),
        ("QLinearConv", 2, np.zeros_like),
        ("QLinearConv", 4, lambda s: s[::-1].copy()),
        ("Conv", 0, _one_step(4 + 9 * 4)),  # channel 4's centre tap
    ],
    ids=[
        "one_weight_integer",
        "input_zero_point_dropped",
        "scales_on_wrong_channels",
        "one_depthwise_integer",
    ],
)
def test_a_wrong_integer_zero_point_or_scale_breaks_the_int8_comparison(
    toy_int8, node_op, index, edit
):
    """Negative controls of the comparison above: each plausible bug fails it."""
    images, proto, out, ints, _ = toy_int8
    flipped, worst, steps = _compare_toy(_edited(proto, node_op, index, edit), images, out, ints)
    assert steps > 1 or flipped > MAX_FLIPPED or worst > 1e-5


@pytest.mark.parametrize("container", ["int4", "int8"])
def test_a_conv_read_twice_by_hard_swish_is_emitted_once(container):
    # hard_swish(y) = y * relu6(y + 3) / 6 reads the conv + BN output y and y + 3; the second
    # read folds the 3 into another offset of the same layer, which must not emit the conv
    # again (MobileNetV3 ran each such conv twice). The input is quantized, so the int8
    # container's conv reads integers.
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    mul = np.array([1.5, -0.7, 0.0, 0.3, 2.0, -1.0], np.float32)
    beta = rng.normal(size=6).astype(np.float32)
    images = rng.normal(size=(3, 9, 9, 4)).astype(np.float32)

    def fn(x):
        px = quant.quant_params(0.1, x_shape=x.shape, n_bits=4, signed=True)
        x = quant.dequantize_with(quant.to_int_with(x, px), px)
        p = quant.quant_params(0.2, x_shape=kernel.shape, n_bits=4, signed=True)
        w = quant.dequantize_with(quant.to_int_with(kernel, p), p)
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.hard_swish(y * mul + beta).mean(axis=(1, 2))

    proto = export_onnx(fn, images[:1], container=container)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Conv"] + ops["QLinearConv"] == 1, ops
    np.testing.assert_allclose(run_onnx(proto, images), jax.jit(fn)(images), rtol=0, atol=1e-5)
