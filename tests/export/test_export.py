"""Tests of oscqat_jax.export on the package's MobileNetV2 (a plain model quantized by
rules, ``oscqat_jax.models``): round trips through both formats, the stored integers
and the folded BN, the file size of a real network, and the errors. The folded layout of
every family is tests/export/test_folded_export.py's, a user's model's
tests/export/test_any_model_export.py's.

BatchNorm is folded at each quantized ConvBN site into its per-channel scale and a bias, so a
loaded model computes ``conv * (s * mul) + offset`` where the original computed ``(conv * s -
mean) * mul + beta``: the same integers, the logits to float rounding (``LOGIT_ATOL``).

Variables are filled on the host from ``jax.eval_shape`` (a jitted init compiles one random
kernel per parameter), then calibrated by the model's jitted calibration.
"""

import functools
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
from oscqat_jax import models as families
from oscqat_jax.export import fileformat
from oscqat_jax.nn import collect
from oscqat_jax.nn.setups import QuantSetup

TINY_INPUT = (16, 16, 1)
W4A4 = QuantSetup(n_bits=4)  # LSQ_paper: the first conv and the classifier at 8 bits
FROZEN_LAYER = "features_2/expand"
LOGIT_ATOL = 1e-5  # the folded BN's float rounding on logits of magnitude ~1 (measured ~1e-6)


def tiny_model(setup=W4A4, fold_bn=False) -> families.QuantizedModel:
    """A MobileNetV2 with three inverted-residual blocks, 4 classes, quantized by ``setup``."""
    model = families.MobileNetV2(num_classes=4, width_multiplier=0.25, block_setting=TEST_BLOCKS)
    return families.quantize(model, setup, fold_bn=fold_bn)


