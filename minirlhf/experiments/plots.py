"""PNG plots of an experiment: bars with error bars across seeds, and curves.

A figure is a grid of panels; each panel is a Bars or a Lines (plain data, no matplotlib
objects), so the experiment definitions say what to draw and this file says how.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


@dataclass
class Bars:
    """One bar per arm: the mean across seeds with its SE as the error bar, each seed a dot."""
    title: str
    ylabel: str
    labels: list[str]
    stats: list[dict]              # stats.across_seeds results


@dataclass
class Lines:
    """Curves: (label, xs, ys, yerr or None, style) each; style "line", "points" or "dashed".
    A series labelled "X (...)" takes the colour of series X (and no legend entry when X has one)."""
    title: str
    xlabel: str
    ylabel: str
    series: list[tuple] = field(default_factory=list)


def _draw_bars(ax, p: Bars) -> None:
    xs = range(len(p.labels))
    means = [s["mean"] if s["mean"] is not None else 0.0 for s in p.stats]
    errs = [s["se"] or 0.0 for s in p.stats]
    ax.bar(xs, means, yerr=errs, capsize=5, color=[COLORS[i % len(COLORS)] for i in xs], alpha=0.8)
    for x, s in zip(xs, p.stats):
        ax.scatter([x] * len(s["values"]), s["values"], color="black", s=10, zorder=3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(p.labels, rotation=30 if max(map(len, p.labels), default=0) > 8 else 0, ha="right"
                       if max(map(len, p.labels), default=0) > 8 else "center", fontsize=8)


def _draw_lines(ax, p: Lines) -> None:
    colors: dict[str, str] = {}
    for label, xs, ys, yerr, style in p.series:
        group = label.split(" (")[0]  # "beta=0 (final)" takes the colour of "beta=0"
        c = colors.setdefault(group, COLORS[len(colors) % len(COLORS)])
        label = "_nolegend_" if group != label and any(s[0] == group for s in p.series) else label
        yerr = None if yerr is None or all(e is None for e in yerr) else [e or 0.0 for e in yerr]
        ys = [float("nan") if y is None else y for y in ys]
        if style == "points":
            ax.errorbar(xs, ys, yerr=yerr, fmt="o", color=c, label=label, capsize=3, ms=5)
        else:
            ax.errorbar(xs, ys, yerr=yerr, fmt="--" if style == "dashed" else "-", marker=".", color=c,
                        label=label, capsize=2)
    ax.set_xlabel(p.xlabel, fontsize=9)
    if p.series:
        ax.legend(fontsize=7)


def figure(path: Path, panels: list, title: str = "") -> Path:
    """Draw panels into path (PNG), up to 3 a row (4 as 2 x 2); returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(panels) if len(panels) <= 3 else 2 if len(panels) == 4 else 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        (_draw_bars if isinstance(p, Bars) else _draw_lines)(ax, p)
        ax.set_title(p.title, fontsize=10)
        ax.set_ylabel(p.ylabel, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
