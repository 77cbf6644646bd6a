"""Tests of oscqat_jax.convert: PyTorch checkpoints -> params/batch_stats.

Keys, shapes and totals: state dicts with the key names and shapes of the PyTorch networks in
``torch_references`` (written after torchvision, timm and the official reference; their
parameter totals and our models' are checked against the published ones) land tensor by
tensor in our models; errors name the key at fault; the file formats read back. Logit parity
with those networks is in ``test_convert_parity.py``.
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from torch_references import NETWORKS, parameter_count, state_dict_shapes

from oscqat_jax import convert
from oscqat_jax import models as families
from oscqat_jax.nn.quantizer import is_quantizer_param
from oscqat_jax.nn.setups import QuantSetup

# At 1000 classes: torchvision's model cards (mobilenet_v2, mobilenet_v3_*, resnet*) and timm's
# efficientnet_lite0; the reference's MobileNetV2 is torchvision's at width 1.0.
PUBLISHED_TOTALS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "efficientnet_lite0": 4_652_008,
}


def _random_state_dict(keys, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: np.asarray(3, np.int64)
        if k.endswith("num_batches_tracked")
        else rng.standard_normal(shape, np.float32)
        for k, shape in keys.items()
    }


def _model(name, quant_setup, num_classes=1000):
    """The plain model ``name`` quantized by the rules of ``quant_setup``."""
    return families.quantize(families.create_model(name, num_classes=num_classes), quant_setup)


def _template(name, quant_setup, num_classes=1000):
    """The model's variable shapes (as ShapeDtypeStructs)."""
    return _traced(name, quant_setup, num_classes)[0]


@functools.cache
def _traced(name, quant_setup, num_classes=1000):
    """``(variable shapes, params paths in creation order)``, traced once per argument set
    (tracing costs seconds; ``eval_shape``'s output sorts dict keys, so the order is recorded
    while tracing)."""
    model, order = _model(name, quant_setup, num_classes), []

    def init(*args):
        variables = model.init(*args)
        order.extend(traverse_util.flatten_dict(variables["params"]))
        return variables

    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(init, jax.random.key(0), x), order


@pytest.fixture(scope="module")
def resnet18_template():
    return _template("resnet18", QuantSetup())


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(("name", "layout"), list(NETWORKS))
def test_reference_network_and_our_model_have_the_published_total(name, layout):
    assert parameter_count(name, layout) == PUBLISHED_TOTALS[name]
    params = traverse_util.flatten_dict(_template(name, QuantSetup())["params"])
    ours = sum(leaf.size for path, leaf in params.items() if not is_quantizer_param(path[-1]))
    assert ours == PUBLISHED_TOTALS[name]


@pytest.mark.parametrize(("name", "layout"), list(NETWORKS))
def test_every_tensor_lands_once_in_the_quantized_model(name, layout):
    keys = state_dict_shapes(name, layout)
    # Each tensor is filled with its position in PyTorch's registration order.
    state_dict = {k: np.full(shape, i, np.float32) for i, (k, shape) in enumerate(keys.items())}
    template, creation_order = _traced(name, QuantSetup())
    assert convert.detect_layout(state_dict, name, template) == layout
    result = convert.convert_state_dict(state_dict, name, template, layout)

    params = jax.tree_util.tree_leaves(result.params)
    stats = jax.tree_util.tree_leaves(result.batch_stats)
    assert sum(p.size for p in params) == PUBLISHED_TOTALS[name]
    assert len(params) + len(stats) + len(result.ignored) == len(keys)
    assert all(p.dtype == np.float32 for p in params + stats)
    # In creation order, our layers and the weights within each come in PyTorch's order, so
    # no two tensors of the same shape are swapped.
    converted = traverse_util.flatten_dict(result.params)
    positions = [int(converted[path].flat[0]) for path in creation_order if path in converted]
    assert positions == sorted(positions)
    # Everything the converter did not fill is a quantizer parameter, and there are some.
    assert result.untouched
    assert all(p.endswith(("_scale", "_zero_point")) for p in result.untouched)
    assert len(result.untouched) + len(params) == len(jax.tree_util.tree_leaves(template["params"]))


@pytest.mark.parametrize("name", list(families.MODELS))
def test_models_are_known_by_their_registry_name(name):
    model = families.create_model(name, num_classes=10)
    assert convert.model_name_of(model) == name
    assert convert.layouts_of(model)[-1] == "converted"


def test_a_model_outside_the_registry_is_named():
    with pytest.raises(ValueError, match=r"^Dense is not a model of oscqat_jax\.models\.MODELS"):
        convert.model_name_of(nn.Dense(3))