def host_variables(qmodel, input_shape, seed=0):
    """Random kernels (He normal), BN parameters and statistics; zero quantizer state."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    abstract = jax.eval_shape(functools.partial(qmodel.init, train=False), jax.random.key(0), x)
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


def calibrated(qmodel, input_shape, seed=0):
    variables = host_variables(qmodel, input_shape, seed)
    images = np.random.default_rng(seed + 1).normal(size=(8, *input_shape)).astype(np.float32)
    return jax.device_get(qmodel.calibrate(variables, [images], train=False))


@functools.cache
def _eval(qmodel):
    return jax.jit(functools.partial(qmodel.apply, train=False))


def forward(qmodel, variables, images):
    return np.asarray(_eval(qmodel)(variables, images))


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


TINY = tiny_model()


def export_tiny(path, qmodel, variables, input_shape=TINY_INPUT):
    return export.export_model(path, variables, model=qmodel, input_shape=input_shape, train=False)


@pytest.fixture(scope="module")
def tiny():
    """The tiny MobileNetV2, calibrated, with about a third of one layer frozen off its
    current integers (frozen_int = current +- 1)."""
    qmodel = TINY
    variables = calibrated(qmodel, TINY_INPUT)
    layer = at(variables["params"], FROZEN_LAYER)
    w_int = np.asarray(
        quant.to_int(layer["conv"]["kernel"], layer["weight_scale"], n_bits=4, signed=True)
    )
    state = at(variables["oscillation"], FROZEN_LAYER)
    state["frozen"] = np.random.default_rng(2).random(w_int.shape) < 0.3
    state["frozen_int"] = np.where(w_int < 7, w_int + 1, w_int - 1).astype(np.float32)
    images = np.random.default_rng(3).normal(size=(4, *TINY_INPUT)).astype(np.float32)
    return qmodel, variables, images


def test_the_loaded_export_computes_the_fake_quantized_eval(tiny, tmp_path):
    qmodel, variables, images = tiny
    path = tmp_path / "tiny.npz"
    export_tiny(path, qmodel, variables)
    loaded_model, loaded = export.load_export(path, model=qmodel)

    assert loaded_model is qmodel
    expected = forward(qmodel, variables, images)
    got = forward(qmodel, loaded, images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
    # The frozen weights matter: without their frozen values the logits move.
    unfrozen = jax.tree_util.tree_map(np.copy, variables)
    at(unfrozen["oscillation"], FROZEN_LAYER)["frozen"][:] = False
    assert not np.allclose(forward(qmodel, unfrozen, images), expected, atol=1e-4)


def test_the_stored_integers_are_those_of_quantized_inference(tiny, tmp_path):
    qmodel, variables, _ = tiny
    path = tmp_path / "tiny.safetensors"
    manifest = export_tiny(path, qmodel, variables)
    stored = read_file(path)
    expected = collect.quantized_weights(
        qmodel, variables, np.zeros((1, *TINY_INPUT), np.float32), train=False
    )

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
        assert not [k for k in stored if k.endswith((f"{layer}/kernel", f"{layer}/conv/kernel"))]
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


def expected_bytes(qmodel, variables, image):
    """The bytes of the tensors of an export of ``variables``, worked out from the model's
    plan: 4-bit kernels half a byte per weight (rounded up), 8-bit ones one byte; a quantized
    ConvBN site two float32 per output channel (folded scale and bias) instead of its BN's
    four, its conv's bias and its scalar scale; every other parameter four bytes, each
    activation's signedness one."""
    plan = qmodel.plan(image, train=False)
    bits = {site: p.weight.n_bits for site, p in plan.items() if p.weight.enabled}
    folded = {site for site in bits if plan[site].kind == "conv_bn"}
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    total = 0
    for key, leaf in params.items():
        layer, _, name = key.rpartition("/")
        site = layer.removesuffix("/conv").removesuffix("/bn")
        size = np.size(leaf)
        if name == "kernel" and site in bits:
            total += (size + 1) // 2 if bits[site] <= 4 else size
        elif site in folded and name == "weight_scale":
            total += 8 * np.shape(params[f"{site}/conv/kernel"])[-1]
        elif not (site in folded and layer != site):  # a folded site's BN and conv bias
            total += 4 * size
    stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    total += sum(4 * np.size(v) for k, v in stats.items() if k.rsplit("/", 2)[0] not in folded)
    signed = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
    return total + sum(1 for k in signed if k.endswith("_signed"))


@pytest.mark.parametrize(
    ("name", "ratio"),
    [pytest.param("mobilenet_v2", 5.3, marks=pytest.mark.slow), ("resnet18", 7.5)],
)
def test_a_4_bit_export_is_packed_to_a_fraction_of_its_float_parameters(tmp_path, name, ratio):
    # Full-size networks with 1000 classes, their variables filled on the host (the file's
    # size does not depend on their values; min-max ranges need no calibration). LSQ_paper
    # keeps the first conv and the classifier at 8 bits: MobileNetV2's 1.28 M classifier
    # weights cap its ratio near 5.9 (5.4 with its BN folded), ResNet-18's are 4 % of its weights.
    setup = QuantSetup(
        n_bits=4, weight_range_method="current_minmax", act_range_method="current_minmax"
    )
    qmodel = families.quantize(families.create_model(name, num_classes=1000), setup)
    image = np.zeros((1, 32, 32, 3), np.float32)
    variables = host_variables(qmodel, image.shape[1:])
    # Marked calibrated as a loaded export is (min-max ranges keep no accumulator).
    stats = traverse_util.flatten_dict(variables["quant_stats"], sep="/")
    for site, p in qmodel.plan(image, train=False).items():
        for q in ("weight", "input", "output"):
            if getattr(p, q).enabled:
                stats[f"{site}/{q}_range/num_batches"] = np.int32(1)
    variables["quant_stats"] = traverse_util.unflatten_dict(stats, sep="/")
    path = tmp_path / f"{name}.safetensors"  # uncompressed; .npz is smaller still
    export.export_model(path, variables, model=qmodel, input_shape=image.shape[1:], train=False)
    float_bytes = sum(
        np.asarray(v, np.float32).nbytes for v in jax.tree_util.tree_leaves(variables["params"])
    )
    size, tensors = path.stat().st_size, expected_bytes(qmodel, variables, image)
    print(f"{name}: float32 params {float_bytes} B, export {size} B: {float_bytes / size:.2f}x")
    # The rest is the safetensors header and the manifest: names and JSON, no weights.
    assert 0 < size - tensors < 100_000
    assert float_bytes / size >= ratio


