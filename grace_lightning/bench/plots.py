"""Plots of a benchmark run, one PNG each: metric against training seconds, metric against budget, and the
selection's share of the training time. Means over seeds; training seconds include selection."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PLOT_FILES", "write_plots"]

PLOT_FILES = ("metric_vs_wall_clock.png", "metric_vs_budget.png", "selection_share.png")
_STYLES = ["-", "--", ":", "-."]


def _colors(strategies: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {s: cycle[i % len(cycle)] for i, s in enumerate(strategies)}


def write_plots(rows: list[dict], summary: list[dict], out_dir: str, metric: str) -> list[str]:
    """Write :data:`PLOT_FILES` into ``out_dir`` and return their paths."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    fractions = sorted({r["fraction"] for r in rows if r["strategy"] != "full"})
    color = _colors(strategies)
    style = {f: _STYLES[i % len(_STYLES)] for i, f in enumerate(fractions)}
    paths = [os.path.join(out_dir, name) for name in PLOT_FILES]

    # 1. metric against training seconds: one curve per (strategy, fraction), mean over seeds per epoch.
    curves: dict[tuple[str, float], list[list[dict]]] = defaultdict(list)
    for row in rows:
        curves[(row["strategy"], row["fraction"])].append(row["evals"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (strategy, fraction), runs in curves.items():
        n = min(len(r) for r in runs)
        x = [sum(r[e]["train_seconds"] for r in runs) / len(runs) for e in range(n)]
        y = [sum(r[e]["metric"] for r in runs) / len(runs) for e in range(n)]
        ax.plot(x, y, marker="o", markersize=3, color=color[strategy], linestyle=style.get(fraction, "-"),
                label=f"{strategy} ({fraction:g})")
    ax.set(xlabel="training seconds (selection included, validation excluded)", ylabel=f"validation {metric}",
           title=f"{metric} against cost (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    # 2. final metric against budget, mean ± std; the full-data reference as a band.
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
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    # 3. selection's share of training time, grouped by fraction.
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups = [(s["strategy"], s["fraction"]) for s in summary]
    share = {(s["strategy"], s["fraction"]): 100 * s["selection_share_mean"] for s in summary}
    ax.bar(range(len(groups)), [share[g] for g in groups], color=[color[g[0]] for g in groups])
    ax.set_xticks(range(len(groups)), [f"{g[0]}\n{g[1]:g}" for g in groups], fontsize=7)
    ax.set(ylabel="selection share of training seconds, %", title="Cost of selection")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
