"""ONNX export of models written outside the package (oscqat_jax.deploy.onnx_export): a Linen
CNN quantized by rules and its NNX twin, each with a depth-wise conv of equal input and
output channels (named ``mixer`` / ``blocks/0``), BatchNorm after every conv and a dense
head, at W4A4 (``LSQ_paper``).

Whatever depth-wise implementation the model runs with (on the CPU: shifted slices), the
graph must hold every quantized conv as QDQ, the depth-wise one as one Conv with ``group``
equal to its channels and no Slice taps; ONNX Runtime must give the JAX eval logits; the file
must be smaller than the float32 parameters; the same for the int8 container."""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto
from user_models import SHAPE, LinenNet, images, linen_quantized, nnx_quantized

from oscqat_jax.deploy import export_model_onnx, export_onnx, run_onnx

CHANNELS = 16
TEST_IMAGES = np.asarray(images(64, seed=5))


@pytest.fixture(scope="module")
def linen():
    return linen_quantized(LinenNet(channels=CHANNELS))


@pytest.fixture(scope="module")
def nnx_model():
    return nnx_quantized(channels=CHANNELS)


def _float_bytes(qmodel) -> int:
    params = qmodel.model.init(jax.random.key(0), images(1))["params"]
    return 4 * sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _check_graph(model: onnx.ModelProto, container: str) -> None:
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["Slice"] == 0, ops  # no shifted taps
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "QLinearConv")]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert sorted(groups) == [1, 1, CHANNELS], groups  # stem, expand; mixer grouped
    mixer = convs[groups.index(CHANNELS)]
    initializers = {t.name: t for t in model.graph.initializer}
    if container == "int4":
        # The depth-wise kernel: 4-bit integers through a DequantizeLinear, its input too.
        weight = _producers(model)[mixer.input[1]]
        assert weight.op_type == "DequantizeLinear"
        stored = initializers[weight.input[0]]
        assert stored.data_type == TensorProto.INT4
        assert list(stored.dims) == [CHANNELS, 1, 3, 3]
        source = _producers(model)[mixer.input[0]]
        while source.op_type == "Transpose":  # NHWC -> NCHW
            source = _producers(model)[source.input[0]]
        assert source.op_type == "DequantizeLinear"
    else:
        assert mixer.op_type == "QLinearConv"
        assert initializers[mixer.input[3]].data_type == TensorProto.INT8


def _check_agreement(path, jax_logits) -> None:
    onnx_logits = run_onnx(path, TEST_IMAGES)
    assert np.mean(onnx_logits.argmax(1) == jax_logits.argmax(1)) == 1.0
    assert np.abs(onnx_logits - jax_logits).max() < 1e-4


@pytest.mark.parametrize("container", ["int4", "int8"])
def test_rules_quantized_linen_model(linen, tmp_path, container):
    qmodel, variables = linen
    path = tmp_path / "model.onnx"
    model = export_model_onnx(
        qmodel, variables, path, input_shape=SHAPE, container=container, train=False
    )
    _check_graph(model, container)
    assert os.path.getsize(path) < _float_bytes(qmodel)
    _check_agreement(path, np.asarray(qmodel.apply(variables, TEST_IMAGES, train=False)))


@pytest.mark.parametrize("container", ["int4", "int8"])
def test_quantized_nnx_model(nnx_model, linen, tmp_path, container):
    path = tmp_path / "model.onnx"
    model = export_model_onnx(nnx_model, path=path, input_shape=SHAPE, container=container)
    _check_graph(model, container)
    assert os.path.getsize(path) < _float_bytes(linen[0])
    _check_agreement(path, np.asarray(nnx_model(TEST_IMAGES)))


def test_any_traced_function_exports_depthwise_as_grouped_conv(linen):
    # The model quantized with the default depth-wise implementation, traced as the user
    # writes it: no option to remember.
    qmodel, variables = linen
    assert qmodel.depthwise_impl == "auto"
    model = export_onnx(lambda x: qmodel.apply(variables, x, train=False), TEST_IMAGES[:1])
    _check_graph(model, "int4")


def test_a_function_jitted_before_the_export_is_refused(linen):
    qmodel, variables = linen
    fn = jax.jit(lambda x: qmodel.apply(variables, x, train=False))
    fn(TEST_IMAGES[:1])  # traced with the shifted form (CPU default)
    fn(TEST_IMAGES[:2])
    if jax.default_backend() != "cpu":
        pytest.skip("off the CPU the default form is the grouped conv")
    with pytest.raises(ValueError, match="shifted slices.*without jax.jit"):
        export_onnx(fn, TEST_IMAGES[:1])


def test_bad_arguments_are_told(linen, nnx_model, tmp_path):
    qmodel, variables = linen
    with pytest.raises(ValueError, match="needs the variables of the QuantizedModel"):
        export_model_onnx(qmodel, input_shape=SHAPE)
    with pytest.raises(ValueError, match="holds its own variables"):
        export_model_onnx(nnx_model, variables, input_shape=SHAPE)
    with pytest.raises(ValueError, match="got dict"):
        export_model_onnx({}, variables, input_shape=SHAPE)
