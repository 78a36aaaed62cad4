"""The report's figures: metric against LR per rank, lr_star against rank, peaks with intervals,
a task's training curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lorasweep.analysis.compare import Peak, cell_name
from lorasweep.analysis.recipe import AxisFit
from lorasweep.analysis.scaling import RankFit
from lorasweep.files import atomic_path
from lorasweep.records import Curves, Optimum, TrialRecord
from lorasweep.report.curves import by_cell_lr
from lorasweep.report.numbers import fmt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def metric_vs_lr(records: list[TrialRecord], metric_name: str, path: Path) -> Path:
    """One panel per rank (full fine-tuning, rank-less, appears in every panel, dashed): the mean
    over seeds as a line, the seeds' range as a band, diverged trials as x on the axis."""
    curves: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    diverged: dict[str, list[float]] = defaultdict(list)
    rank_of: dict[str, int | None] = {}
    for record in records:
        name = cell_name(record.cell)
        rank_of[name] = record.cell.rank
        if record.status == "complete" and record.metric is not None:
            curves[name][record.lr].append(record.metric)
        elif record.status == "diverged":
            diverged[name].append(record.lr)
    ranks: list[int | None] = sorted({r for r in rank_of.values() if r is not None}) or [None]
    fig, axes = plt.subplots(1, len(ranks), figsize=(5.2 * len(ranks), 4.2), squeeze=False,
                             sharey=True)
    colors = dict(zip(sorted(rank_of), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10,
                      strict=False))
    for ax, rank in zip(axes[0], ranks, strict=True):
        for name in sorted(rank_of):
            if rank_of[name] is not None and rank_of[name] != rank:
                continue
            style = "--" if rank_of[name] is None else "-"
            points = sorted(curves[name].items())
            if points:
                lrs = [lr for lr, _ in points]
                ax.plot(lrs, [np.mean(v) for _, v in points], style, marker="o",
                        color=colors[name], label=name)
                ax.fill_between(lrs, [min(v) for _, v in points], [max(v) for _, v in points],
                                color=colors[name], alpha=0.15, linewidth=0)
            if diverged[name]:
                ax.scatter(diverged[name], [0.02] * len(diverged[name]), marker="x",
                           color=colors[name], transform=ax.get_xaxis_transform(),
                           label=f"{name} diverged")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"rank {rank}" if rank is not None else "")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"validation {metric_name}")
    return _save(fig, path)


def lr_star_vs_rank(fits: list[RankFit], optima: list[Optimum], path: Path) -> Path:
    """Optimal LR against rank on log-log axes, the fitted slope solid, muA's dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fit in fits:
        members = sorted((o for o in optima
                          if o.cell.rank is not None and o.cell.family == fit.family),
                         key=lambda o: o.cell.rank)
        ranks = np.array([o.cell.rank for o in members])
        stars = np.array([o.lr_star for o in members])
        low = np.array([o.lr_star_low or s for o, s in zip(members, stars, strict=True)])
        high = np.array([o.lr_star_high or s for o, s in zip(members, stars, strict=True)])
        label = f"{fit.method} a={fit.alpha} {fit.init}"
        bars = ax.errorbar(ranks, stars, yerr=[stars - low, high - stars], fmt="o", capsize=3,
                           label=f"{label}: beta {fit.beta:+.2f}")
        color = bars[0].get_color()
        line = 10 ** (fit.intercept + fit.beta * np.log10(ranks))
        ax.plot(ranks, line, "-", color=color, alpha=0.7)
        if fit.predicted is not None:
            center = float(np.log10(ranks).mean())
            anchor = fit.intercept + fit.beta * center
            predicted = 10 ** (anchor + fit.predicted * (np.log10(ranks) - center))
            ax.plot(ranks, predicted, "--", color=color, alpha=0.7,
                    label=f"{label}: muA {fit.predicted:+.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("optimal learning rate")
    ax.grid(True, which="both", alpha=0.3)
    if fits:
        ax.legend(fontsize=7)
    return _save(fig, path)


def peaks_plot(peaks: list[Peak], metric_name: str, path: Path) -> Path:
    """Each cell's peak (at its own best LR) with its interval over seeds."""
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(peaks) + 1.5))
    y = np.arange(len(peaks))
    means = np.array([p.mean for p in peaks])
    low = np.array([p.low if p.low is not None else p.mean for p in peaks])
    high = np.array([p.high if p.high is not None else p.mean for p in peaks])
    ax.errorbar(means, y, xerr=[means - low, high - means], fmt="o", capsize=3)
    ax.set_yticks(y, [p.name for p in peaks], fontsize=8)
    ax.set_xlabel(f"validation {metric_name} at each cell's tuned LR")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def lr_star_vs_axis(fits: list[AxisFit], names: list[str], metric_name: str, path: Path) -> Path:
    """Left: lr_star against a recipe axis (log-log), the fit solid, reference exponents dotted
    through the fit's centre. Right: the peak metric against the axis."""
    axis = fits[0].axis
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    for fit, name in zip(fits, names, strict=True):
        x = np.array(fit.values)
        bars = left.plot(x, fit.lr_stars, "o", label=f"{name}: k {fit.exponent:+.2f}")
        color = bars[0].get_color()
        left.plot(x, [fit.predict(v) for v in x], "-", color=color, alpha=0.7)
        center = np.exp(np.log(x).mean())
        for (label, k), style in zip(fit.references.items(), (":", "-.", "--"), strict=False):
            left.plot(x, fit.predict(center) * (x / center) ** k, style, color="gray", alpha=0.8,
                      label=f"{label}: k {k:+.2f}" if fit is fits[0] else None)
        right.plot(x, fit.peaks, "o-", color=color, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("optimal learning rate")
    right.set_ylabel(f"peak validation {metric_name}")
    return _save(fig, path)


def curve_figure(records: list[TrialRecord], curves: Curves, name: str, path: Path) -> Path:
    """One panel per cell: the curve against step at each LR, the mean over seeds smoothed over
    a tenth of the steps."""
    grouped = by_cell_lr(records, curves, name)
    cells = sorted(grouped)
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 4.0), squeeze=False,
                             sharey=True)
    for ax, cell in zip(axes[0], cells, strict=True):
        for lr, runs in sorted(grouped[cell].items()):
            length = min(len(v) for v in runs)
            mean = np.mean([v[:length] for v in runs], axis=0)
            window = max(1, length // 10)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window, length + 1), smooth, label=f"lr {fmt(lr)}")
        ax.set_title(cell)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"training {name}")
    return _save(fig, path)
