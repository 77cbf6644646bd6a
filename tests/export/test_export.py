"""Tests of oscqat_jax.export: round trips through both formats, the stored integers and the
folded BN, the file size of a real network, and the errors.

Format version 4 folds each quantized conv's BN into its per-channel scale and a bias, so a
loaded model computes ``conv * (s * mul) + offset`` where the original computed ``(conv * s -
mean) * mul + beta``: the same integers, the logits to float rounding (``LOGIT_ATOL``).

Variables are filled on the host from ``jax.eval_shape(model.init, ...)`` (a jitted init
compiles one random kernel per parameter), then calibrated by one jitted calibration step.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from testkit import TEST_BLOCKS

from oscqat_jax import export, quant, weight_files
from oscqat_jax.export import fileformat
from oscqat_jax.models import create_model, quant_plan
from oscqat_jax.nn import collect
from oscqat_jax.nn.config import QuantContext
from oscqat_jax.nn.setups import QuantSetup
from oscqat_jax.training import step as step_lib

EVAL = QuantContext.create("eval")
TINY = dict(  # create_model's options of a MobileNetV2 with three inverted-residual blocks
    num_classes=4,
    quant_setup=QuantSetup(n_bits=4),
    width_multiplier=0.25,
    block_setting=TEST_BLOCKS,
)
TINY_INPUT = (16, 16, 1)
MOBILENET = dict(model_name="mobilenet_v2", **TINY)
FROZEN_LAYER = "features_2/expand"
LOGIT_ATOL = 1e-5  # the folded BN's float rounding on logits of magnitude ~1 (measured ~1e-6)


def host_variables(model, input_shape, seed=0):
    """Random kernels (He normal), BN parameters and statistics; zero quantizer state."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x, EVAL)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        collection, name = path[0].key, path[-1].key
        if collection not in ("params", "batch_stats") or leaf.dtype != jnp.float32:
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * std).astype(np.float32)
        if name in ("var", "scale") or name.endswith("_scale"):
            return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        return (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def calibrated(model, input_shape, seed=0):
    variables = host_variables(model, input_shape, seed)
    images = np.random.default_rng(seed + 1).normal(size=(8, *input_shape)).astype(np.float32)
    calibrate = jax.jit(step_lib.make_calibrate_step(model), compiler_options=step_lib.FAST_COMPILE)
    return jax.device_get(calibrate(variables, images, jax.random.key(seed)))


def eval_variables(variables):
    """The collections an eval forward reads (range accumulators left out), so the original
    and the loaded variables share one tree structure and one compiled forward."""
    quant_stats = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
    signed = {k: v for k, v in quant_stats.items() if k.endswith("_signed")}
    return {
        **variables,
        "quant_stats": traverse_util.unflatten_dict(signed, sep="/"),
    }


forward = jax.jit(
    lambda model, variables, x: model.apply(variables, x, EVAL),
    static_argnums=0,
    compiler_options=step_lib.FAST_COMPILE,
)


def at(tree, path):
    """The subtree of a nested dict at a ``/``-joined module path."""
    for part in path.split("/"):
        tree = tree[part]
    return tree


def read_file(path):
    """The raw arrays of an export file."""
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files if k != export.MANIFEST_KEY}
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def tiny():
    """The tiny MobileNetV2, calibrated, with about a third of one layer frozen off its
    current integers (frozen_int = current +- 1)."""
    model = create_model("mobilenet_v2", **TINY)
    variables = calibrated(model, TINY_INPUT)
    layer = at(variables["params"], FROZEN_LAYER)
    w_int = np.asarray(quant.to_int(layer["kernel"], layer["weight_scale"], n_bits=4, signed=True))
    state = at(variables["oscillation"], FROZEN_LAYER)
    state["frozen"] = np.random.default_rng(2).random(w_int.shape) < 0.3
    state["frozen_int"] = np.where(w_int < 7, w_int + 1, w_int - 1).astype(np.float32)
    images = np.random.default_rng(3).normal(size=(4, *TINY_INPUT)).astype(np.float32)
    return model, variables, images


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_the_loaded_export_computes_the_fake_quantized_eval(tiny, tmp_path, suffix):
    model, variables, images = tiny
    path = tmp_path / f"tiny{suffix}"
    export.export_model(path, variables, input_shape=TINY_INPUT, **MOBILENET)
    loaded_model, loaded = export.load_export(path)

    assert loaded_model == model
    expected = forward(model, eval_variables(variables), images)
    got = forward(loaded_model, loaded, images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
    # The frozen weights matter: without their frozen values the logits move.
    unfrozen = jax.tree_util.tree_map(np.copy, eval_variables(variables))
    at(unfrozen["oscillation"], FROZEN_LAYER)["frozen"][:] = False
    assert not np.allclose(forward(model, unfrozen, images), expected, atol=1e-4)


def test_the_stored_integers_are_those_of_quantized_inference(tiny, tmp_path):
    model, variables, _ = tiny
    path = tmp_path / "tiny.safetensors"
    manifest = export.export_model(path, variables, input_shape=TINY_INPUT, **MOBILENET)
    stored = read_file(path)
    expected = collect.quantized_weights(model, variables, np.zeros((1, *TINY_INPUT)), EVAL)

    assert set(manifest["weights"]) == set(expected) and len(expected) == 11
    for layer, qw in expected.items():
        n_bits = 8 if layer in ("features_0", "classifier") else 4
        assert manifest["weights"][layer]["n_bits"] == qw.n_bits == n_bits
        if n_bits == 4:  # two per byte; the other key is absent
            packed = stored[f"params/{layer}/kernel_packed"]
            assert packed.dtype == np.uint8 and packed.shape == ((qw.int_weight.size + 1) // 2,)
            assert f"params/{layer}/kernel_int" not in stored
            w_int = fileformat.unpack_nibbles(packed, qw.int_weight.shape)
        else:
            w_int = stored[f"params/{layer}/kernel_int"]
            assert f"params/{layer}/kernel_packed" not in stored
        assert w_int.dtype == np.int8 and w_int.shape == tuple(qw.int_weight.shape)
        assert w_int.min() >= -(2 ** (n_bits - 1)) and w_int.max() <= 2 ** (n_bits - 1) - 1
        np.testing.assert_array_equal(w_int, qw.int_weight)
        assert f"params/{layer}/kernel" not in stored
        if layer == "classifier":  # no BN: the scale as the quantizer has it, and the bias
            np.testing.assert_array_equal(stored[f"params/{layer}/weight_scale"], qw.scale)
            assert "bn" not in manifest["weights"][layer] and "params/classifier/bias" in stored
            continue
        # BN folded: scale * mul per output channel, offset beta - mean * mul; no BN stored.
        assert manifest["weights"][layer]["bn"] == "scale"
        gamma, beta = (at(variables["params"], layer)["bn"][k] for k in ("scale", "bias"))
        mean, var = (at(variables["batch_stats"], layer)["bn"][k] for k in ("mean", "var"))
        mul = gamma / np.sqrt(var + 1e-5)
        np.testing.assert_allclose(stored[f"params/{layer}/weight_scale"], qw.scale * mul, 1e-6)
        offset = stored[f"params/{layer}/folded_bias"]
        np.testing.assert_allclose(offset, beta - mean * mul, rtol=1e-5, atol=1e-6)
        assert not [k for k in stored if k.startswith(f"params/{layer}/bn/")]
        assert f"batch_stats/{layer}/bn/mean" not in stored
    # Frozen entries hold their frozen integer, not the rounding of the latent weight.
    state = at(variables["oscillation"], FROZEN_LAYER)
    frozen = state["frozen"]
    w_int = fileformat.unpack_nibbles(stored[f"params/{FROZEN_LAYER}/kernel_packed"], frozen.shape)
    np.testing.assert_array_equal(w_int[frozen], state["frozen_int"][frozen])
    assert manifest["weights"][FROZEN_LAYER]["frozen"] == int(frozen.sum()) > 0
    # Every activation quantizer: 4 bits, the classifier's input 8; signedness as learnt.
    activations = manifest["activations"]
    assert len(activations) == 10 and activations["classifier/input"]["n_bits"] == 8
    for site, entry in activations.items():
        signed = stored[f"quant_stats/{site}_signed"]
        assert signed.dtype == np.bool_ and bool(signed) == entry["signed"]
    assert not [k for k in stored if k.startswith("batch_stats/")]  # every BN is folded
    assert json.loads(json.dumps(manifest)) == manifest


def expected_bytes(model, variables):
    """The bytes of the tensors of an export of ``variables``, worked out from the model's
    quant plan: 4-bit kernels half a byte per weight (rounded up), 8-bit ones one byte; a
    quantized conv with BN two float32 per output channel (folded scale and bias) instead of
    its BN's four and its scalar scale; every other parameter four bytes, each activation's
    signedness one."""
    plan = quant_plan(model, (1, 32, 32, 3))
    bits = {layer: lq.weight.n_bits for layer, (_, lq) in plan.items() if lq.weight.enabled}
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    folded = {layer for layer in bits if f"{layer}/bn/scale" in params}
    total = 0
    for key, leaf in params.items():
        layer, _, name = key.rpartition("/")
        size = np.size(leaf)
        if name == "kernel" and layer in bits:
            total += (size + 1) // 2 if bits[layer] <= 4 else size
        elif layer in folded and name == "weight_scale":
            total += 8 * np.size(params[f"{layer}/bn/scale"])
        elif layer.removesuffix("/bn") not in folded:
            total += 4 * size
    stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    total += sum(4 * np.size(v) for k, v in stats.items() if k.rsplit("/", 2)[0] not in folded)
    signed = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
    return total + sum(1 for k in signed if k.endswith("_signed"))


@pytest.mark.parametrize(("name", "ratio"), [("mobilenet_v2", 5.3), ("resnet18", 7.5)])
def test_a_4_bit_export_is_packed_to_a_fraction_of_its_float_parameters(tmp_path, name, ratio):
    # Full-size networks with 1000 classes, their variables filled on the host (the file's
    # size does not depend on their values; min-max ranges need no calibration). LSQ_paper
    # keeps the first conv and the classifier at 8 bits: MobileNetV2's 1.28 M classifier
    # weights cap its ratio near 5.9 (5.4 with its BN folded), ResNet-18's are 4 % of its weights.
    setup = QuantSetup(
        n_bits=4, weight_range_method="current_minmax", act_range_method="current_minmax"
    )
    kwargs = dict(num_classes=1000, quant_setup=setup)
    model = create_model(name, **kwargs)
    variables = host_variables(model, (32, 32, 3))
    path = tmp_path / f"{name}.safetensors"  # uncompressed; .npz is smaller still
    export.export_model(path, variables, model_name=name, input_shape=(32, 32, 3), **kwargs)
    float_bytes = sum(
        np.asarray(v, np.float32).nbytes for v in jax.tree_util.tree_leaves(variables["params"])
    )
    size, tensors = path.stat().st_size, expected_bytes(model, variables)
    print(f"{name}: float32 params {float_bytes} B, export {size} B: {float_bytes / size:.2f}x")
    # The rest is the safetensors header and the manifest: names and JSON, no weights.
    assert 0 < size - tensors < 100_000
    assert float_bytes / size >= ratio


def test_asymmetric_per_channel_quantizers_and_folded_bn_round_trip(tmp_path):
    # The `all` setup adds output, residual and pooling quantizers. (ResNet-18 round-trips
    # the same way but costs three times as long to compile; nothing here is depth-wise.)
    setup = QuantSetup(
        name="all",
        n_bits=4,
        per_channel=True,
        weight_symmetric=False,
        act_symmetric=False,
        weight_range_method="current_minmax",
        act_range_method="running_minmax",
    )
    kwargs = dict(TINY, quant_setup=setup, fold_bn=True)
    model = create_model("mobilenet_v2", **kwargs)
    variables = calibrated(model, TINY_INPUT)
    path = tmp_path / "tiny.npz"
    manifest = export.export_model(
        path, variables, model_name="mobilenet_v2", input_shape=TINY_INPUT, **kwargs
    )
    loaded_model, loaded = export.load_export(path)
    images = np.random.default_rng(4).normal(size=(2, *TINY_INPUT)).astype(np.float32)
    expected = forward(model, eval_variables(variables), images)
    # fold_bn: the kernel holds the BN multiplier and the loaded BN multiplies by exactly 1,
    # so only the offset is stored and the logits come back bit for bit.
    np.testing.assert_array_equal(forward(loaded_model, loaded, images), expected)

    stored = read_file(path)
    assert manifest["model"]["options"]["fold_bn"] and manifest["quant_setup"]["name"] == "all"
    assert manifest["weights"]["features_2/expand"]["bn"] == "kernel"
    assert stored["params/features_2/expand/weight_scale"].shape == (1, 1, 1, 32)
    assert stored["params/features_2/expand/folded_bias"].shape == (32,)
    zero_point = stored["params/features_2/expand/weight_zero_point"]
    assert zero_point.dtype == np.int32 and zero_point.shape == (1, 1, 1, 32)
    assert manifest["weights"]["features_2/expand"]["per_channel"]
    for site in ("features_3/residual", "features_4/output"):  # features_4: the head
        assert stored[f"params/{site}_zero_point"].dtype == np.int32
        assert manifest["activations"][site] == {"n_bits": 4, "signed": False, "symmetric": False}


def test_unknown_suffixes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '\.pt'; use one of \.safetensors, \.npz"):
        export.export_model(tmp_path / "tiny.pt", {}, input_shape=TINY_INPUT, **MOBILENET)
    with pytest.raises(ValueError, match="suffix '.onnx'"):
        export.load_export(tmp_path / "tiny.onnx")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        export.load_export(tmp_path / "missing.npz")


def test_files_of_another_format_version_or_without_manifest_are_refused(tmp_path):
    manifest = {"format": export.FORMAT, "format_version": 99}
    np.savez(tmp_path / "v99.npz", **{export.MANIFEST_KEY: np.asarray(json.dumps(manifest))})
    with pytest.raises(
        ValueError, match="format version 99, but this code reads version 2, 3, 4 or 5"
    ):
        export.load_export(tmp_path / "v99.npz")
    np.savez(tmp_path / "plain.npz", kernel=np.zeros(3))
    with pytest.raises(ValueError, match="is not an oscqat_jax export"):
        export.load_export(tmp_path / "plain.npz")


def test_uncalibrated_variables_are_refused(tmp_path):
    uncalibrated = host_variables(create_model("mobilenet_v2", **TINY), TINY_INPUT)
    with pytest.raises(ValueError, match="not calibrated .*features_0/weight_range"):
        export.export_model(tmp_path / "a.npz", uncalibrated, input_shape=TINY_INPUT, **MOBILENET)
    float_model = create_model("mobilenet_v2", **dict(TINY, quant_setup="float"))
    float_variables = host_variables(float_model, TINY_INPUT)
    with pytest.raises(ValueError, match="no quantizer scale params/features_0/weight_scale"):
        export.export_model(
            tmp_path / "a.npz", float_variables, input_shape=TINY_INPUT, **MOBILENET
        )
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """``{suffix: path}``: the tiny model exported once to each format (copy before editing)."""
    model, variables, _ = tiny
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for suffix in (".safetensors", ".npz"):
        paths[suffix] = folder / f"tiny{suffix}"
        export.export_model(paths[suffix], variables, input_shape=TINY_INPUT, **MOBILENET)
    return paths


def copy(exported, suffix, tmp_path):
    path = tmp_path / f"edited{suffix}"
    shutil.copyfile(exported[suffix], path)
    return path


def contents(path):
    """``(arrays, manifest)`` as stored, without any check."""
    return weight_files.read(path, metadata_key=export.MANIFEST_KEY)


def rewrite(path, arrays, manifest, *, sign=False):
    """Writes ``arrays`` and ``manifest`` (a dict, or raw text) as the file's content; with
    ``sign`` the digest is recomputed first (an edit the digest alone cannot catch)."""
    if sign:
        manifest = dict(manifest, sha256=fileformat.digest(arrays, manifest))
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    if path.suffix == ".npz":
        np.savez(path, **arrays, **{export.MANIFEST_KEY: np.asarray(text)})
    else:
        from safetensors.numpy import save_file

        save_file(dict(arrays), str(path), metadata={export.MANIFEST_KEY: text})


def refused(path, match):
    """The one sentence of load_export's refusal: it names the file and matches ``match``."""
    with pytest.raises(ValueError, match=match) as error:
        export.load_export(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_the_untouched_file_and_the_same_content_saved_again_load(tiny, exported, tmp_path):
    """Negative control of the refusals below: the digest is of the content, not the bytes."""
    model, variables, images = tiny
    expected = forward(model, eval_variables(variables), images)
    arrays, manifest = contents(exported[".safetensors"])
    assert manifest["sha256"] == fileformat.digest(arrays, manifest)
    assert len(manifest["sha256"]) == 64
    resaved = tmp_path / "resaved.npz"  # other format, uncompressed, keys in another order
    rewrite(resaved, dict(reversed(list(arrays.items()))), manifest)
    assert resaved.read_bytes() != exported[".npz"].read_bytes()
    for path in (exported[".safetensors"], resaved):
        loaded_model, loaded = export.load_export(path)
        np.testing.assert_allclose(forward(loaded_model, loaded, images), expected, atol=LOGIT_ATOL)


def test_a_flipped_byte_in_a_tensor_is_refused(exported, tmp_path):
    path = copy(exported, ".safetensors", tmp_path)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    key = f"params/{FROZEN_LAYER}/kernel_packed"
    begin, end = header[key]["data_offsets"]
    data[8 + header_len + begin + 5] ^= 1  # every byte is two integers of the 4-bit grid
    path.write_bytes(bytes(data))
    refused(path, "was changed after it was exported: the sha256")


def test_an_edited_float_in_a_compressed_npz_is_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    arrays["params/features_0/folded_bias"] = arrays["params/features_0/folded_bias"] * 1.001
    rewrite(path, arrays, manifest)
    refused(path, "changed after it was exported")


@pytest.mark.parametrize("sign", [False, True], ids=["digest-kept", "digest-recomputed"])
def test_an_edited_bit_width_is_refused(exported, tmp_path, sign):
    # 4 -> 8 bits: the stored integers still fit the wider grid, and without a check the file
    # loaded with a model whose logits differ.
    path = copy(exported, ".safetensors", tmp_path)
    arrays, manifest = contents(path)
    assert manifest["weights"][FROZEN_LAYER]["n_bits"] == 4
    manifest["weights"][FROZEN_LAYER]["n_bits"] = 8
    rewrite(path, arrays, manifest, sign=sign)
    if sign:
        refused(path, f"gives 8 bits to the kernel of {FROZEN_LAYER}, .* quantizes it at 4 bits")
    else:
        refused(path, "changed after it was exported")


def test_a_changed_shape_is_refused_at_load(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    arrays["params/classifier/bias"] = np.zeros(5, np.float32)  # the model has 4 classes
    rewrite(path, arrays, manifest, sign=True)
    refused(
        path, r"params/classifier/bias has shape \(5,\), but the model of its manifest needs \(4,\)"
    )
    # A kernel cut down and its manifest entry with it.
    arrays, manifest = contents(exported[".npz"])
    key = f"params/{FROZEN_LAYER}/kernel_packed"
    shape = tuple(manifest["weights"][FROZEN_LAYER]["kernel_shape"])
    cut = fileformat.unpack_nibbles(arrays[key], shape)[..., :-1]
    arrays[key] = fileformat.pack_nibbles(cut)
    manifest["weights"][FROZEN_LAYER]["kernel_shape"] = list(cut.shape)
    rewrite(path, arrays, manifest, sign=True)
    refused(path, re.escape(f"params/{FROZEN_LAYER}/kernel_int has shape {cut.shape}"))


def test_missing_and_extra_tensors_are_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(exported[".npz"])
    scale = arrays.pop(f"params/{FROZEN_LAYER}/weight_scale")
    rewrite(path, arrays, manifest, sign=True)
    refused(path, f"lacks the tensor params/{FROZEN_LAYER}/weight_scale of its model")
    arrays[f"params/{FROZEN_LAYER}/weight_scale"] = scale
    arrays["params/head/kernel"] = np.zeros((2, 2), np.float32)
    rewrite(path, arrays, manifest, sign=True)
    refused(path, "holds the tensor params/head/kernel, which the model of its manifest has no")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_manifest_that_is_not_json_is_refused(exported, tmp_path, suffix):
    path = copy(exported, suffix, tmp_path)
    arrays, manifest = contents(path)
    text = json.dumps(manifest)
    rewrite(path, arrays, text[: len(text) // 2])
    refused(path, "its manifest is not valid JSON")


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda m: m.pop("input_shape"), "'input_shape'"),
        (lambda m: m.pop("sha256"), "'sha256'"),
        (lambda m: m["model"].pop("options"), "'model/options'"),
        (lambda m: m["weights"][FROZEN_LAYER].pop("n_bits"), f"'weights/{FROZEN_LAYER}/n_bits'"),
    ],
)
def test_a_manifest_without_a_key_is_refused(exported, tmp_path, edit, key):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    edit(manifest)
    rewrite(path, arrays, manifest)
    refused(path, f"its manifest lacks the key {key}; export the model again")


def test_a_version_1_file_without_digest_is_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    del manifest["sha256"]
    manifest["format_version"] = 1
    rewrite(path, arrays, manifest)
    refused(path, "format version 1, but this code reads version 2, 3, 4 or 5")


# --------------------------------------------------------------------------- packing


def test_nibbles_are_packed_low_first_in_twos_complement():
    # Worked by hand: 1 -> 0x1, -1 -> 0xF, -8 -> 0x8, 7 -> 0x7; an odd count pads with 0.
    packed = fileformat.pack_nibbles(np.array([1, -1, -8], np.int8))
    np.testing.assert_array_equal(packed, np.array([0xF1, 0x08], np.uint8))
    packed = fileformat.pack_nibbles(np.array([[7, -8], [0, -3]], np.int32))
    np.testing.assert_array_equal(packed, np.array([0x87, 0xD0], np.uint8))
    np.testing.assert_array_equal(
        fileformat.unpack_nibbles(np.array([0x87, 0xD0], np.uint8), (2, 2)),
        np.array([[7, -8], [0, -3]]),
    )


@pytest.mark.parametrize("n_bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 3, 5, 1), (2, 2, 3, 4), (0,)])
def test_packing_round_trips_bit_exactly(n_bits, shape):
    int_min, int_max = quant.int_range(n_bits, True)
    rng = np.random.default_rng(n_bits)
    w_int = rng.integers(int_min, int_max + 1, size=shape).astype(np.int8)
    if w_int.size >= 2:  # both ends of the grid, negative values included
        w_int.flat[0], w_int.flat[-1] = int_min, int_max
    packed = fileformat.pack_nibbles(w_int)
    assert packed.dtype == np.uint8 and packed.shape == ((w_int.size + 1) // 2,)
    unpacked = fileformat.unpack_nibbles(packed, shape)
    assert unpacked.dtype == np.int8 and unpacked.shape == shape
    np.testing.assert_array_equal(unpacked, w_int)


def test_packing_refuses_values_off_the_4_bit_grid_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"Only integers in \[-8, 7\] pack .*\[-9, 8\]"):
        fileformat.pack_nibbles(np.array([8, -9]))
    with pytest.raises(ValueError, match="got dtype float32"):
        fileformat.pack_nibbles(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"5 packed 4-bit values need uint8 of shape \(3,\)"):
        fileformat.unpack_nibbles(np.zeros(2, np.uint8), (5,))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_refused(exported, tmp_path, suffix, keep):
    path = copy(exported, suffix, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    refused(path, "is truncated or not a")


def test_a_packed_kernel_of_another_length_is_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    key = f"params/{FROZEN_LAYER}/kernel_packed"
    arrays[key] = arrays[key][:-1]
    rewrite(path, arrays, manifest, sign=True)
    refused(path, f"{key} is uint8 of shape .*packs into uint8 of shape")
    del arrays[key]
    rewrite(path, arrays, manifest, sign=True)
    refused(path, f"lacks the tensor {key}, the packed 4-bit kernel")


def unfolded(model, variables, arrays, manifest):
    """``(arrays, manifest)`` of a version 4 file in the version 3 layout: BN parameters and
    statistics, the quantizers' own scales, no folded bias."""
    arrays, manifest = dict(arrays), json.loads(json.dumps(manifest))
    weights = collect.quantized_weights(model, variables, np.zeros((1, *TINY_INPUT)), EVAL)
    for layer, entry in manifest["weights"].items():
        if entry.pop("bn", None) is None:
            continue
        del arrays[f"params/{layer}/folded_bias"]
        arrays[f"params/{layer}/weight_scale"] = weights[layer].scale
        for collection, names in (("params", ("scale", "bias")), ("batch_stats", ("mean", "var"))):
            for name in names:
                value = at(variables[collection], layer)["bn"][name]
                arrays[f"{collection}/{layer}/bn/{name}"] = np.asarray(value, np.float32)
    return arrays, dict(manifest, format_version=3)


def test_a_version_3_file_with_bn_unfolded_still_loads(tiny, exported, tmp_path):
    model, variables, images = tiny
    arrays, manifest = unfolded(model, variables, *contents(exported[".npz"]))
    path = tmp_path / "v3.npz"
    rewrite(path, arrays, manifest, sign=True)
    loaded_model, loaded = export.load_export(path)
    expected = forward(model, eval_variables(variables), images)
    np.testing.assert_allclose(forward(loaded_model, loaded, images), expected, atol=1e-6)


def test_a_version_4_file_loads_as_version_5(tiny, exported, tmp_path):
    """Version 5 changed only the files of models quantized by rules: a package model's
    version 4 file is the same layout and loads."""
    model, variables, images = tiny
    arrays, manifest = contents(exported[".npz"])
    assert manifest["format_version"] == export.FORMAT_VERSION == 5
    path = tmp_path / "v4.npz"
    rewrite(path, arrays, dict(manifest, format_version=4), sign=True)
    loaded_model, loaded = export.load_export(path)
    expected = forward(model, eval_variables(variables), images)
    np.testing.assert_allclose(forward(loaded_model, loaded, images), expected, atol=1e-6)


def test_a_folded_layout_under_another_label_is_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    # Labelled version 3, which stores BN unfolded.
    rewrite(path, arrays, dict(manifest, format_version=3), sign=True)
    refused(path, "folds the BN of .* but a format version 3 export of its model folds none")
    # The manifest no longer says the layer is folded: its folded tensors do not fit the model.
    edited = json.loads(json.dumps(manifest))
    del edited["weights"][FROZEN_LAYER]["bn"]
    rewrite(path, arrays, edited, sign=True)
    refused(path, f"params/{FROZEN_LAYER}/folded_bias, which the model of its manifest has no")
    # Folded into the kernel, as only fold_bn models do.
    edited["weights"][FROZEN_LAYER]["bn"] = "kernel"
    rewrite(path, arrays, edited, sign=True)
    refused(
        path, f"folds the BN of {FROZEN_LAYER} into the 'kernel', but .* folds into the 'scale'"
    )


def test_a_version_2_file_with_unpacked_kernels_still_loads(tiny, exported, tmp_path):
    model, variables, images = tiny
    arrays, manifest = unfolded(model, variables, *contents(exported[".npz"]))
    for layer, entry in manifest["weights"].items():
        packed = arrays.pop(f"params/{layer}/kernel_packed", None)
        if packed is not None:
            arrays[f"params/{layer}/kernel_int"] = fileformat.unpack_nibbles(
                packed, tuple(entry["kernel_shape"])
            )
    path = tmp_path / "v2.npz"
    rewrite(path, arrays, dict(manifest, format_version=2), sign=True)
    loaded_model, loaded = export.load_export(path)
    expected = forward(model, eval_variables(variables), images)
    np.testing.assert_allclose(forward(loaded_model, loaded, images), expected, atol=1e-6)
    # The same unpacked tensors under version 3 are refused: version 3 packs 4-bit kernels.
    rewrite(path, arrays, manifest, sign=True)
    refused(path, "the 4-bit kernel of .* is stored unpacked, but format version 3 packs the")
    # And a packed 8-bit kernel (its integers would fit) is refused by versions 5, 3 and 2.
    arrays, manifest = contents(exported[".npz"])
    arrays["params/classifier/kernel_packed"] = fileformat.pack_nibbles(
        np.clip(arrays.pop("params/classifier/kernel_int"), -8, 7)
    )
    rewrite(path, arrays, manifest, sign=True)
    refused(path, "8-bit kernel of classifier is stored packed, but format version 5")
    arrays, manifest = unfolded(model, variables, arrays, manifest)
    for version in (3, 2):
        rewrite(path, arrays, dict(manifest, format_version=version), sign=True)
        refused(path, f"8-bit kernel of classifier is stored packed, but format version {version}")
