"""The native export of the package's families as plain Flax models quantized by rules
(``oscqat_jax.models``): BatchNorm folded at every quantized ConvBN site (format
version 5), the file loaded back (``load_export(path, model=qmodel)``) giving the trained
model's eval logits, per family, per-tensor and per-channel, ``fold_bn`` off and on.

Models are cut down (narrow, few blocks, 32x32 images). Quantization is weight-only (the
LSQ_paper weights, activations float: the setup of the trainer's BN study), so that the
logits carry every folded number to float rounding instead of the activation grids snapping
small errors back; one case runs the W4A4 ``LSQ_paper`` setup the size target is about. BN
parameters and running statistics are random (far from 1 and 0), a site has frozen weights.
The quick tier runs MobileNetV3-Small (BN epsilon 1e-3, SE blocks) once and the checks of the
file; the slow tier the other families and combinations.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from oscqat_jax import export, quant, weight_files
from oscqat_jax import models as families
from oscqat_jax.export import fileformat
from oscqat_jax.models import efficientnet_lite, mobilenet_v2, mobilenet_v3
from oscqat_jax.nn.setups import QuantSetup

CLASSES = 10
IMAGE = 32
SHAPE = (IMAGE, IMAGE, 3)
IMPL = "shifted"
WEIGHT_ONLY = QuantSetup("LSQ_paper", 4, overrides=(("*", None, "float"),))
W4A4 = QuantSetup("LSQ_paper", 4)
# Float rounding: the folded product is computed in another order than conv then BN.
ATOL = 1e-5

FAMILIES = {
    "mobilenet_v2": lambda: families.MobileNetV2(
        num_classes=CLASSES,
        width_multiplier=0.25,
        block_setting=mobilenet_v2.SMALL_INPUT_SETTING[:2],
        depthwise_impl=IMPL,
    ),
    "mobilenet_v3_small": lambda: families.MobileNetV3(
        variant="small",
        num_classes=CLASSES,
        width_multiplier=0.25,
        block_setting=mobilenet_v3.SMALL_SETTING[:4],
        depthwise_impl=IMPL,
    ),
    "mobilenet_v3_large": lambda: families.MobileNetV3(
        variant="large",
        num_classes=CLASSES,
        width_multiplier=0.25,
        block_setting=(*mobilenet_v3.LARGE_SETTING[:5], mobilenet_v3.LARGE_SETTING[6]),
        depthwise_impl=IMPL,
    ),
    "efficientnet_lite0": lambda: families.EfficientNetLite(
        variant="lite0",
        num_classes=CLASSES,
        width_multiplier=0.25,
        stages=efficientnet_lite.STAGES[:3],
        depthwise_impl=IMPL,
    ),
    "resnet18": lambda: families.ResNet(
        depth=18, num_classes=CLASSES, width_multiplier=0.125, stage_sizes=(1, 1, 1, 2)
    ),
    "resnet50": lambda: families.ResNet(
        depth=50, num_classes=CLASSES, width_multiplier=0.0625, stage_sizes=(1, 1, 1, 1)
    ),
}
QUICK = "mobilenet_v3_small"
# Per-tensor, BN folded into the stored scales: the most arithmetic on the way back (the scale
# split into a quantizer scale and gamma, the BN's epsilon in the variance).
QUICK_CASE = (QUICK, WEIGHT_ONLY, False, False)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def host_variables(qmodel, seed: int) -> dict:
    """Every variable of ``qmodel`` filled on the host (an abstract init: compiling the real
    one costs more than the rest of a test): He-normal kernels, random BN parameters and
    running statistics (gamma of either sign, so folded scales are too), quantizer scales 1
    until calibration sets them, zeros elsewhere."""
    abstract = jax.eval_shape(
        functools.partial(qmodel.init, train=False), jax.random.key(0), images(1, 0)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        shape = leaf.shape
        if leaf.dtype != jnp.float32:
            return np.zeros(shape, leaf.dtype)
        if key.endswith("/kernel"):
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if key.endswith("bn/scale"):
            values = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.5, shape)
        elif key.endswith(("bn/bias", "/bias")):
            values = rng.normal(0.2, 0.5, shape)
        elif key.endswith("bn/var"):
            values = rng.uniform(0.3, 3.0, shape)
        elif key.endswith("bn/mean"):
            values = rng.uniform(-1.0, 1.0, shape)
        else:
            values = np.ones(shape) if key.endswith("_scale") else np.zeros(shape)
        return np.asarray(values, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _with_frozen_weights(variables: dict) -> tuple[dict, str]:
    """Every third weight of the first depth-wise site (or the second site) frozen one step
    above its integer; ``(variables, site)``."""
    flat = traverse_util.flatten_dict(variables["oscillation"], sep="/")
    sites = [key.rpartition("/")[0] for key in sorted(flat) if key.endswith("/prev_int")]
    site = next((s for s in sites if s.endswith("depthwise")), sites[1])
    prev = flat[f"{site}/prev_int"]
    shape = np.shape(prev)
    flat[f"{site}/frozen"] = jnp.asarray((np.arange(np.prod(shape)) % 3 == 0).reshape(shape))
    flat[f"{site}/frozen_int"] = jnp.clip(prev + 1, -8, 7)
    return {**variables, "oscillation": traverse_util.unflatten_dict(flat, sep="/")}, site


@dataclasses.dataclass
class Trained:
    qmodel: families.QuantizedModel
    variables: dict
    logits: np.ndarray  # eval logits of the trained model on TEST_IMAGES
    frozen_site: str


TEST_IMAGES = images(4, seed=7)


@functools.cache
def trained(family: str, setup: QuantSetup, per_channel: bool, fold_bn: bool) -> Trained:
    """A calibrated cut-down model of ``family`` with random BN and frozen weights."""
    setup = dataclasses.replace(setup, per_channel=per_channel)
    qmodel = families.quantize(FAMILIES[family](), setup, fold_bn=fold_bn)
    variables = qmodel.calibrate(host_variables(qmodel, seed=1), [images(8, 2)], train=False)
    variables, site = _with_frozen_weights(variables)
    logits = np.asarray(_eval(qmodel)(variables, TEST_IMAGES))
    return Trained(qmodel, variables, logits, site)


def _eval(qmodel):
    return jax.jit(functools.partial(qmodel.apply, train=False))


def conv_bn_sites(t: Trained) -> set[str]:
    return {s for s, p in t.qmodel.plan(TEST_IMAGES[:1]).items() if p.kind == "conv_bn"}


def check_round_trip(t: Trained, path, manifest: dict, fold_bn: bool) -> float:
    """The file at ``path`` (``manifest``) of ``t`` folds every ConvBN site and stores no BN
    or float kernel, and loads back to ``t``'s eval logits; the largest difference."""
    folded = {layer for layer, entry in manifest["weights"].items() if entry.get("bn")}
    assert folded == conv_bn_sites(t) and folded
    into = "kernel" if fold_bn else "scale"
    assert {manifest["weights"][layer]["bn"] for layer in folded} == {into}
    arrays, _ = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
    assert not any("/bn/" in key for key in arrays)  # every BN of these models is a ConvBN's
    assert not any(key.endswith("/conv/kernel") for key in arrays)  # no float kernels
    loaded_model, loaded = export.load_export(path, model=t.qmodel)
    assert loaded_model is t.qmodel
    logits = np.asarray(_eval(t.qmodel)(loaded, TEST_IMAGES))
    assert np.abs(t.logits).max() > 1.0  # the logits are not trivially equal
    np.testing.assert_allclose(logits, t.logits, rtol=0, atol=ATOL)
    return float(np.abs(logits - t.logits).max())