def test_weights_are_transposed_to_flax_layouts():
    state_dict = _random_state_dict(state_dict_shapes("mobilenet_v2", "torchvision"))
    template = _template("mobilenet_v2", QuantSetup())
    result = convert.convert_state_dict(state_dict, "mobilenet_v2", template, "torchvision")
    depthwise = state_dict["features.3.conv.1.0.weight"]  # (144, 1, 3, 3)
    np.testing.assert_array_equal(
        result.params["features_3"]["depthwise"]["conv"]["kernel"], depthwise.transpose(2, 3, 1, 0)
    )
    expand = state_dict["features.3.conv.0.0.weight"]  # (144, 24, 1, 1)
    assert result.params["features_3"]["expand"]["conv"]["kernel"].shape == (1, 1, 24, 144)
    np.testing.assert_array_equal(
        result.params["features_3"]["expand"]["conv"]["kernel"][0, 0], expand[:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        result.params["classifier"]["kernel"], state_dict["classifier.1.weight"].T
    )
    bn = result.batch_stats["features_3"]["project"]["bn"]
    np.testing.assert_array_equal(bn["var"], state_dict["features.3.conv.3.running_var"])


# --------------------------------------------------------------------------- errors


def test_missing_key_is_named(resnet18_template):
    state_dict = _random_state_dict(state_dict_shapes("resnet18", "torchvision"))
    del state_dict["layer2.0.downsample.1.running_var"]
    with pytest.raises(
        ValueError,
        match=r"^The checkpoint lacks key 'layer2\.0\.downsample\.1\.running_var', which the "
        r"torchvision layout of resnet18 needs for batch_stats/layer2_0/downsample/bn/var\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template, "torchvision")


def test_unexpected_key_is_named(resnet18_template):
    state_dict = _random_state_dict(state_dict_shapes("resnet18", "torchvision"))
    state_dict["layer4.1.conv3.weight"] = np.zeros((512, 512, 1, 1), np.float32)
    with pytest.raises(
        ValueError,
        match=r"^Checkpoint key 'layer4\.1\.conv3\.weight' \(of 1 unused keys\) has no place in "
        r"the torchvision layout of resnet18\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template)


def test_misshaped_key_is_named(resnet18_template):
    state_dict = _random_state_dict(state_dict_shapes("resnet18", "torchvision", num_classes=10))
    with pytest.raises(
        ValueError,
        match=r"^Checkpoint key 'fc\.weight' has shape \(10, 512\), but the torchvision layout "
        r"of resnet18 needs \(1000, 512\) for params/fc/kernel\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template, "torchvision")


def test_wrong_model_and_layout_are_refused(resnet18_template):
    state_dict = _random_state_dict(state_dict_shapes("mobilenet_v2", "torchvision"))
    with pytest.raises(ValueError, match="shares no key with any layout of resnet18"):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template)
    with pytest.raises(ValueError, match="layout must be one of torchvision, reference, converted"):
        convert.convert_state_dict({}, "resnet18", resnet18_template, "timm")
    with pytest.raises(ValueError, match="No converter for model 'vgg16'"):
        convert.family_of("vgg16")


# --------------------------------------------------------------------------- file formats


def _write_safetensors(path, tensors):
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian data."""
    names = {np.float32: "F32", np.float16: "F16", ml_dtypes.bfloat16: "BF16", np.int64: "I64"}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, value in tensors.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {
            "dtype": names[value.dtype.type],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _small_tensors():
    rng = np.random.default_rng(1)
    return {
        "module.conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "module.bn.running_var": rng.random(4).astype(np.float16),
        "module.fc.weight": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16),
        "module.bn.num_batches_tracked": np.asarray(7, np.int64),
    }


def _assert_same_tensors(loaded, tensors):
    assert list(loaded) == [k.removeprefix("module.") for k in tensors]
    for key, value in tensors.items():
        got = loaded[key.removeprefix("module.")]
        assert got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(value, np.float64))


@pytest.mark.parametrize("with_package", [False, True])
def test_safetensors_round_trip(tmp_path, monkeypatch, with_package):
    if with_package:
        import safetensors.numpy  # noqa: F401  (the optional reader must be installed here)
    else:
        monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails: the parser
    tensors = _small_tensors()
    _write_safetensors(tmp_path / "w.safetensors", tensors)
    _assert_same_tensors(convert.load_torch_state_dict(tmp_path / "w.safetensors"), tensors)


def test_npz_round_trip(tmp_path):
    tensors = {k: v for k, v in _small_tensors().items() if v.dtype != ml_dtypes.bfloat16}
    np.savez(tmp_path / "w.npz", **tensors)
    _assert_same_tensors(convert.load_torch_state_dict(tmp_path / "w.npz"), tensors)


def test_npz_and_safetensors_are_read_without_torch(tmp_path):
    tensors = _small_tensors()
    _write_safetensors(tmp_path / "w.safetensors", tensors)
    np.savez(tmp_path / "w.npz", conv=tensors["module.conv.weight"])
    code = (
        "import sys; from oscqat_jax import convert; "
        f"convert.load_torch_state_dict({str(tmp_path / 'w.npz')!r}); "
        f"convert.load_torch_state_dict({str(tmp_path / 'w.safetensors')!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model"])
def test_torch_files_with_prefix_and_wrapping_dicts(tmp_path, wrap):
    import torch

    tensors = {k: v for k, v in _small_tensors().items() if v.dtype != ml_dtypes.bfloat16}
    state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
    state_dict["module.fc.bias"] = torch.ones(2, dtype=torch.bfloat16)
    obj = state_dict if wrap is None else {wrap: state_dict, "epoch": 3, "arch": "x"}
    torch.save(obj, tmp_path / "w.pth.tar")
    loaded = convert.load_torch_state_dict(tmp_path / "w.pth.tar")
    _assert_same_tensors({k: v for k, v in loaded.items() if k != "fc.bias"}, tensors)
    assert loaded["fc.bias"].dtype == np.float32 and loaded["bn.running_var"].dtype == np.float32


def test_torch_file_that_would_run_code_is_refused(tmp_path):
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}, "opt": _Pickled()}, tmp_path / "w.pt")
    with pytest.raises(
        ValueError,
        match=r"w\.pt was not loaded: read with weights_only=True, a checkpoint may hold only "
        r"tensors and plain containers, but this one holds test_convert\._Pickled; save "
        r"model\.state_dict\(\) instead\.$",
    ):
        convert.load_torch_state_dict(tmp_path / "w.pt")
    torch.save({"weights": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds a dict with keys \['weights'\], not a state dict"):
        convert.load_torch_state_dict(tmp_path / "other.pt")


class _Pickled:
    """An arbitrary class: loading it would mean unpickling code."""


# --------------------------------------------------------------------------- command


def test_command_writes_an_npz_that_loads_into_a_quantized_model(
    tmp_path, capsys, resnet18_template
):
    state_dict = _random_state_dict(state_dict_shapes("resnet18", "torchvision"))
    np.savez(tmp_path / "src.npz", **{f"module.{k}": v for k, v in state_dict.items()})
    files = [str(tmp_path / "src.npz"), str(tmp_path / "dst.npz")]
    assert convert.main(["--model=resnet18", "--layout=torchvision", *files]) == 0
    assert capsys.readouterr().out.endswith(
        "layout torchvision: 62 parameter tensors (11,689,512 parameters) and 40 BatchNorm "
        "statistics converted, 20 num_batches_tracked entries ignored\n"
    )
    assert convert.main(["--model=resnet18", "--layout=timm", *files]) == 2
    assert "layout must be one of torchvision, reference" in capsys.readouterr().err

    conversion = convert.convert_state_dict(state_dict, "resnet18", resnet18_template)
    assert conversion.summary().endswith(
        "41 quantizer parameters left to range initialisation (21 weight_scale, 20 input_scale)"
    )
    variables = convert.load_pretrained(tmp_path / "dst.npz", "resnet18", resnet18_template)
    np.testing.assert_array_equal(
        variables["params"]["layer3_1"]["conv2"]["conv"]["kernel"],
        state_dict["layer3.1.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv1"]["bn"]["mean"], state_dict["bn1.running_mean"]
    )
    # Quantizer scales are not in the file and stay as they were.
    scale = variables["params"]["layer3_1"]["conv2"]["weight_scale"]
    assert scale is resnet18_template["params"]["layer3_1"]["conv2"]["weight_scale"]


def test_a_converted_file_of_the_ctx_models_loads_onto_the_plain_paths(tmp_path, resnet18_template):
    state_dict = _random_state_dict(state_dict_shapes("resnet18", "torchvision"))
    conversion = convert.convert_state_dict(state_dict, "resnet18", resnet18_template)
    convert.save_converted(tmp_path / "families.npz", conversion)
    # The same weights as the ctx models kept them: a ConvBN's kernel at <layer>/kernel.
    arrays = dict(np.load(tmp_path / "families.npz"))
    old = {k.replace("/conv/kernel", "/kernel"): v for k, v in arrays.items()}
    assert len(old) == len(arrays) and "params/layer1_0/conv1/kernel" in old
    np.savez(tmp_path / "ctx.npz", **old)
    new = convert.load_pretrained(tmp_path / "families.npz", "resnet18", resnet18_template)
    loaded = convert.load_pretrained(tmp_path / "ctx.npz", "resnet18", resnet18_template)
    assert convert.detect_layout(old, "resnet18", resnet18_template) == "converted"
    for collection in ("params", "batch_stats"):
        want = traverse_util.flatten_dict(new[collection])
        got = traverse_util.flatten_dict(loaded[collection])
        assert got.keys() == want.keys()
        for path, value in want.items():
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))
