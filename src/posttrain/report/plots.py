"""The report's plots: training curves and the seed's two instruments, as PNG files.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display,
no global state), so a report can be built in any process, headless, in parallel.
Every function returns ``None`` when the run lacks what the plot needs: a report shows
what a run has and skips what it lacks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from posttrain.report.instruments import read_rows

SATURATION = 0.01  # as losses/preference.py: sigma(-margin) below this = saturated pair
DPI = 100
SIZE = (6.4, 3.4)  # inches: 640 x 340 px, two side by side in the HTML page


@dataclass(frozen=True)
class Curve:
    slug: str
    title: str
    keys: tuple[str, ...]  # plotted when logged; the first few a run has
    caption: str
    ylabel: str = ""
    unit_range: bool = False  # fractions: y from 0 to 1


@dataclass(frozen=True)
class Plot:
    slug: str
    title: str
    caption: str
    path: Path


CURVES = (
    Curve("loss", "Loss", ("train/loss", "eval/loss"),
          "The objective the optimizer minimised, per logged step (held-out loss where the "
          "recipe has one)."),
    Curve("reward", "Reward", ("reward/mean", "objective/score", "objective/rlhf_reward",
                               "eval/reward_mean", "eval/score"),
          "Mean reward of the step's rollouts (online RL); eval/: greedy completions of "
          "held-out prompts."),
    Curve("implicit-reward", "Implicit rewards (β × log-ratio to the reference)",
          ("rewards/chosen", "rewards/rejected", "rewards/margins"),
          "The DPO family's reward model is the policy itself: chosen should rise above "
          "rejected."),
    Curve("rm-scores", "Reward-model scores", ("rm/chosen", "rm/rejected", "rm/margin"),
          "Bradley-Terry scores of the chosen and rejected responses in each batch."),
    Curve("kl", "KL to the reference", ("objective/kl", "grpo/kl", "kto/kl", "eval/kl"),
          "How far the policy has moved from its reference (the leash of EQ 5.3)."),
    Curve("entropy", "Policy entropy (nats per token)", ("grpo/entropy", "ppo/entropy"),
          "Mean per-token entropy of the sampled completions; a collapse to 0 means the "
          "policy stopped exploring."),
    Curve("length", "Response length (tokens)", ("completions/mean_length",
                                                 "completions/max_length"),
          "Completion lengths of the step's rollouts (R1's curves: length and accuracy "
          "growing together)."),
    Curve("accuracy", "Accuracy", ("eval/accuracy", "reward/accuracy", "rewards/accuracies",
                                   "eval/logps_accuracy", "rm/accuracy", "sft/token_accuracy",
                                   "eval/token_accuracy"),
          "eval/accuracy: verifier pass rate on held-out prompts; reward/accuracy: on the "
          "training rollouts; rewards/accuracies, rm/accuracy: pairs ordered correctly.",
          unit_range=True),
    Curve("logps", "Sequence log-probs", ("logps/chosen", "logps/rejected"),
          "Summed log-probabilities of chosen and rejected completions (DPO can lower both)."),
)

MARGIN_FRACTIONS = Curve(
    "instrument-5-1-fractions", "INSTRUMENT 5.1: saturated and misordered pairs", (),
    "saturated: pairs whose gradient weight σ(−margin) is below 0.01 (solved, they stop "
    "teaching); misordered: margin < 0 (they dominate the update).", unit_range=True)
ZERO_SPREAD = Curve(
    "instrument-5-2-zero-spread", "INSTRUMENT 5.2: groups with zero reward spread",
    ("grpo/zero_std_frac",),
    "Fraction of prompts whose G completions all got the same reward: their advantages are "
    "0 and they teach nothing.", unit_range=True)
_FRACTION_KEY = re.compile(r"^(dpo|simpo|orpo|rm)/(saturated|misordered)_frac$")


def _figure(steps: bool = True) -> tuple[Figure, Any]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    if steps:  # x is the optimizer step: no fractional ticks on a 3-step run
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) where ``key`` was logged with a finite value."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def plot_curve(rows: list[dict[str, Any]], curve: Curve, path: Path,
               keys: tuple[str, ...] | None = None) -> Plot | None:
    """One axes with every key of ``curve`` the run logged (a marker where a key has few
    points: eval/ metrics are logged only at eval steps)."""
    found = [(k, *series(rows, k)) for k in (keys or curve.keys)]
    found = [(k, xs, ys) for k, xs, ys in found if xs]
    if not found:
        return None
    fig, ax = _figure()
    for k, xs, ys in found:
        ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=4, label=k)
    ax.set_title(curve.title, fontsize=11)
    ax.set_xlabel("step")
    if curve.unit_range:
        ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="best")
    return Plot(curve.slug, curve.title, curve.caption, _save(fig, path))


def plot_margin_fractions(rows: list[dict[str, Any]], path: Path) -> Plot | None:
    keys = sorted({k for r in rows for k in r if _FRACTION_KEY.match(k)})
    return plot_curve(rows, MARGIN_FRACTIONS, path, tuple(keys)) if keys else None


def plot_margin_histogram(run_dir: Path, path: Path) -> Plot | None:
    """INSTRUMENT 5.1: the final margins, with the gradient weight sigma(-margin) overlaid."""
    found = read_rows(run_dir, "margins")
    if not found or not found[-1].get("margins"):
        return None
    row = found[-1]
    m = np.asarray(row["margins"], dtype=float)
    lo, hi = min(m.min(), -1.0), max(m.max(), math.log(1 / SATURATION - 1) + 1)
    fig, ax = _figure(steps=False)
    ax.hist(m, bins=np.linspace(lo, hi, 31), color="#4c78a8", alpha=0.85, label="pairs")
    ax.axvspan(lo, 0, color="#e45756", alpha=0.08, label="misordered (margin < 0)")
    ax.axvspan(math.log(1 / SATURATION - 1), hi, color="#54a24b", alpha=0.1,
               label=r"saturated ($\sigma(-m) < 0.01$)")
    ax.set_xlabel(f"margin ({row.get('loss', 'loss')}: what the sigmoid sees)")
    ax.set_ylabel("pairs")
    w = ax.twinx()
    x = np.linspace(lo, hi, 300)
    w.plot(x, np.exp(-np.logaddexp(0, x)), color="#f58518", lw=2,  # sigma(-x), no overflow
           label=r"gradient weight $\sigma(-m)$")
    w.set_ylim(0, 1.02)
    w.set_ylabel(r"$\sigma(-\mathrm{margin})$")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = w.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, fontsize=7, loc="outside lower center", ncol=4)
    title = (f"INSTRUMENT 5.1: margins of {row.get('n', len(m))} {row.get('split', '')} "
             f"pairs at step {row.get('step', '?')}")
    ax.set_title(title, fontsize=11)
    caption = ("Each pair's margin under the final policy (histogram) and the weight "
               "σ(−margin) its gradient carries (orange). Pairs far right are solved and "
               "teach nothing; pairs left of 0 are still misordered.")
    return Plot("instrument-5-1-margins", title, caption, _save(fig, path))


def plot_advantages(run_dir: Path, path: Path) -> Plot | None:
    """INSTRUMENT 5.2: the advantage distribution per logged step, as a 2-D histogram (the
    share of the step's completions per advantage bin) with the median and 10-90% band."""
    found = [r for r in read_rows(run_dir, "advantages") if r.get("adv")]
    if not found:
        return None
    steps = np.asarray([float(r["step"]) for r in found])
    lo = min(min(r["adv"]) for r in found)
    hi = max(max(r["adv"]) for r in found)
    lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-6 else (lo, hi)
    ybins = np.linspace(lo, hi, 41)
    grid = np.stack([np.histogram(r["adv"], bins=ybins)[0] / len(r["adv"]) for r in found])
    xedges = _edges(steps)
    fig, ax = _figure()
    mesh = ax.pcolormesh(xedges, ybins, grid.T, cmap="Blues", vmin=0, shading="flat")
    fig.colorbar(mesh, ax=ax, label="share of completions")
    q = np.stack([np.quantile(r["adv"], [0.1, 0.5, 0.9]) for r in found])
    ax.plot(steps, q[:, 1], color="#e45756", lw=1.5, label="median")
    ax.plot(steps, q[:, 0], color="#e45756", lw=0.8, ls="--", label="10% / 90%")
    ax.plot(steps, q[:, 2], color="#e45756", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("advantage")
    ax.set_title("INSTRUMENT 5.2: advantage distribution per step", fontsize=11)
    ax.legend(fontsize=7, loc="upper right")
    caption = ("Each column is one step's completions binned by advantage. A dark band at "
               "0 is the zero-spread groups (all right or all wrong): no gradient.")
    return Plot("instrument-5-2-advantages", "INSTRUMENT 5.2: advantages", caption,
                _save(fig, path))


def _edges(steps: np.ndarray) -> np.ndarray:
    """Bin edges centred on each step (unit width around a single step)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid,
                           [steps[-1] + (steps[-1] - mid[-1])]])


def stage_plots(run_dir: Path, rows: list[dict[str, Any]], out: Path, prefix: str) -> list[Plot]:
    """Every plot this run has data for, written as ``out/<prefix><slug>.png``."""
    png = lambda slug: out / f"{prefix}{slug}.png"  # noqa: E731
    plots = [plot_curve(rows, c, png(c.slug)) for c in CURVES]
    plots += [plot_margin_fractions(rows, png(MARGIN_FRACTIONS.slug)),
              plot_margin_histogram(run_dir, png("instrument-5-1-margins")),
              plot_curve(rows, ZERO_SPREAD, png(ZERO_SPREAD.slug)),
              plot_advantages(run_dir, png("instrument-5-2-advantages"))]
    return [p for p in plots if p is not None]
