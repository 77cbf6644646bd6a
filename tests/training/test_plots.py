"""Tests of oscqat_jax.training.plots: the PNG files it writes."""

import matplotlib
import numpy as np
import pytest

from oscqat_jax import quant
from oscqat_jax.training import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plots_write_pngs_and_leave_the_backend_alone(tmp_path):
    backend = matplotlib.get_backend()
    history = [
        {"step": s, "oscillating": 0.1 / s, "frozen": 0.001 * s, "oscillating/depthwise": 0.2 / s}
        for s in range(1, 20)
    ]
    plots.plot_oscillations(history, tmp_path / "osc.png")
    plots.plot_oscillations(
        [{"step": 1, "oscillating": 0.1}, {"step": 2, "oscillating": 0.05}], tmp_path / "damp.png"
    )
    epochs = [{"epoch": e, "top1_pre_bn": 80 + e, "top1_post_bn": 81 + e} for e in range(1, 4)]
    plots.plot_accuracy(epochs, tmp_path / "acc.png")
    d = quant.threshold_distance(np.random.default_rng(0).normal(size=1000), 0.1)
    plots.plot_threshold_distance(d, tmp_path / "dist.png", title="all")
    plots.plot_threshold_distance({"oscillating": d[:100], "other": d[100:]}, tmp_path / "two.png")
    for name in ("osc", "damp", "acc", "dist", "two"):
        assert_png(tmp_path / f"{name}.png")
    assert matplotlib.get_backend() == backend


def test_plot_oscillations_needs_fractions(tmp_path):
    with pytest.raises(ValueError, match="'oscillating' or 'frozen'"):
        plots.plot_oscillations([{"step": 1}], tmp_path / "x.png")
