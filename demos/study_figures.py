"""The figures of the small-scale study (``demos/reproduce.py``), drawn from its results.

Each function writes one PNG into ``directory`` and returns the paths it wrote (none when
there is nothing to draw). Results are grouped as the study groups them: ``(bits, method)``
to the list of that group's ``result.json`` dicts, one per seed.
"""

from __future__ import annotations

import os

import numpy as np

SHORT = {"lsq": "LSQ", "damp": "+ damp.", "freeze": "+ freeze"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return [path]


def oscillation_bars(groups: dict[tuple[int, str], list[dict]], directory: str) -> list[str]:
    """``results_oscillations.png``: peak and end share of weights oscillating (percent) per
    bit width and method, depth-wise and point-wise, mean and std over seeds."""
    if not groups:
        return []
    plt = _pyplot()
    labels = [f"W{b}A{b}\n{SHORT[m]}" for b, m in groups]
    x = np.arange(len(groups))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stat in zip(axes, ("osc_peak", "osc_end"), strict=True):
        for offset, group in ((-0.2, "depthwise"), (0.2, "pointwise")):
            values = [
                [100 * r.get(f"{stat}/{group}", np.nan) for r in rs] for rs in groups.values()
            ]
            spread = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.bar(x + offset, [np.mean(v) for v in values], 0.4, yerr=spread, label=group)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("weights oscillating (%)")
        end = "at the end of QAT (frozen weights included)"
        ax.set_title("peak during QAT" if stat == "osc_peak" else end)
        ax.legend()
    return _save(fig, os.path.join(directory, "results_oscillations.png"))


def accuracy_bars(evaluated: dict[str, dict], directory: str) -> list[str]:
    """``results_accuracy.png``: pre- and post-BN top-1 of every evaluated run (by name)."""
    if not evaluated:
        return []
    plt = _pyplot()
    rs = list(evaluated.values())
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rs)), 3.8))
    x = np.arange(len(rs))
    ax.bar(x - 0.2, [r["pre_bn"] for r in rs], 0.4, label="pre-BN")
    ax.bar(x + 0.2, [r["post_bn"] for r in rs], 0.4, label="post-BN")
    ax.set_ylim(max(0.0, min(min(r["pre_bn"], r["post_bn"]) for r in rs) - 5), 100)
    ax.set_xticks(x, list(evaluated), rotation=70, fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.legend()
    return _save(fig, os.path.join(directory, "results_accuracy.png"))


def oscillation_curves(
    histories: dict[tuple[int, str], list[list[dict]]], methods: dict[str, str], directory: str
) -> list[str]:
    """``results_curves.png``: weights oscillating (and frozen) during QAT, one panel per bit
    width, mean over seeds; depth-wise solid, point-wise dashed. ``histories`` holds each
    run's oscillation curve (``reports.oscillation_history``); ``methods`` names the methods
    in the order of their colours."""
    bits = sorted({b for b, _ in histories})
    if not bits:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 3.8), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        for i, (method, name) in enumerate(methods.items()):
            runs = [h for h in histories.get((b, method), []) if h]
            if not runs:
                continue
            length = min(len(h) for h in runs)
            steps = [r["step"] for r in runs[0][:length]]

            def mean(key, runs=runs, length=length):
                return np.mean([[100 * r[key] for r in h[:length]] for h in runs], axis=0)

            for group, style in (("depthwise", "-"), ("pointwise", "--")):
                label = f"{name}, {group}"
                ax.plot(steps, mean(f"oscillating/{group}"), style, color=f"C{i}", label=label)
            if method == "freeze":
                ax.plot(steps, mean("frozen"), ":", color="k", label="frozen (freezing)")
        ax.set_title(f"W{b}A{b}")
        ax.set_xlabel("QAT step")
        ax.set_ylabel("weights (%)")
        ax.legend(fontsize=7)
    return _save(fig, os.path.join(directory, "results_curves.png"))


def bn_gap_curves(panels: dict[str, dict[str, list[list[dict]]]], directory: str) -> list[str]:
    """``results_bn_gap.png``: post- minus pre-BN top-1 (points) at every evaluation of QAT,
    one panel per title in ``panels``, one line per label (mean over its runs, the runs
    thin). ``panels[title][label]`` holds each run's evaluation curve (dicts with ``step``,
    ``top1_pre_bn`` and ``top1_post_bn``)."""
    panels = {t: ls for t, ls in panels.items() if any(ls.values())}
    if not panels:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items(), strict=True):
        for i, (label, curves) in enumerate(lines.items()):
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [r["step"] for r in curves[0][:length]]
            gaps = np.array(
                [[r["top1_post_bn"] - r["top1_pre_bn"] for r in c[:length]] for c in curves]
            )
            for g in gaps:
                ax.plot(steps, g, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, gaps.mean(axis=0), "o-", color=f"C{i}", label=f"{label} ({len(gaps)})")
        ax.axhline(0.0, color="k", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("QAT step")
        ax.set_ylabel("post- minus pre-BN top-1 (points)")
        ax.legend(fontsize=7)
    return _save(fig, os.path.join(directory, "results_bn_gap.png"))
