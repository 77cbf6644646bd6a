"""The README's examples for a user's own model (BatchNorm re-estimation, oscillation
summaries, exporting) run as written, on the tiny user models of ``tests/user_models.py``
standing for the ``qmodel``/``variables``/``nnx_model`` the README's prose introduces."""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pytest
from user_models import images, linen_quantized, nnx_quantized

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
HEADINGS = ("BatchNorm re-estimation", "Oscillation summaries", "Exporting your own model")


def _subsection_code(heading: str) -> str:
    section = README.read_text().split(f"\n### {heading}\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"one python block under '{heading}'"
    return blocks[0]


@pytest.mark.slow  # about 8 s: three exports and two re-estimations compile
def test_the_examples_for_your_own_model_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qmodel, variables = linen_quantized()
    namespace = {
        "qmodel": qmodel,
        "variables": variables,
        "nnx_model": nnx_quantized(),
        "train_batches": [images(8, seed=20 + i) for i in range(2)],
        "x_test": np.asarray(images(8, seed=5)),
    }
    for heading in HEADINGS:
        exec(compile(_subsection_code(heading), f"README: {heading}", "exec"), namespace)
    assert namespace["depthwise"] == {"mixer", "mixer_bn"}
    assert set(namespace["per_layer"]) == {"blocks/0", "blocks/2"}
    assert os.path.exists("mine_nnx.onnx")
    want = np.asarray(qmodel.apply(namespace["variables"], namespace["x_test"], train=False))
    np.testing.assert_allclose(namespace["onnx_logits"], want, atol=1e-4)
    loaded = np.asarray(qmodel.apply(namespace["loaded"], namespace["x_test"], train=False))
    np.testing.assert_allclose(loaded, want, atol=1e-6)


@pytest.mark.slow  # about 20 s: the two training examples compile their steps
@pytest.mark.parametrize("heading", ["Linen", "NNX"])
def test_the_linen_and_nnx_examples_run_as_written(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_subsection_code(heading), f"README: {heading}", "exec"), namespace)
    if heading == "Linen":
        assert namespace["logits"].shape == (64, 10)
        assert set(namespace["variables"]["oscillation"]) == {"Conv_0"}  # 4-bit depth-wise
    else:
        assert namespace["model"](namespace["x"]).shape == (64, 10)
        frozen_or_moving = namespace["model"].mixer.ema_osc[...]
        assert frozen_or_moving.shape == namespace["model"].mixer.kernel.shape
