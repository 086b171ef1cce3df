"""Plots of a benchmark run: accuracy per epoch and final accuracy against wall clock (selection included)."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Write ``accuracy_per_epoch.png`` and ``accuracy_vs_wall_clock.png`` into ``out_dir``; return their paths."""
    paths = []
    curves: dict[tuple[str, float], list[list[float]]] = defaultdict(list)
    for row in rows:
        curves[(row["strategy"], row["fraction"])].append(row["val_accuracy_per_epoch"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for (strategy, fraction), runs in sorted(curves.items()):
        epochs = min(len(r) for r in runs)
        mean = [sum(r[e] for r in runs) / len(runs) for e in range(epochs)]
        ax.plot(range(1, epochs + 1), mean, marker="o", label=f"{strategy} ({fraction:g})")
    ax.set(xlabel="epoch", ylabel="validation accuracy (mean over seeds)", title="Accuracy per epoch")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_per_epoch.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for (strategy, fraction), _ in sorted(curves.items()):
        mine = [r for r in rows if r["strategy"] == strategy and r["fraction"] == fraction]
        ax.scatter([r["wall_seconds"] for r in mine], [r["final_val_accuracy"] for r in mine], label=f"{strategy} ({fraction:g})")
    ax.set(xlabel="wall clock of the whole fit, s (selection included)", ylabel="final validation accuracy",
           title="Accuracy against cost")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_wall_clock.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
