"""The native integer export of an NNX model quantized by rules: ``export_model(path,
model=model)`` and ``load_export(path, model=fresh)`` into a model quantized by the same rules
give the same eval logits (frozen weights at their frozen integers, BN statistics, activation
signedness), the loaded model counts as calibrated, and the file is checked against the model
it is loaded into."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from user_models import RULES, SHAPE, NNXNet, images, nnx_quantized

from oscqat_jax import export
from oscqat_jax.nn import calibrate, nnx_quant, quantize_model, set_mode
from oscqat_jax.nn.rules import QuantRule

TEST_IMAGES = images(16, seed=5)
CHANNELS = 32  # enough weights that the file's size is about them, not its manifest


def _eval(model):
    set_mode(model, "eval")
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, TEST_IMAGES))


@pytest.fixture(scope="module")
def trained():
    """A calibrated NNX model with non-trivial BN statistics and frozen weights."""
    model = nnx_quantized(channels=CHANNELS)
    # Non-trivial running statistics, as after training.
    model.train()
    set_mode(model, "float")
    nnx.jit(lambda m, x: m(x))(model, images(16, seed=3))
    dw = model.blocks[0]
    frozen = (np.arange(dw.kernel[...].size) % 3 == 0).reshape(dw.kernel[...].shape)
    dw.frozen[...] = jnp.asarray(frozen)
    dw.frozen_int[...] = jnp.clip(dw.prev_int[...] + 1, -8, 7)
    return model


def _fresh(rules=RULES, seed=7):
    return quantize_model(NNXNet(nnx.Rngs(seed), CHANNELS), rules)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_gives_the_eval_logits(trained, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    manifest = export.export_model(path, model=trained, input_shape=SHAPE)
    assert manifest["model"]["kind"] == "nnx" and manifest["model"]["name"] == "NNXNet"
    assert manifest["weights"]["blocks/0"]["frozen"] == int(
        np.ceil(trained.blocks[0].kernel.size / 3)
    )
    want = _eval(trained)
    fresh = _fresh()  # other weights, uncalibrated
    assert np.max(np.abs(_eval_float(fresh) - want)) > 1e-2
    loaded, state = export.load_export(path, model=fresh)
    assert loaded is fresh and state is not None
    np.testing.assert_allclose(_eval(fresh), want, rtol=0, atol=1e-6)
    # The frozen integers are in the kernel now; the loaded state freezes nothing more.
    assert not np.any(fresh.blocks[0].frozen[...])
    float_bytes = 4 * sum(
        int(np.size(leaf))
        for leaf in jax.tree_util.tree_leaves(nnx.state(NNXNet(nnx.Rngs(0), CHANNELS)))
    )
    assert os.path.getsize(path) < float_bytes
    # Loaded counts as calibrated: train mode is allowed, and a new calibration starts the
    # range estimators afresh, as from empty ones (not continued from zeroed accumulators).
    set_mode(fresh, "train")
    empty = _fresh()
    export.load_export(path, model=empty)
    for module in nnx_quant.quantized_modules(empty).values():
        for name in ("weight_range", "input_range", "output_range"):
            if hasattr(module, name):
                getattr(module, name).set_value(
                    {**getattr(module, name).get_value(), "num_batches": jnp.int32(0)}
                )
    for model in (fresh, empty):
        calibrate(model, [images(16, seed=1)])
    for layer in ("blocks/0", "head"):
        got = nnx_quant.quantized_modules(fresh)[layer].input_scale[...]
        want = nnx_quant.quantized_modules(empty)[layer].input_scale[...]
        np.testing.assert_array_equal(got, want)


def _eval_float(model):
    set_mode(model, "float")
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, TEST_IMAGES))


def test_a_changed_integer_changes_the_logits(trained, tmp_path):
    """Negative control: the loaded logits come from the stored integers."""
    path = tmp_path / "model.npz"
    export.export_model(path, model=trained, input_shape=SHAPE)
    want = _eval(trained)
    records = nnx_quant.quantized_weight_records(trained, jnp.zeros((1, *SHAPE)))
    assert set(records) == {"stem", "blocks/0", "blocks/2", "head"}
    fresh = _fresh()
    export.load_export(path, model=fresh)
    fresh.blocks[2].kernel[...] = fresh.blocks[2].kernel[...] * 1.7
    assert np.max(np.abs(_eval(fresh) - want)) > 1e-3


def test_the_file_is_checked_against_the_model(trained, tmp_path):
    path = tmp_path / "model.npz"
    export.export_model(path, model=trained, input_shape=SHAPE)
    with pytest.raises(ValueError, match="other quantization rules"):
        export.load_export(path, model=_fresh((QuantRule(".*", weight_bits=3, act_bits=3),)))
    with pytest.raises(ValueError, match="holds the NNX model NNXNet.*pass that model"):
        export.load_export(path)
    with pytest.raises(ValueError, match="export_model takes model=<an NNX model quantized"):
        export.export_model(
            tmp_path / "x.npz", model=NNXNet(nnx.Rngs(0), CHANNELS), input_shape=SHAPE
        )
    with pytest.raises(ValueError, match="has not been calibrated"):
        export.export_model(tmp_path / "x.npz", model=_fresh(), input_shape=SHAPE)
    assert not (tmp_path / "x.npz").exists()
    with pytest.raises(ValueError, match="takes no variables"):
        export.export_model(tmp_path / "x.npz", {}, model=trained, input_shape=SHAPE)
