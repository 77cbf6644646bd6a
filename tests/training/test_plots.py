"""Tests of oscqat_jax.training.plots: hand-worked threshold distances and written PNG files."""

import matplotlib
import numpy as np
import pytest

from oscqat_jax.training import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_threshold_distance_by_hand():
    # x = w / s: thresholds at half-integers; negative below the nearest one, positive above.
    x = np.array([1.5, 1.2, 1.8, 2.0, -1.2, -1.5, 0.0, 0.49])
    expected = np.array([0.0, -0.3, 0.3, 0.5, 0.3, 0.0, 0.5, -0.01])
    np.testing.assert_allclose(plots.threshold_distance(x, 1.0), expected, atol=1e-12)
    # The same weights with per-channel scales (broadcast over the last axis).
    scale = np.array([0.5, 0.25])
    w = np.array([[0.75, 0.3], [1.0, -0.3]])  # x = [[1.5, 1.2], [2.0, -1.2]]
    np.testing.assert_allclose(
        plots.threshold_distance(w, scale), [[0.0, -0.3], [0.5, 0.3]], atol=1e-12
    )


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
    d = plots.threshold_distance(np.random.default_rng(0).normal(size=1000), 0.1)
    plots.plot_threshold_distance(d, tmp_path / "dist.png", title="all")
    plots.plot_threshold_distance({"oscillating": d[:100], "other": d[100:]}, tmp_path / "two.png")
    for name in ("osc", "damp", "acc", "dist", "two"):
        assert_png(tmp_path / f"{name}.png")
    assert matplotlib.get_backend() == backend


def test_plot_oscillations_needs_fractions(tmp_path):
    with pytest.raises(ValueError, match="'oscillating' or 'frozen'"):
        plots.plot_oscillations([{"step": 1}], tmp_path / "x.png")
