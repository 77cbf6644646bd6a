"""The native integer export (oscqat_jax.export) of a user's Linen model quantized by rules:
written with ``export_model(..., model=qmodel)``, loaded back with
``load_export(path, model=qmodel)``, the eval logits must be the original's, frozen weights at
their frozen integers; the file must be checked against the model it is loaded into."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from user_models import SHAPE, LinenNet, images, linen_quantized

from oscqat_jax import export, quant, weight_files
from oscqat_jax.export import fileformat
from oscqat_jax.nn.intercept import quantize_model
from oscqat_jax.nn.rules import paper_rules

CHANNELS = 32
TEST_IMAGES = np.asarray(images(32, seed=5))
FROZEN = "mixer"


def _with_frozen_weights(variables: dict) -> dict:
    """``variables`` with every third weight of ``mixer`` frozen one step above its integer."""
    state = dict(variables["oscillation"][FROZEN])
    shape = np.shape(state["prev_int"])
    frozen = (np.arange(np.prod(shape)) % 3 == 0).reshape(shape)
    state["frozen"] = jnp.asarray(frozen)
    state["frozen_int"] = jnp.clip(state["prev_int"] + 1, -8, 7)
    return {**variables, "oscillation": {**variables["oscillation"], FROZEN: state}}


@pytest.fixture(scope="module")
def trained():
    qmodel, variables = linen_quantized(LinenNet(channels=CHANNELS))
    return qmodel, _with_frozen_weights(variables)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_gives_the_eval_logits(trained, tmp_path, suffix):
    qmodel, variables = trained
    path = tmp_path / f"model{suffix}"
    manifest = export.export_model(path, variables, model=qmodel, input_shape=SHAPE, train=False)
    assert manifest["model"]["kind"] == "rules" and manifest["model"]["name"] == "LinenNet"
    assert manifest["weights"][FROZEN]["frozen"] == int(np.ceil(3 * 3 * CHANNELS / 3))
    loaded_model, loaded = export.load_export(path, model=qmodel)
    assert loaded_model is qmodel
    want = np.asarray(qmodel.apply(variables, TEST_IMAGES, train=False))
    got = np.asarray(qmodel.apply(loaded, TEST_IMAGES, train=False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    float_bytes = 4 * sum(
        int(np.size(leaf))
        for leaf in jax.tree_util.tree_leaves(qmodel.model.init(jax.random.key(0), images(1)))
    )
    assert os.path.getsize(path) < float_bytes


def test_the_file_holds_the_frozen_integers_packed(trained, tmp_path):
    qmodel, variables = trained
    path = tmp_path / "model.safetensors"
    manifest = export.export_model(path, variables, model=qmodel, input_shape=SHAPE, train=False)
    arrays, _ = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
    ints = fileformat.unpack_nibbles(arrays[f"params/{FROZEN}/kernel_packed"], (3, 3, 1, CHANNELS))
    params, state = variables["params"][FROZEN], variables["oscillation"][FROZEN]
    p = quant.quant_params(
        params["weight_scale"], None, x_shape=(3, 3, 1, CHANNELS), n_bits=4, signed=True
    )
    rounded = np.asarray(quant.to_int_with(params["kernel"], p))
    want = np.where(state["frozen"], state["frozen_int"], rounded)
    np.testing.assert_array_equal(ints, want)
    assert np.any(ints != rounded)  # the frozen values are not the rounded ones
    assert arrays[f"params/{FROZEN}/weight_scale"].dtype == np.float32
    # The model's own BatchNorm layers are no ConvBN sites: stored unfolded.
    assert "batch_stats/mixer_bn/var" in arrays and "params/mixer_bn/scale" in arrays
    assert not any("bn" in entry for entry in manifest["weights"].values())


def test_the_file_is_checked_against_the_model(trained, tmp_path):
    qmodel, variables = trained
    path = tmp_path / "model.npz"
    export.export_model(path, variables, model=qmodel, input_shape=SHAPE, train=False)
    with pytest.raises(ValueError, match="quantized by rules; pass that QuantizedModel"):
        export.load_export(path)
    other = quantize_model(
        LinenNet(channels=CHANNELS),
        paper_rules("LSQ_paper", n_bits=3, first_conv="stem", classifier="head"),
    )
    with pytest.raises(ValueError, match="other quantization rules"):
        export.load_export(path, model=other)
    wider = quantize_model(LinenNet(channels=2 * CHANNELS), qmodel.rules)
    with pytest.raises(ValueError, match="has shape .* but the model of its manifest needs"):
        export.load_export(path, model=wider)
    with pytest.raises(ValueError, match="takes model=<a QuantizedModel"):
        export.load_export(path, model=LinenNet())


def test_a_changed_or_older_file_is_refused(trained, tmp_path):
    qmodel, variables = trained
    path = tmp_path / "model.safetensors"
    export.export_model(path, variables, model=qmodel, input_shape=SHAPE, train=False)
    arrays, manifest = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
    edited = tmp_path / "edited.safetensors"
    arrays["batch_stats/mixer_bn/mean"] = arrays["batch_stats/mixer_bn/mean"] + 1
    weight_files.write(edited, arrays, metadata_key=export.MANIFEST_KEY, metadata=manifest)
    with pytest.raises(ValueError, match="was changed after it was exported"):
        export.load_export(edited, model=qmodel)
    # Version 4 left ConvBN sites unfolded; a model without them has the same layout.
    v4 = tmp_path / "v4.safetensors"
    arrays, manifest = weight_files.read(path, metadata_key=export.MANIFEST_KEY)
    manifest = dict(manifest, format_version=4)
    manifest[fileformat.DIGEST_KEY] = fileformat.digest(arrays, manifest)
    weight_files.write(v4, arrays, metadata_key=export.MANIFEST_KEY, metadata=manifest)
    _, loaded = export.load_export(v4, model=qmodel)
    want = np.asarray(qmodel.apply(variables, TEST_IMAGES, train=False))
    np.testing.assert_array_equal(np.asarray(qmodel.apply(loaded, TEST_IMAGES, train=False)), want)
    older = tmp_path / "older.safetensors"
    manifest = json.loads(json.dumps(manifest))
    manifest["format_version"] = 1
    weight_files.write(older, arrays, metadata_key=export.MANIFEST_KEY, metadata=manifest)
    with pytest.raises(ValueError, match="format version 1, but this code reads"):
        export.load_export(older, model=qmodel)


def test_uncalibrated_variables_and_missing_arguments_are_refused(tmp_path):
    qmodel = quantize_model(
        LinenNet(), paper_rules("LSQ_paper", 4, first_conv="stem", classifier="head")
    )
    variables = jax.jit(qmodel.init)(jax.random.key(0), images(1))
    path = tmp_path / "model.npz"
    with pytest.raises(ValueError, match="not calibrated"):
        export.export_model(path, variables, model=qmodel, input_shape=SHAPE)
    assert not path.exists()
    with pytest.raises(ValueError, match=r"needs model=<a QuantizedModel> \(oscqat_jax.nn"):
        export.export_model(path, variables, input_shape=SHAPE)