def exported(family, setup, per_channel, fold_bn, path) -> tuple[Trained, dict]:
    t = trained(family, setup, per_channel, fold_bn)
    return t, export.export_model(path, t.variables, model=t.qmodel, input_shape=SHAPE, train=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("folded") / "model.safetensors"
    t, manifest = exported(*QUICK_CASE, path)
    return t, path, manifest


def test_quick_family_round_trip_gives_the_eval_logits(quick):
    t, path, manifest = quick
    check_round_trip(t, path, manifest, fold_bn=QUICK_CASE[-1])


CORNERS = ((False, False), (True, True), (False, True), (True, False))  # (per-channel, fold)
MATRIX = [
    (family, per_channel, fold_bn)
    for family in sorted(FAMILIES)
    for per_channel, fold_bn in CORNERS
    if (family, WEIGHT_ONLY, per_channel, fold_bn) != QUICK_CASE  # the quick tier's
]


@pytest.mark.slow
@pytest.mark.parametrize("family,per_channel,fold_bn", MATRIX)
def test_every_family_round_trips(tmp_path, family, per_channel, fold_bn):
    path = tmp_path / "model.npz"
    t, manifest = exported(family, WEIGHT_ONLY, per_channel, fold_bn, path)
    check_round_trip(t, path, manifest, fold_bn)


@pytest.mark.slow
def test_w4a4_round_trip_gives_the_eval_logits(tmp_path):
    path = tmp_path / "model.npz"
    t, manifest = exported("mobilenet_v2", W4A4, True, False, path)
    assert manifest["activations"]  # activations quantized too
    check_round_trip(t, path, manifest, fold_bn=False)


# ------------------------------------------------------------------ what the file holds


def contents(path):
    return weight_files.read(path, metadata_key=export.MANIFEST_KEY)


def signed(path, arrays, manifest):
    """Writes ``arrays`` and ``manifest`` with a recomputed digest (an edit it cannot catch)."""
    manifest = dict(manifest, sha256=fileformat.digest(arrays, manifest))
    weight_files.write(path, arrays, metadata_key=export.MANIFEST_KEY, metadata=manifest)


def test_the_file_holds_the_folded_scales_biases_and_trained_integers(quick):
    """Per site: weight scale times gamma / sqrt(var + eps) with the model's epsilon (1e-3
    here), beta - mean * that, the integers of the trained kernel with the frozen ones in."""
    t, path, manifest = quick
    assert manifest["format_version"] == export.FORMAT_VERSION == 5
    arrays, _ = contents(path)
    params = traverse_util.flatten_dict(t.variables["params"], sep="/")
    stats = traverse_util.flatten_dict(t.variables["batch_stats"], sep="/")
    state = traverse_util.flatten_dict(t.variables["oscillation"], sep="/")
    epsilon = t.qmodel.model.bn_epsilon
    assert epsilon == 1e-3
    sites = conv_bn_sites(t)
    assert {layer for layer, e in manifest["weights"].items() if "bn" in e} == sites
    for site in sites:
        entry = manifest["weights"][site]
        assert entry["bn"] == "scale"
        mul = np.asarray(params[f"{site}/bn/scale"], np.float64) / np.sqrt(
            np.asarray(stats[f"{site}/bn/var"], np.float64) + epsilon
        )
        scale = np.asarray(params[f"{site}/weight_scale"], np.float64)
        np.testing.assert_allclose(arrays[f"params/{site}/weight_scale"], scale * mul, rtol=1e-6)
        bias = params[f"{site}/bn/bias"] - np.asarray(stats[f"{site}/bn/mean"]) * mul
        np.testing.assert_allclose(arrays[f"params/{site}/folded_bias"], bias, atol=1e-6)
        shape = tuple(entry["kernel_shape"])
        key = f"params/{site}/kernel_packed"
        ints = (
            fileformat.unpack_nibbles(arrays[key], shape)
            if key in arrays
            else (arrays[f"params/{site}/kernel_int"])
        )
        p = quant.quant_params(scale, None, x_shape=shape, n_bits=entry["n_bits"], signed=True)
        want = np.asarray(quant.to_int_with(params[f"{site}/conv/kernel"], p))
        if site == t.frozen_site:
            frozen = np.asarray(state[f"{site}/frozen"])
            want = np.where(frozen, state[f"{site}/frozen_int"], want)
            assert entry["frozen"] == frozen.sum() > 0
        np.testing.assert_array_equal(ints, want)
    assert not any("/bn/" in key or key.endswith("/conv/kernel") for key in arrays)


def test_a_changed_integer_changes_the_logits(quick, tmp_path):
    t, path, _ = quick
    arrays, manifest = contents(path)
    key = f"params/{t.frozen_site}/kernel_packed"
    arrays[key] = arrays[key].copy()
    arrays[key][0] ^= 0x08  # the sign bit of the first 4-bit integer: it moves by 8
    edited = tmp_path / "edited.safetensors"
    signed(edited, arrays, manifest)
    _, loaded = export.load_export(edited, model=t.qmodel)
    logits = np.asarray(_eval(t.qmodel)(loaded, TEST_IMAGES))
    assert np.abs(logits - t.logits).max() > 100 * ATOL


def test_an_older_version_with_conv_bn_sites_is_refused(quick, tmp_path):
    t, path, _ = quick
    arrays, manifest = contents(path)
    older = tmp_path / "v4.safetensors"
    signed(older, arrays, dict(manifest, format_version=4))
    with pytest.raises(ValueError, match="format version 4, which stores the ConvBN"):
        export.load_export(older, model=t.qmodel)
    # Version 3 was written only for the former ctx models.
    signed(older, arrays, dict(manifest, format_version=3))
    with pytest.raises(ValueError, match="format version 3, but this code reads version 4 or 5"):
        export.load_export(older, model=t.qmodel)


def test_a_damaged_file_is_refused(quick, tmp_path):
    t, path, _ = quick
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # a byte of the last tensor
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="was changed after it was exported") as error:
        export.load_export(damaged, model=t.qmodel)
    assert "\n" not in str(error.value)
    damaged.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=str(damaged)):
        export.load_export(damaged, model=t.qmodel)


def test_a_file_folded_otherwise_than_the_model_is_refused(quick, tmp_path):
    t, path, _ = quick
    arrays, manifest = contents(path)
    manifest = json.loads(json.dumps(manifest))
    site = sorted(conv_bn_sites(t))[0]
    manifest["weights"][site]["bn"] = "kernel"
    edited = tmp_path / "edited.safetensors"
    signed(edited, arrays, manifest)
    with pytest.raises(ValueError, match=f"folds the BN of {site} into the 'kernel', but the"):
        export.load_export(edited, model=t.qmodel)
    del manifest["weights"][site]["bn"]
    signed(edited, arrays, manifest)
    with pytest.raises(ValueError, match=f"does not fold the BN of {site}, but the model"):
        export.load_export(edited, model=t.qmodel)


def test_a_training_call_is_refused(quick, tmp_path):
    t, _, _ = quick
    with pytest.raises(ValueError, match="normalises with batch statistics .* train=False"):
        export.export_model(
            tmp_path / "model.npz", t.variables, model=t.qmodel, input_shape=SHAPE, train=True
        )