@pytest.mark.slow
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
    qmodel = tiny_model(setup, fold_bn=True)
    variables = calibrated(qmodel, TINY_INPUT)
    path = tmp_path / "tiny.npz"
    manifest = export_tiny(path, qmodel, variables)
    _, loaded = export.load_export(path, model=qmodel)
    images = np.random.default_rng(4).normal(size=(2, *TINY_INPUT)).astype(np.float32)
    expected = forward(qmodel, variables, images)
    # fold_bn: the kernel holds the BN multiplier and the loaded BN multiplies by exactly 1,
    # so only the offset is stored and the logits come back to float rounding.
    np.testing.assert_allclose(forward(qmodel, loaded, images), expected, rtol=0, atol=LOGIT_ATOL)

    stored = read_file(path)
    assert manifest["rules"][0]["fold_bn"]
    assert manifest["weights"]["features_2/expand"]["bn"] == "kernel"
    assert stored["params/features_2/expand/weight_scale"].shape == (1, 1, 1, 32)
    assert stored["params/features_2/expand/folded_bias"].shape == (32,)
    zero_point = stored["params/features_2/expand/weight_zero_point"]
    assert zero_point.dtype == np.int32 and zero_point.shape == (1, 1, 1, 32)
    assert manifest["weights"]["features_2/expand"]["per_channel"]
    for site in ("features_3/residual/output", "features_4_out/output"):  # the head's output
        assert stored[f"params/{site}_zero_point"].dtype == np.int32
        assert manifest["activations"][site] == {"n_bits": 4, "signed": False, "symmetric": False}


def test_unknown_suffixes_are_refused(tiny, tmp_path):
    qmodel, variables, _ = tiny
    with pytest.raises(ValueError, match=r"suffix '\.pt'; use one of \.safetensors, \.npz"):
        export_tiny(tmp_path / "tiny.pt", qmodel, variables)
    with pytest.raises(ValueError, match="suffix '.onnx'"):
        export.load_export(tmp_path / "tiny.onnx", model=qmodel)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        export.load_export(tmp_path / "missing.npz")


def test_files_of_another_format_version_or_without_manifest_are_refused(tmp_path):
    manifest = {"format": export.FORMAT, "format_version": 99}
    np.savez(tmp_path / "v99.npz", **{export.MANIFEST_KEY: np.asarray(json.dumps(manifest))})
    with pytest.raises(ValueError, match="format version 99, but this code reads version 4 or 5"):
        export.load_export(tmp_path / "v99.npz")
    np.savez(tmp_path / "families.npz", kernel=np.zeros(3))
    with pytest.raises(ValueError, match="is not an oscqat_jax export"):
        export.load_export(tmp_path / "families.npz")


def test_a_call_without_a_model_is_refused(tiny, tmp_path):
    # The former keyword arguments of the package's ctx models name no model any more.
    _, variables, _ = tiny
    with pytest.raises(ValueError, match="export_model needs model=<a QuantizedModel>"):
        export.export_model(
            tmp_path / "a.npz", variables, model_name="mobilenet_v2", input_shape=TINY_INPUT
        )
    assert not list(tmp_path.iterdir())


