"""Tests of oscqat_jax.convert: PyTorch checkpoints -> params/batch_stats.

Two kinds of evidence: eval-mode logits of small PyTorch networks written here (the reference's
MobileNetV2 layout and torchvision's ResNet-18) against our converted float models, and full
coverage of synthetic state dicts whose key names and shapes are torchvision's and timm's,
written down below from those libraries' architectures (their parameter totals are checked
against the published ones).
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from oscqat_jax import convert
from oscqat_jax.models import MODELS, create_model
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import FLOAT_SETUP, QuantSetup

# --------------------------------------------------------------------------- PyTorch key layouts
# {key: shape} in the order the PyTorch modules register them.

MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# torchvision's MobileNetV3 (input, kernel, expanded, out, SE, stride); hard-swish is irrelevant here.
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, 1),
    (16, 3, 64, 24, False, 2),
    (24, 3, 72, 24, False, 1),
    (24, 5, 72, 40, True, 2),
    (40, 5, 120, 40, True, 1),
    (40, 5, 120, 40, True, 1),
    (40, 3, 240, 80, False, 2),
    (80, 3, 200, 80, False, 1),
    (80, 3, 184, 80, False, 1),
    (80, 3, 184, 80, False, 1),
    (80, 3, 480, 112, True, 1),
    (112, 3, 672, 112, True, 1),
    (112, 5, 672, 160, True, 2),
    (160, 5, 960, 160, True, 1),
    (160, 5, 960, 160, True, 1),
)
MOBILENET_V3_SMALL = (
    (16, 3, 16, 16, True, 2),
    (16, 3, 72, 24, False, 2),
    (24, 3, 88, 24, False, 1),
    (24, 5, 96, 40, True, 2),
    (40, 5, 240, 40, True, 1),
    (40, 5, 240, 40, True, 1),
    (40, 5, 120, 48, True, 1),
    (48, 5, 144, 48, True, 1),
    (48, 5, 288, 96, True, 2),
    (96, 5, 576, 96, True, 1),
    (96, 5, 576, 96, True, 1),
)
# timm's efficientnet_lite0 stages: (repeats, kernel, first stride, expansion, out).
EFFICIENTNET_LITE0 = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

PUBLISHED_TOTALS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "efficientnet_lite0": 4_652_008,
}
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _Keys(dict):
    """``{key: shape}`` builder with PyTorch's conv, BatchNorm and linear entries."""

    def conv(self, prefix, out, inp, k, *, groups=1, bias=False):
        self[f"{prefix}.weight"] = (out, inp // groups, k, k)
        if bias:
            self[f"{prefix}.bias"] = (out,)

    def bn(self, prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            self[f"{prefix}.{name}"] = (c,)
        self[f"{prefix}.num_batches_tracked"] = ()

    def linear(self, prefix, out, inp):
        self[f"{prefix}.weight"] = (out, inp)
        self[f"{prefix}.bias"] = (out,)


def _divisible(v, d=8):
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def mobilenet_v2_keys(layout, num_classes=1000):
    """torchvision's ``mobilenet_v2`` or the reference's (tonylins) at width 1.0."""
    keys, inp, i = _Keys(), 32, 1
    keys.conv("features.0.0", 32, 3, 3)
    keys.bn("features.0.1", 32)
    for t, c, n, _ in MOBILENET_V2_SETTING:
        for _ in range(n):
            hidden, p = inp * t, f"features.{i}.conv"
            layers = ([(hidden, inp, 1, 1)] if t != 1 else []) + [(hidden, hidden, 3, hidden)]
            for j, (out, cin, k, groups) in enumerate([*layers, (c, hidden, 1, 1)]):
                last = j == len(layers)
                if layout == "reference":
                    conv, bn = f"{p}.{3 * j}", f"{p}.{3 * j + 1}"
                else:
                    conv, bn = (
                        (f"{p}.{j}", f"{p}.{j + 1}") if last else (f"{p}.{j}.0", f"{p}.{j}.1")
                    )
                keys.conv(conv, out, cin, k, groups=groups)
                keys.bn(bn, out)
            inp, i = c, i + 1
    keys.conv("features.18.0", 1280, 320, 1)
    keys.bn("features.18.1", 1280)
    keys.linear("classifier.1", num_classes, 1280)
    return keys


def mobilenet_v3_keys(variant):
    """torchvision's ``mobilenet_v3_small`` / ``mobilenet_v3_large``."""
    setting, last = (MOBILENET_V3_SMALL, 1024) if variant == "small" else (MOBILENET_V3_LARGE, 1280)
    keys = _Keys()
    keys.conv("features.0.0", 16, 3, 3)
    keys.bn("features.0.1", 16)
    for i, (inp, k, exp, out, se, _) in enumerate(setting, start=1):
        layers = [] if exp == inp else [("conv", exp, inp, 1, 1)]
        layers += (
            [("conv", exp, exp, k, exp)] + ([("se",)] if se else []) + [("conv", out, exp, 1, 1)]
        )
        for j, layer in enumerate(layers):
            p = f"features.{i}.block.{j}"
            if layer[0] == "se":
                squeeze = _divisible(exp // 4)
                keys.conv(f"{p}.fc1", squeeze, exp, 1, bias=True)
                keys.conv(f"{p}.fc2", exp, squeeze, 1, bias=True)
            else:
                keys.conv(f"{p}.0", *layer[1:4], groups=layer[4])
                keys.bn(f"{p}.1", layer[1])
    n, head = len(setting) + 1, 6 * setting[-1][3]
    keys.conv(f"features.{n}.0", head, setting[-1][3], 1)
    keys.bn(f"features.{n}.1", head)
    keys.linear("classifier.0", last, head)
    keys.linear("classifier.3", 1000, last)
    return keys


def resnet_keys(depth, num_classes=1000):
    """torchvision's ``resnet18`` / ``resnet50`` (v1.5: stride on the 3x3 conv)."""
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
    expansion, keys, inp = (4 if bottleneck else 1), _Keys(), 64
    keys.conv("conv1", 64, 3, 7)
    keys.bn("bn1", 64)
    for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for j in range(n):
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            if bottleneck:
                convs = [(planes, inp, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, inp, 3), (planes, planes, 3)]
            for k, (out, cin, size) in enumerate(convs, start=1):
                keys.conv(f"{p}.conv{k}", out, cin, size)
                keys.bn(f"{p}.bn{k}", out)
            if stride != 1 or inp != planes * expansion:
                keys.conv(f"{p}.downsample.0", planes * expansion, inp, 1)
                keys.bn(f"{p}.downsample.1", planes * expansion)
            inp = planes * expansion
    keys.linear("fc", num_classes, inp)
    return keys


def efficientnet_lite0_keys():
    """timm's ``efficientnet_lite0``."""
    keys, inp = _Keys(), 32
    keys.conv("conv_stem", 32, 3, 3)
    keys.bn("bn1", 32)
    for s, (n, k, _, e, out) in enumerate(EFFICIENTNET_LITE0):
        for b in range(n):
            p, mid = f"blocks.{s}.{b}", inp * e
            if e == 1:
                keys.conv(f"{p}.conv_dw", inp, inp, k, groups=inp)
                keys.bn(f"{p}.bn1", inp)
                keys.conv(f"{p}.conv_pw", out, inp, 1)
                keys.bn(f"{p}.bn2", out)
            else:
                keys.conv(f"{p}.conv_pw", mid, inp, 1)
                keys.bn(f"{p}.bn1", mid)
                keys.conv(f"{p}.conv_dw", mid, mid, k, groups=mid)
                keys.bn(f"{p}.bn2", mid)
                keys.conv(f"{p}.conv_pwl", out, mid, 1)
                keys.bn(f"{p}.bn3", out)
            inp = out
    keys.conv("conv_head", 1280, inp, 1)
    keys.bn("bn2", 1280)
    keys.linear("classifier", 1000, 1280)
    return keys


LAYOUTS = {
    ("mobilenet_v2", "reference"): lambda: mobilenet_v2_keys("reference"),
    ("mobilenet_v2", "torchvision"): lambda: mobilenet_v2_keys("torchvision"),
    ("mobilenet_v3_small", "torchvision"): lambda: mobilenet_v3_keys("small"),
    ("mobilenet_v3_large", "torchvision"): lambda: mobilenet_v3_keys("large"),
    ("resnet18", "torchvision"): lambda: resnet_keys(18),
    ("resnet50", "torchvision"): lambda: resnet_keys(50),
    ("efficientnet_lite0", "timm"): efficientnet_lite0_keys,
}


def _parameter_count(keys):
    return sum(
        int(np.prod(shape)) for k, shape in keys.items() if k.rsplit(".", 1)[-1] not in BN_BUFFERS
    )


def _random_state_dict(keys, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: np.asarray(3, np.int64)
        if k.endswith("num_batches_tracked")
        else rng.standard_normal(shape, np.float32)
        for k, shape in keys.items()
    }


def _model(name, quant_setup, num_classes=1000):
    return create_model(name, num_classes=num_classes, quant_setup=quant_setup)


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
    return jax.eval_shape(init, jax.random.key(0), x, QuantContext.create("eval")), order


@pytest.fixture(scope="module")
def resnet18_template():
    return _template("resnet18", QuantSetup())


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(("name", "layout"), list(LAYOUTS))
def test_layout_has_the_published_parameter_total(name, layout):
    assert _parameter_count(LAYOUTS[name, layout]()) == PUBLISHED_TOTALS[name]


@pytest.mark.parametrize(("name", "layout"), list(LAYOUTS))
def test_every_tensor_lands_once_in_the_quantized_model(name, layout):
    keys = LAYOUTS[name, layout]()
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


@pytest.mark.parametrize("name", list(MODELS))
def test_models_are_known_by_their_registry_name(name):
    model = create_model(name, num_classes=10, quant_setup=FLOAT_SETUP)
    assert convert.model_name_of(model) == name
    assert convert.layouts_of(model)[-1] == "converted"


def test_weights_are_transposed_to_flax_layouts():
    state_dict = _random_state_dict(mobilenet_v2_keys("torchvision"))
    template = _template("mobilenet_v2", QuantSetup())
    result = convert.convert_state_dict(state_dict, "mobilenet_v2", template, "torchvision")
    depthwise = state_dict["features.3.conv.1.0.weight"]  # (144, 1, 3, 3)
    np.testing.assert_array_equal(
        result.params["features_3"]["depthwise"]["kernel"], depthwise.transpose(2, 3, 1, 0)
    )
    expand = state_dict["features.3.conv.0.0.weight"]  # (144, 24, 1, 1)
    assert result.params["features_3"]["expand"]["kernel"].shape == (1, 1, 24, 144)
    np.testing.assert_array_equal(
        result.params["features_3"]["expand"]["kernel"][0, 0], expand[:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        result.params["classifier"]["kernel"], state_dict["classifier.1.weight"].T
    )
    bn = result.batch_stats["features_3"]["project"]["bn"]
    np.testing.assert_array_equal(bn["var"], state_dict["features.3.conv.3.running_var"])


# --------------------------------------------------------------------------- errors


def test_missing_key_is_named(resnet18_template):
    state_dict = _random_state_dict(resnet_keys(18))
    del state_dict["layer2.0.downsample.1.running_var"]
    with pytest.raises(
        ValueError,
        match=r"^The checkpoint lacks key 'layer2\.0\.downsample\.1\.running_var', which the "
        r"torchvision layout of resnet18 needs for batch_stats/layer2_0/downsample/bn/var\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template, "torchvision")


def test_unexpected_key_is_named(resnet18_template):
    state_dict = _random_state_dict(resnet_keys(18))
    state_dict["layer4.1.conv3.weight"] = np.zeros((512, 512, 1, 1), np.float32)
    with pytest.raises(
        ValueError,
        match=r"^Checkpoint key 'layer4\.1\.conv3\.weight' \(of 1 unused keys\) has no place in "
        r"the torchvision layout of resnet18\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template)


def test_misshaped_key_is_named(resnet18_template):
    state_dict = _random_state_dict(resnet_keys(18, num_classes=10))
    with pytest.raises(
        ValueError,
        match=r"^Checkpoint key 'fc\.weight' has shape \(10, 512\), but the torchvision layout "
        r"of resnet18 needs \(1000, 512\) for params/fc/kernel\.$",
    ):
        convert.convert_state_dict(state_dict, "resnet18", resnet18_template, "torchvision")


def test_wrong_model_and_layout_are_refused(resnet18_template):
    state_dict = _random_state_dict(mobilenet_v2_keys("torchvision"))
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
    state_dict = _random_state_dict(resnet_keys(18))
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
        variables["params"]["layer3_1"]["conv2"]["kernel"],
        state_dict["layer3.1.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv1"]["bn"]["mean"], state_dict["bn1.running_mean"]
    )
    # Quantizer scales are not in the file and stay as they were.
    scale = variables["params"]["layer3_1"]["conv2"]["weight_scale"]
    assert scale is resnet18_template["params"]["layer3_1"]["conv2"]["weight_scale"]


# --------------------------------------------------------------------------- parity with PyTorch


def _torch_networks(torch):
    """The reference's MobileNetV2 (tonylins layout) and torchvision's ResNet-18, in PyTorch."""
    nn = torch.nn

    def conv_bn(cin, out, k, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, out, k, stride, (k - 1) // 2, groups=groups, bias=False)]
        return layers + [nn.BatchNorm2d(out)] + ([nn.ReLU6()] if act else [])

    class InvertedResidual(nn.Module):
        def __init__(self, cin, out, stride, t):
            super().__init__()
            hidden, self.residual = cin * t, stride == 1 and cin == out
            expand = conv_bn(cin, hidden, 1) if t != 1 else []
            dw = conv_bn(hidden, hidden, 3, stride, hidden)
            self.conv = nn.Sequential(*expand, *dw, *conv_bn(hidden, out, 1, act=False))

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            features, cin = [nn.Sequential(*conv_bn(3, 32, 3, 2))], 32
            for t, c, n, s in MOBILENET_V2_SETTING:
                for i in range(n):
                    features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            features.append(nn.Sequential(*conv_bn(cin, 1280, 1)))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    class BasicBlock(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, planes in enumerate((64, 128, 256, 512), start=1):
                stride = 1 if i == 1 else 2
                blocks = [BasicBlock(cin, planes, stride), BasicBlock(planes, planes, 1)]
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
                cin = planes
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(x.mean((2, 3)))

    return {"mobilenet_v2": MobileNetV2, "resnet18": ResNet18}


PARITY = {
    ("mobilenet_v2", "reference"): lambda: mobilenet_v2_keys("reference", num_classes=10),
    ("resnet18", "torchvision"): lambda: resnet_keys(18, num_classes=10),
}


@pytest.mark.parametrize(("name", "layout"), list(PARITY))
def test_converted_float_model_matches_pytorch(tmp_path, name, layout):
    import torch

    torch.manual_seed(0)
    net = _torch_networks(torch)[name](num_classes=10).eval()
    with torch.no_grad():  # BatchNorm with non-trivial statistics
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == PARITY[name, layout]()
    torch.save(net.state_dict(), tmp_path / "net.pth")

    model, template = _model(name, FLOAT_SETUP, 10), _template(name, FLOAT_SETUP, 10)
    variables = convert.load_pretrained(tmp_path / "net.pth", model, template, layout=layout)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    ctx = QuantContext.create("float_eval")
    logits = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1), ctx))
    error = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
    assert error <= 1e-5, error
