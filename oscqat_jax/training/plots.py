"""Figures of a run (PNG): oscillation and freezing over training, accuracy per epoch, and
where the latent weights lie relative to the rounding thresholds.

Figures are drawn on the Agg canvas directly (``matplotlib.figure.Figure``, no ``pyplot``), so
plotting works without a display and leaves a user's interactive backend alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter


def plot_oscillations(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Fractions of weights oscillating and frozen (0..1, shown in %) against the training step.

    Rows are ``{"step", "oscillating", "frozen"}`` plus optional per-group fractions
    ``"oscillating/<group>"`` and ``"frozen/<group>"`` (e.g. ``depthwise``, ``pointwise``),
    each drawn as its own line; a key missing from a row is simply not drawn there.
    """
    keys = {key for row in history for key in row}
    kinds = [kind for kind in ("oscillating", "frozen") if any(_is_kind(k, kind) for k in keys)]
    if not kinds:
        raise ValueError("plot_oscillations needs rows with an 'oscillating' or 'frozen' fraction.")
    fig = Figure(figsize=(5.5 * len(kinds), 4), layout="constrained")
    for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds, strict=True):
        # The overall fraction first, then the groups in alphabetical order.
        for key in sorted((k for k in keys if _is_kind(k, kind)), key=lambda k: (k != kind, k)):
            steps, values = _series(history, "step", key)
            label = "all weights" if key == kind else key.split("/", 1)[1]
            ax.plot(steps, values, label=label, linewidth=2 if key == kind else 1)
        ax.set(xlabel="training step", ylabel=f"weights {kind}", title=f"Weights {kind}")
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)


def plot_accuracy(epochs: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Top-1 accuracy (in %) per epoch before and after BatchNorm re-estimation.

    Rows are ``{"epoch", "top1_pre_bn", "top1_post_bn"}``; ``top1_post_bn`` may be absent
    (re-estimation switched off).
    """
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for key, label in (
        ("top1_pre_bn", "before BN re-estimation"),
        ("top1_post_bn", "after BN re-estimation"),
    ):
        epoch, top1 = _series(epochs, "epoch", key)
        if len(epoch):
            ax.plot(epoch, top1, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_threshold_distance(
    distances: np.ndarray | Mapping[str, np.ndarray],
    path: str | os.PathLike,
    title: str = "Distance of latent weights to the rounding threshold",
) -> None:
    """Histogram of :func:`oscqat_jax.quant.threshold_distance` values (any shape, flattened).

    A mapping draws one normalised histogram per entry on the same axes, e.g.
    ``{"oscillating": d[osc], "other": d[~osc]}``.
    """
    groups = distances if isinstance(distances, Mapping) else {"": distances}
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(-0.5, 0.5, 51)
    for label, values in groups.items():
        ax.hist(
            np.ravel(values),
            bins=bins,
            density=len(groups) > 1,
            histtype="stepfilled" if len(groups) == 1 else "step",
            label=label or None,
        )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set(
        xlabel="signed distance to the nearest rounding threshold (integer units)",
        ylabel="density" if len(groups) > 1 else "weights",
        title=title,
    )
    if len(groups) > 1:
        ax.legend()
    fig.savefig(path, dpi=120)


def _is_kind(key: str, kind: str) -> bool:
    return key == kind or key.startswith(f"{kind}/")


def _series(rows: Sequence[Mapping], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, y)`` values of the rows that have ``y_key``."""
    pairs = [(row[x_key], row[y_key]) for row in rows if y_key in row]
    return np.array([x for x, _ in pairs]), np.array([y for _, y in pairs], dtype=np.float64)
