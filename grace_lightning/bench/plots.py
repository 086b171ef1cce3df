"""Plots of a benchmark run, one PNG each, means over seeds, training seconds with selection included:

- ``metric_vs_training_seconds.png``: one panel per budget, the metric against training seconds for every
  strategy at that budget, with full data in each panel;
- ``time_to_target.png``: training seconds to reach full data's best (minus the tolerance), mean ± std over the
  runs that reached it, with how many did;
- ``gain_vs_random.png``: the paired gain over random at equal training seconds, mean ± std per budget;
- ``metric_vs_budget.png``: the final metric against the budget;
- ``selection_share.png``: the selection's share of training seconds;
- ``marked_share.png`` (tasks that mark examples: noisy labels, off-target text): the share of marked examples
  trained on per epoch, one panel per budget, with the pool's share as a line.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOT_FILES", "MARKED_PLOT", "write_plots"]

PLOT_FILES = (
    "metric_vs_training_seconds.png", "time_to_target.png", "gain_vs_random.png", "metric_vs_budget.png",
    "selection_share.png",
)
MARKED_PLOT = "marked_share.png"


def _colors(strategies: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(strategies)}


def _mean_curve(runs: list[list[dict]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    n = min(len(r) for r in runs)
    xs, ys = [], []
    for e in range(n):
        values = [r[e][y_key] for r in runs if r[e][y_key] is not None]
        if values:
            xs.append(sum(r[e][x_key] for r in runs) / len(runs))
            ys.append(sum(values) / len(values))
    return xs, ys


def _panels(count: int, title: str) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count + 1, 4.2), squeeze=False, sharey=True)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes[0])


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], summary: list[dict], out_dir: str, task: Any) -> list[str]:
    """Write :data:`PLOT_FILES` (and :data:`MARKED_PLOT` when the task marks examples) into ``out_dir``."""
    metric = task.metric
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows if r["strategy"] != "full"}) or [1.0]
    color = _colors(strategies)
    curves: dict[tuple[str, float], list[list[dict]]] = defaultdict(list)
    for row in rows:
        curves[(row["strategy"], row["fraction"])].append(row["evals"])
    paths = []

    # 1. metric against training seconds, one panel per budget; full data in every panel.
    fig, axes = _panels(len(fractions), f"validation {metric} against training seconds (selection included; mean over seeds)")
    for ax, fraction in zip(axes, fractions):
        for (strategy, f), runs in curves.items():
            if f == fraction or strategy == "full":
                x, y = _mean_curve(runs, "train_seconds", "metric")
                ax.plot(x, y, marker="o", markersize=2.5, color=color[strategy], label=strategy,
                        linestyle="--" if strategy == "full" else "-")
        ax.set(title=f"budget {fraction:g}", xlabel="training seconds")
    axes[0].set_ylabel(f"validation {metric}")
    limits = _robust_limits([p["metric"] for r in rows for p in r["evals"]])
    if limits is not None:  # a collapsed run (EL2N on noisy labels) would flatten every other curve
        axes[0].set_ylim(*limits)
    axes[-1].legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[0])))

    # 2. time to target with error bars; "k/n" runs reached it.
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(summary) + 2), 4.5))
    groups = list(range(len(summary)))
    times: dict[int, list[float]] = {i: [] for i in groups}
    for i, s in enumerate(summary):
        times[i] = [r["time_to_target_seconds"] for r in rows
                    if (r["strategy"], r["fraction"]) == (s["strategy"], s["fraction"]) and r["time_to_target_seconds"] is not None]
    heights = [sum(t) / len(t) if t else 0.0 for t in times.values()]
    errors = [_spread(t) for t in times.values()]
    ax.bar(groups, heights, yerr=errors, capsize=3, color=[color[s["strategy"]] for s in summary])
    for i, s in enumerate(summary):
        ax.annotate(f"{s['target_reached']}/{s['seeds']}" if s["target"] is not None else "n/a", (i, heights[i]),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(groups, [f"{s['strategy']}\n{s['fraction']:g}" for s in summary], fontsize=7)
    target = summary[0]["target"] if summary else None
    ax.set(ylabel="training seconds to target (runs that reached it)",
           title="time to full data's best" + ("" if target is None else f" ({metric} {target:.4g})") + "; 0 = never")
    paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[1])))

    # 3. paired gain over random at equal training seconds.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [s for s in strategies if s not in ("random", "full")]
    width = 0.8 / max(1, len(others))
    for j, strategy in enumerate(others):
        mine = {s["fraction"]: s for s in summary if s["strategy"] == strategy}
        xs = [i + (j - (len(others) - 1) / 2) * width for i, f in enumerate(fractions)]
        ys = [(mine[f]["gain_vs_random_mean"] or 0.0) if f in mine else 0.0 for f in fractions]
        err = [(mine[f]["gain_vs_random_std"] or 0.0) if f in mine else 0.0 for f in fractions]
        ax.bar(xs, ys, width=width, yerr=err, capsize=2, color=color[strategy], label=strategy)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(fractions)), [f"budget {f:g}" for f in fractions])
    ax.set(ylabel=f"{metric} gain over random (positive = better)",
           title="gain over random at equal training seconds (paired by seed)")
    if others:
        ax.legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[2])))

    # 4. final metric against budget, mean ± std; the full-data reference as a band.
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for strategy in strategies:
        mine = sorted((s for s in summary if s["strategy"] == strategy), key=lambda s: s["fraction"])
        if strategy == "full":
            s = mine[0]
            ax.axhline(s["final_mean"], color=color[strategy], label="full (1.0)")
            if s["final_std"] is not None:
                ax.axhspan(s["final_mean"] - s["final_std"], s["final_mean"] + s["final_std"], color=color[strategy], alpha=0.15)
            continue
        ax.errorbar([s["fraction"] for s in mine], [s["final_mean"] for s in mine],
                    yerr=[s["final_std"] or 0.0 for s in mine], marker="o", capsize=3, color=color[strategy], label=strategy)
    ax.set(xlabel="budget (fraction of the pool per epoch)", ylabel=f"final validation {metric}", title=f"{metric} against budget")
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[3])))

    # 5. selection's share of training time.
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(summary) + 2), 4.5))
    ax.bar(groups, [100 * s["selection_share_mean"] for s in summary], color=[color[s["strategy"]] for s in summary])
    ax.set_xticks(groups, [f"{s['strategy']}\n{s['fraction']:g}" for s in summary], fontsize=7)
    ax.set(ylabel="selection share of training seconds, %", title="cost of selection")
    paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[4])))

    # 6. share of marked (noisy / off-target) examples trained on, per epoch.
    if any(r.get("marked_share") is not None for r in rows):
        fig, axes = _panels(len(fractions), f"share of trained examples that are {rows[0].get('marked_name') or 'marked'}, per epoch (mean over seeds)")
        for ax, fraction in zip(axes, fractions):
            for (strategy, f), runs in curves.items():
                if f == fraction or strategy == "full":
                    x, y = _mean_curve(runs, "epoch", "marked_share")
                    ax.plot(x, [100 * v for v in y], marker="o", markersize=2.5, color=color[strategy], label=strategy,
                            linestyle="--" if strategy == "full" else "-")
            ax.set(title=f"budget {fraction:g}", xlabel="epoch")
        axes[0].set_ylabel("% of trained examples")
        axes[-1].legend(fontsize=7)
        paths.append(_save(fig, os.path.join(out_dir, MARKED_PLOT)))
    return paths


def _robust_limits(values: list[float]) -> Optional[tuple[float, float]]:
    """Y limits that keep every value inside Tukey's fences (quartiles ± 3 IQR) and cut far outliers, which are
    drawn leaving the frame; None when nothing lies outside them."""
    if len(values) < 4:
        return None
    ordered = sorted(values)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    low, high = q1 - 3 * (q3 - q1), q3 + 3 * (q3 - q1)
    inside = [v for v in ordered if low <= v <= high]
    if len(inside) == len(ordered) or not inside:
        return None
    pad = 0.05 * ((inside[-1] - inside[0]) or 1.0)
    return inside[0] - pad, inside[-1] + pad


def _spread(values: list[float]) -> Optional[float]:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
