"""The paper's 1-D toy regression (docs/method.md §1): a weight that cannot settle, and two cures.

    python demos/toy_regression.py --out=/tmp/toy

``min_w E[x^2] / 2 * (q(w) - w_star)^2`` is solved by gradient descent with the project's own
fake quantizer and straight-through estimator (:mod:`oscqat_jax.toy`), on a 4-bit unsigned grid
of step ``s = 1/15`` over [0, 1]. The optimum ``w_star = 0.7107`` lies between the levels 10/15
and 11/15, so the latent weight drifts down to the rounding threshold 0.70 and the quantized
weight then flips between the two levels for ever.

Why ``2 d / s`` flips per step: take ``w_star`` closer to the upper level, at ``d`` below it.
At the upper level the gradient is ``d`` (times ``E[x^2]``), at the lower level ``-(s - d)``.
The latent weight hovers at the threshold, so over a long run the pushes cancel:
``n_up * d = n_down * (s - d)``, i.e. a fraction ``d / s`` of the steps is spent below. Each
visit below lasts one step (the push back up, ``s - d``, exceeds the ``d`` that took the
weight below), so there are ``d / s`` visits per step and two flips per visit. The learning
rate scales every move alike, so it sets how far the latent weight strays from the threshold
but not how often it crosses it. The balance also makes the long-run mean of ``q(w)``
equal to ``w_star``.

The CLI writes into ``--out``:

- ``toy_regression.png`` / ``toy_regression.gif``: the reference's 60 steps (latent and
  quantized weight, optimum, threshold; the gradient of each step as bars underneath);
- ``toy_flip_law.png``: flips per step over a sweep of ``w_star`` across one bin for three
  learning rates, against ``2 d / s``, and the long-run mean of ``q(w)`` against ``w_star``;
- ``toy_remedies.png``: the same problem with iterative freezing, and with dampening, each
  switched on after the first quarter of the run as in the paper's recipes;

and prints a JSON summary of the numbers. The functions above ``plot_*`` return numbers only
and are what ``tests/test_demos_toy.py`` checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

if __package__ in (None, ""):
    # Run as a script from a clone: make the repository's package importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oscqat_jax import schedules, toy  # noqa: E402

SCALE = 1 / 15
"""Grid step of the toy's 4-bit unsigned grid on [0, 1]."""
LOWER, UPPER = 10 * SCALE, 11 * SCALE
"""The two levels around the reference's optimum."""
THRESHOLD = 10.5 * SCALE
"""The rounding threshold between them (0.70)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One toy run: optimum, start, learning rate (times ``E[x^2]``) and length."""

    w_star: float = 0.7107
    w_init: float = 0.737
    lr: float = 0.14
    num_steps: int = 60


REFERENCE = Setting()
"""The reference animation's settings (docs/method.md §1)."""
SWEEP_LEARNING_RATES = (0.01, 0.05, 0.14)
SWEEP_STEPS = 20_000
REMEDY_STEPS = 200
REMEDY_START = 0.25
"""Fraction of the run before freezing or dampening starts (the recipes' ``anneal_start``)."""
FREEZE_THRESHOLD = (0.9, 0.1)
"""Start and end of the annealed freezing threshold. It starts above the weight's frequency
(about 0.68 flips per step) so that the freeze happens a few steps later, once ``ema_int``
has averaged the two levels; a threshold already below the frequency would freeze the weight
at whichever level it held at the first step."""
FREEZE_MOMENTUM = 0.05
"""EMA momentum of tracking and freezing: the recipes' 0.001 needs thousands of steps."""
DAMPENING_WEIGHT = (0.0, 1.0)
"""Start and end of the annealed dampening weight ``lambda`` (in units of ``E[x^2]``)."""


def first_change(q: np.ndarray) -> int:
    """Index of the first step whose ``q`` differs from the step before (``len(q)`` if none)."""
    changes = np.flatnonzero(np.diff(np.asarray(q)))
    return int(changes[0]) + 1 if len(changes) else len(q)


def steady_state(q: np.ndarray) -> np.ndarray:
    """``q`` from the step before its first change on: the drift to the threshold left out."""
    return np.asarray(q)[max(first_change(q) - 1, 0) :]


def run(setting: Setting = REFERENCE, **options) -> toy.ToyTrajectory:
    """The toy trajectory of ``setting``; ``options`` go to :func:`oscqat_jax.toy.toy_regression`."""
    return toy.toy_regression(
        setting.w_star, setting.w_init, lr=setting.lr, num_steps=setting.num_steps, **options
    )