def test_uncalibrated_variables_are_refused(tmp_path):
    qmodel = tiny_model()
    uncalibrated = host_variables(qmodel, TINY_INPUT)
    with pytest.raises(ValueError, match="not calibrated .*features_0/weight_range"):
        export_tiny(tmp_path / "a.npz", qmodel, uncalibrated)
    float_variables = host_variables(families.quantize(qmodel.model, "float"), TINY_INPUT)
    with pytest.raises(ValueError, match="no quantizer scale params/features_0/weight_scale"):
        export_tiny(tmp_path / "a.npz", qmodel, float_variables)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """``{suffix: path}``: the tiny model exported once to each format (copy before editing)."""
    qmodel, variables, _ = tiny
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for suffix in (".safetensors", ".npz"):
        paths[suffix] = folder / f"tiny{suffix}"
        export_tiny(paths[suffix], qmodel, variables)
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
        export.load_export(path, model=TINY)
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_the_untouched_file_and_the_same_content_saved_again_load(tiny, exported, tmp_path):
    """Negative control of the refusals below: the digest is of the content, not the bytes."""
    qmodel, variables, images = tiny
    expected = forward(qmodel, variables, images)
    arrays, manifest = contents(exported[".safetensors"])
    assert manifest["sha256"] == fileformat.digest(arrays, manifest)
    assert len(manifest["sha256"]) == 64
    resaved = tmp_path / "resaved.npz"  # other format, uncompressed, keys in another order
    rewrite(resaved, dict(reversed(list(arrays.items()))), manifest)
    assert resaved.read_bytes() != exported[".npz"].read_bytes()
    for path in (exported[".safetensors"], resaved):
        _, loaded = export.load_export(path, model=qmodel)
        np.testing.assert_allclose(forward(qmodel, loaded, images), expected, atol=LOGIT_ATOL)


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
    refused(path, "format version 1, but this code reads version 4 or 5")


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


# --------------------------------------------------------------------------- older versions


@pytest.mark.parametrize("version", [2, 3])
def test_versions_written_only_for_the_former_ctx_models_are_refused(exported, tmp_path, version):
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    rewrite(path, arrays, dict(manifest, format_version=version), sign=True)
    refused(path, f"format version {version}, but this code reads version 4 or 5; export")


@pytest.mark.parametrize("version", [4, 5])
def test_a_file_of_the_former_ctx_models_is_refused_naming_its_version(exported, tmp_path, version):
    # The ctx models' manifest: the registry name and create_model's options, no kind.
    path = copy(exported, ".npz", tmp_path)
    arrays, manifest = contents(path)
    model = {"name": "mobilenet_v2", "num_classes": 4, "options": {"width_multiplier": 0.25}}
    rewrite(path, arrays, dict(manifest, format_version=version, model=model), sign=True)
    message = refused(
        path, f"format version {version} export of mobilenet_v2 as the package's former ctx"
    )
    assert "model=qmodel" in message
    with pytest.raises(ValueError, match="former ctx models"):  # with no model given either
        export.load_export(path)


def test_kernels_stored_against_the_packing_are_refused(exported, tmp_path):
    path = copy(exported, ".npz", tmp_path)
    # A 4-bit kernel stored unpacked.
    arrays, manifest = contents(exported[".npz"])
    shape = tuple(manifest["weights"][FROZEN_LAYER]["kernel_shape"])
    packed = arrays.pop(f"params/{FROZEN_LAYER}/kernel_packed")
    arrays[f"params/{FROZEN_LAYER}/kernel_int"] = fileformat.unpack_nibbles(packed, shape)
    rewrite(path, arrays, manifest, sign=True)
    refused(path, f"the 4-bit kernel of {FROZEN_LAYER} is stored unpacked, but format version 5")
    # A packed 8-bit kernel (its integers would fit).
    arrays, manifest = contents(exported[".npz"])
    arrays["params/classifier/kernel_packed"] = fileformat.pack_nibbles(
        np.clip(arrays.pop("params/classifier/kernel_int"), -8, 7)
    )
    rewrite(path, arrays, manifest, sign=True)
    refused(path, "8-bit kernel of classifier is stored packed, but format version 5")