def reference_summary(long_run_steps: int = SWEEP_STEPS) -> dict:
    """The cycle of the reference's 60 steps, and the same setting over a long run.

    Steps are 0-based: step ``t`` is the weight after ``t`` updates.
    """
    q = np.asarray(run().q, np.float64)
    first_lower = int(np.argmax(np.isclose(q, LOWER)))
    cycle_start = first_lower - 2
    long_q = steady_state(
        np.asarray(run(dataclasses.replace(REFERENCE, num_steps=long_run_steps)).q)
    )
    return {
        "w_star": REFERENCE.w_star,
        "w_init": REFERENCE.w_init,
        "lr": REFERENCE.lr,
        "num_steps": REFERENCE.num_steps,
        "first_lower_step": first_lower,
        "cycle": [round(float(v), 4) for v in q[cycle_start : cycle_start + 3]],
        "flips_per_step": toy.flips_per_step(q[cycle_start:]),
        "flips_per_step_law": toy.predicted_flips_per_step(REFERENCE.w_star, SCALE),
        "mean_q": float(np.mean(q[cycle_start:])),
        "long_run": {
            "num_steps": long_run_steps,
            "flips_per_step": toy.flips_per_step(long_q),
            "mean_q": float(np.mean(long_q, dtype=np.float64)),
        },
    }


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Long-run statistics over a grid of optima and learning rates.

    ``flips`` and ``mean_q`` have shape ``(len(learning_rates), len(w_star))``; ``law`` has
    shape ``(len(w_star),)``.
    """

    w_star: np.ndarray
    learning_rates: np.ndarray
    flips: np.ndarray
    mean_q: np.ndarray
    law: np.ndarray

    @property
    def relative_error(self) -> np.ndarray:
        """``flips / law - 1`` per learning rate and optimum."""
        return self.flips / self.law - 1.0


def bin_optima(num: int = 19) -> np.ndarray:
    """``num`` optima evenly inside the bin [10/15, 11/15], its two levels left out."""
    return LOWER + SCALE * np.arange(1, num + 1) / (num + 1)


def flip_law_sweep(
    w_stars: np.ndarray | None = None,
    learning_rates=SWEEP_LEARNING_RATES,
    *,
    num_steps: int = SWEEP_STEPS,
    w_init: float = REFERENCE.w_init,
) -> Sweep:
    """Runs every (learning rate, optimum) pair for ``num_steps`` in one compiled program.

    Flips per step and the mean of ``q`` are taken over the steady state of each run.
    """
    w_stars = bin_optima() if w_stars is None else np.asarray(w_stars, np.float64)
    lrs = np.asarray(learning_rates, np.float64)

    def q_of(w_star, lr):
        return toy.toy_regression(w_star, w_init, lr=lr, num_steps=num_steps).q

    over_optima = jax.vmap(q_of, in_axes=(0, None))
    q = np.asarray(
        jax.jit(jax.vmap(over_optima, in_axes=(None, 0)))(
            jnp.asarray(w_stars, jnp.float32), jnp.asarray(lrs, jnp.float32)
        )
    )
    flips = np.empty(q.shape[:2])
    mean_q = np.empty(q.shape[:2])
    for index in np.ndindex(*q.shape[:2]):
        steady = steady_state(q[index])
        flips[index] = toy.flips_per_step(steady)
        mean_q[index] = np.mean(steady, dtype=np.float64)
    return Sweep(w_stars, lrs, flips, mean_q, toy.predicted_flips_per_step(w_stars, SCALE))


def remedy_runs(setting: Setting = REFERENCE, num_steps: int = REMEDY_STEPS) -> dict:
    """Trajectories without a remedy, with iterative freezing and with dampening.

    Each remedy starts at ``REMEDY_START * num_steps`` and is then annealed by the project's
    schedules (:mod:`oscqat_jax.schedules`), as in the paper's recipes.
    """
    setting = dataclasses.replace(setting, num_steps=num_steps)
    freeze = schedules.freeze_threshold_schedule(
        *FREEZE_THRESHOLD, total_steps=num_steps, anneal_start=REMEDY_START
    )
    damp = schedules.dampening_weight_schedule(
        *DAMPENING_WEIGHT, total_steps=num_steps, anneal_start=REMEDY_START
    )
    return {
        "plain": run(setting),
        "freezing": run(setting, freeze_threshold=freeze, momentum=FREEZE_MOMENTUM),
        "dampening": run(setting, dampening_weight=damp),
    }


def remedy_summary(
    trajectory: toy.ToyTrajectory, w_star: float = REFERENCE.w_star, last: int = 50
) -> dict:
    """Final quantized weight, its error against ``w_star`` and when the flipping stopped.

    ``flips_last_steps`` counts the flips among the ``last`` steps; ``last_flip_step`` is the
    last step whose ``q`` differs from the step before.
    """
    q = np.asarray(trajectory.q, np.float64)
    changes = np.flatnonzero(np.diff(q)) + 1
    last_flip = int(changes[-1]) if len(changes) else None
    frozen = np.asarray(trajectory.frozen)
    result = {
        "final_q": float(q[-1]),
        "final_level": int(round(q[-1] / SCALE)),
        "error": float(abs(q[-1] - w_star)),
        "flips_last_steps": int(np.count_nonzero(np.diff(q[-last:]))),
        "last_steps": last,
        "last_flip_step": last_flip,
    }
    if frozen.any():
        # ``frozen`` is recorded before each update, so the freeze was decided a step earlier.
        result["frozen_at_step"] = int(np.argmax(frozen)) - 1
        result["freeze_threshold_then"] = float(trajectory.freeze_threshold[np.argmax(frozen) - 1])
    if last_flip is not None and float(np.max(trajectory.dampening_weight)) > 0:
        result["dampening_weight_at_last_flip"] = float(trajectory.dampening_weight[last_flip])
        # Dampening holds the weight in the upper bin once lambda * s exceeds the task's pull d.
        result["dampening_weight_law"] = toy.predicted_flips_per_step(w_star, SCALE) / 2
    return result


def summary(sweep: Sweep, runs: dict) -> dict:
    """Every number the demo reports (the JSON the CLI prints, less the file list)."""
    return {
        "reference": reference_summary(),
        "flip_law": {
            "learning_rates": sweep.learning_rates.tolist(),
            "num_optima": len(sweep.w_star),
            "max_relative_error": float(np.max(np.abs(sweep.relative_error))),
            "max_mean_q_error": float(np.max(np.abs(sweep.mean_q - sweep.w_star))),
        },
        **{name: remedy_summary(trajectory) for name, trajectory in runs.items()},
    }


# Plotting: everything below draws what the functions above compute.


def _draw_trajectory(ax_w, ax_g, trajectory, w_star: float, upto: int | None = None) -> None:
    """Latent/quantized weight, optimum and threshold on ``ax_w``; gradient bars on ``ax_g``."""
    n = len(trajectory.q)
    upto = n if upto is None else upto
    steps = np.arange(upto)
    w = np.asarray(trajectory.w)[:upto]
    q = np.asarray(trajectory.q)[:upto]
    grad = np.asarray(trajectory.grad)[:upto]
    for level in (LOWER, UPPER):
        ax_w.axhline(level, color="0.85", linewidth=1, zorder=0)
    ax_w.axhline(THRESHOLD, color="0.4", linestyle=":", label="rounding threshold")
    ax_w.axhline(w_star, color="tab:green", linestyle="--", label="optimum $w^*$")
    ax_w.plot(steps, w, color="tab:blue", marker=".", label="latent weight $w$")
    ax_w.step(steps, q, where="mid", color="tab:orange", linewidth=2, label="quantized $q(w)$")
    ax_w.set(xlim=(-1, n), ylim=(LOWER - 0.4 * SCALE, UPPER + 0.4 * SCALE), ylabel="weight")
    ax_w.set_yticks([LOWER, THRESHOLD, UPPER], ["10/15", "0.70", "11/15"])
    ax_w.legend(loc="upper right", fontsize=8, ncol=2)
    ax_w.grid(alpha=0.2, axis="x")
    colors = np.where(grad > 0, "tab:red", "tab:purple")
    ax_g.bar(steps, grad, color=colors, width=0.8)
    ax_g.axhline(0, color="0.3", linewidth=0.8)
    limit = 1.15 * float(np.max(np.abs(np.asarray(trajectory.grad))))
    ax_g.set(xlim=(-1, n), ylim=(-limit, limit), xlabel="step", ylabel="STE gradient")


def _trajectory_figure(title: str):
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax_w, ax_g = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    fig.suptitle(title, fontsize=10)
    return fig, ax_w, ax_g


def plot_trajectory(trajectory: toy.ToyTrajectory, setting: Setting = REFERENCE) -> Figure:
    """The whole trajectory of ``setting`` (an optimum inside the bin [10/15, 11/15])."""
    fig, ax_w, ax_g = _trajectory_figure(
        f"Toy regression: $w^*$ = {setting.w_star}, lr·E[x²] = {setting.lr}, grid step 1/15"
    )
    _draw_trajectory(ax_w, ax_g, trajectory, setting.w_star)
    return fig


def animate_trajectory(
    trajectory: toy.ToyTrajectory, path: str, setting: Setting = REFERENCE, frame_ms: int = 150
) -> None:
    """Writes the trajectory growing one step per frame as a looping GIF (64 colours)."""
    frames = []
    for upto in range(1, len(trajectory.q) + 1):
        q_now = float(trajectory.q[upto - 1])
        fig, ax_w, ax_g = _trajectory_figure(f"Toy regression, step {upto - 1}: q(w) = {q_now:.4f}")
        _draw_trajectory(ax_w, ax_g, trajectory, setting.w_star, upto=upto)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        frames.append(Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()))
    # One palette for every frame (the last one holds every colour) keeps the file small.
    palette = frames[-1].convert("RGB").quantize(colors=64)
    frames = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 15]
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True
    )


def plot_sweep(sweep: Sweep) -> Figure:
    """Flips per step against the position of ``w_star`` in its bin, and the mean of ``q``."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_f, ax_m = fig.subplots(1, 2)
    u = (sweep.w_star - LOWER) / SCALE
    fine = np.linspace(0, 1, 201)
    law = toy.predicted_flips_per_step(LOWER + SCALE * fine, SCALE)
    ax_f.plot(fine, law, color="0.3", label="law $2d/s$")
    markers = ("o", "x", "+")
    for i, lr in enumerate(sweep.learning_rates):
        ax_f.plot(u, sweep.flips[i], markers[i % 3], markersize=7, label=f"lr·E[x²] = {lr:g}")
        ax_m.plot(sweep.w_star, sweep.mean_q[i], markers[i % 3], label=f"lr·E[x²] = {lr:g}")
    ax_f.set(
        xlabel="position of $w^*$ in the bin, $(w^* - 10/15)/s$",
        ylabel="flips of $q(w)$ per step",
        title="Flip frequency follows $2d/s$ for every learning rate",
    )
    ax_f.legend(fontsize=8)
    ax_f.grid(alpha=0.3)
    for level in (LOWER, UPPER):
        ax_m.axhline(level, color="0.85", linewidth=1, zorder=0)
    ax_m.plot([LOWER, UPPER], [LOWER, UPPER], color="0.3", label="$w^*$")
    ax_m.set(
        xlabel="optimum $w^*$",
        ylabel="long-run mean of $q(w)$",
        title="The long-run mean of $q(w)$ is $w^*$",
    )
    ax_m.legend(fontsize=8)
    ax_m.grid(alpha=0.3)
    return fig


def plot_remedies(runs: dict, w_star: float = REFERENCE.w_star) -> Figure:
    """One row per run (plain, freezing, dampening) with its remedy's schedule on a twin axis."""
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True)
    for ax, (name, trajectory) in zip(axes, runs.items(), strict=True):
        stats = remedy_summary(trajectory, w_star)
        steps = np.arange(len(trajectory.q))
        for level in (LOWER, UPPER):
            ax.axhline(level, color="0.85", linewidth=1, zorder=0)
        ax.axhline(THRESHOLD, color="0.4", linestyle=":")
        ax.axhline(w_star, color="tab:green", linestyle="--", label="$w^*$")
        ax.plot(steps, trajectory.w, color="tab:blue", linewidth=1, label="$w$")
        ax.step(steps, trajectory.q, where="mid", color="tab:orange", label="$q(w)$")
        ax.set_ylim(LOWER - 0.4 * SCALE, UPPER + 0.4 * SCALE)
        ax.set_yticks([LOWER, THRESHOLD, UPPER], ["10/15", "0.70", "11/15"])
        ax.set_title(
            f"{name}: final $q$ = {stats['final_q']:.4f}, |$q - w^*$| = {stats['error']:.4f}, "
            f"{stats['flips_last_steps']} flips in the last {stats['last_steps']} steps",
            fontsize=9,
        )
        schedule = {"freezing": "freeze_threshold", "dampening": "dampening_weight"}.get(name)
        if schedule:
            twin = ax.twinx()
            twin.plot(steps, getattr(trajectory, schedule), color="0.5", linewidth=1)
            twin.set_ylabel(
                "freezing threshold $f_{th}$"
                if name == "freezing"
                else r"dampening weight $\lambda$",
                color="0.5",
            )
            twin.tick_params(colors="0.5")
        ax.legend(loc="lower left", fontsize=8, ncol=3)
    axes[-1].set_xlabel("step")
    return fig


def write_figures(out: str, sweep: Sweep, runs: dict) -> list[str]:
    """Writes the demo's figures into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    names = ("toy_regression.png", "toy_regression.gif", "toy_flip_law.png", "toy_remedies.png")
    paths = [os.path.join(out, name) for name in names]
    reference = run()
    plot_trajectory(reference).savefig(paths[0], dpi=120)
    animate_trajectory(reference, paths[1])
    plot_sweep(sweep).savefig(paths[2], dpi=120)
    plot_remedies(runs).savefig(paths[3], dpi=120)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="folder for the figures")
    args = parser.parse_args(argv)
    sweep, runs = flip_law_sweep(), remedy_runs()
    result = summary(sweep, runs)
    result["files"] = write_figures(args.out, sweep, runs)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
