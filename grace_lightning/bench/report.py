"""Summaries of a benchmark: per-(strategy, fraction) statistics over seeds, the printed table, the files.

Files written to ``--out``:

- ``runs.csv``: one row per run (:data:`RUN_COLUMNS`);
- ``evals.csv``: one row per evaluation point of every run (:data:`EVAL_COLUMNS`);
- ``summary.csv``: one row per (strategy, fraction) (:data:`SUMMARY_COLUMNS`);
- ``runs.json``: the config, the machine, every run with its evaluation points, and the summary.

*Time to target* is the training seconds (validation excluded, selection included) a run took to first
reach the full-data reference's mean final metric minus the task's tolerance (plus it, for a metric where
lower is better). Runs that never reach it count in ``target_reached`` but not in the mean time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
from dataclasses import asdict
from typing import Optional

from grace_lightning.bench.config import BenchConfig
from grace_lightning.bench.tasks import BenchTask

__all__ = ["EVAL_COLUMNS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "format_table", "summarize", "write_results"]

RUN_COLUMNS = [
    "task",
    "strategy",
    "fraction",
    "seed",
    "epochs",
    "train_examples",
    "budget_per_epoch",
    "steps",
    "examples_seen",
    "metric",
    "final_metric",
    "best_metric",
    "wall_seconds",
    "train_seconds",
    "selection_seconds",
    "selection_share",
    "time_to_target_seconds",  # empty in the CSV (None in JSON) when never reached or without a `full` run
]
EVAL_COLUMNS = [
    "task", "strategy", "fraction", "seed", "epoch", "step", "examples_seen",
    "wall_seconds", "train_seconds", "selection_seconds", "metric",
]
SUMMARY_COLUMNS = [
    "strategy", "fraction", "seeds",
    "final_mean", "final_std", "best_mean", "best_std",
    "train_seconds_mean", "train_seconds_std", "wall_seconds_mean",
    "selection_seconds_mean", "selection_share_mean", "examples_seen_mean",
    "target", "target_reached", "time_to_target_mean",
]


def target_metric(rows: list[dict], task: BenchTask) -> Optional[float]:
    """The full-data runs' mean final metric, minus the tolerance in the metric's bad direction (None without them)."""
    full = [r["final_metric"] for r in rows if r["strategy"] == "full"]
    if not full:
        return None
    mean = statistics.fmean(full)
    return mean - task.tolerance if task.higher_is_better else mean + task.tolerance


def time_to_target(evals: list[dict], target: Optional[float], higher_is_better: bool) -> Optional[float]:
    """Training seconds at the first evaluation that reaches ``target``; None if none does."""
    if target is None:
        return None
    for point in evals:
        if (point["metric"] >= target) if higher_is_better else (point["metric"] <= target):
            return point["train_seconds"]
    return None


def _std(values: list[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[dict], task: BenchTask) -> list[dict]:
    """Fill each row's ``time_to_target_seconds`` and return one summary per (strategy, fraction), in run order."""
    target = target_metric(rows, task)
    for row in rows:
        row["time_to_target_seconds"] = time_to_target(row["evals"], target, task.higher_is_better)
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["fraction"]), []).append(row)
    summary = []
    for (strategy, fraction), runs in groups.items():
        final = [r["final_metric"] for r in runs]
        best = [r["best_metric"] for r in runs]
        train = [r["train_seconds"] for r in runs]
        selection = statistics.fmean(r["selection_seconds"] for r in runs)
        reached = [r["time_to_target_seconds"] for r in runs if r["time_to_target_seconds"] is not None]
        summary.append(
            {
                "strategy": strategy,
                "fraction": fraction,
                "seeds": len(runs),
                "final_mean": statistics.fmean(final),
                "final_std": _std(final),
                "best_mean": statistics.fmean(best),
                "best_std": _std(best),
                "train_seconds_mean": statistics.fmean(train),
                "train_seconds_std": _std(train),
                "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs),
                "selection_seconds_mean": selection,
                "selection_share_mean": selection / statistics.fmean(train) if statistics.fmean(train) > 0 else math.nan,
                "examples_seen_mean": statistics.fmean(r["examples_seen"] for r in runs),
                "target": target,
                "target_reached": len(reached),
                "time_to_target_mean": statistics.fmean(reached) if reached else None,
            }
        )
    return summary


def _pm(mean: float, std: Optional[float], digits: int) -> str:
    return f"{mean:.{digits}f} ± " + ("n/a" if std is None else f"{std:.{digits}f}")


def format_table(summary: list[dict], task: BenchTask) -> str:
    """The printed comparison: one line per (strategy, fraction), means ± sample std over seeds."""
    digits = 4 if task.higher_is_better and task.metric == "accuracy" else 3
    target = summary[0]["target"] if summary else None
    target_head = "time to target s" if target is None else f"time to {target:.{digits}f} s"
    headers = [
        "strategy", "budget", "seeds", f"final {task.metric}", f"best {task.metric}",
        "train s", "wall s", "selection s", "sel. share", "examples seen", target_head,
    ]
    lines = []
    for s in summary:
        ttt = "n/a" if s["target"] is None else (
            f"{s['time_to_target_mean']:.1f} ({s['target_reached']}/{s['seeds']})" if s["target_reached"] else f"never (0/{s['seeds']})"
        )
        lines.append(
            [
                s["strategy"],
                f"{s['fraction']:g}",
                str(s["seeds"]),
                _pm(s["final_mean"], s["final_std"], digits),
                _pm(s["best_mean"], s["best_std"], digits),
                _pm(s["train_seconds_mean"], s["train_seconds_std"], 1),
                f"{s['wall_seconds_mean']:.1f}",
                f"{s['selection_seconds_mean']:.2f}",
                f"{100 * s['selection_share_mean']:.1f}%",
                f"{s['examples_seen_mean']:,.0f}",
                ttt,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:  # the strategy name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def environment() -> dict:
    import lightning
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def write_results(config: BenchConfig, task: BenchTask, rows: list[dict], summary: list[dict]) -> list[str]:
    """Write runs.csv, evals.csv, summary.csv and runs.json into ``config.out``; return their paths."""
    paths = [os.path.join(config.out, name) for name in ("runs.csv", "evals.csv", "summary.csv", "runs.json")]
    _csv(paths[0], RUN_COLUMNS, rows)
    evals = [
        {"task": r["task"], "strategy": r["strategy"], "fraction": r["fraction"], "seed": r["seed"], **point}
        for r in rows
        for point in r["evals"]
    ]
    _csv(paths[1], EVAL_COLUMNS, evals)
    _csv(paths[2], SUMMARY_COLUMNS, summary)
    task_info = {
        "name": task.name,
        "description": task.description,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "tolerance": task.tolerance,
        "batch_size": task.batch_size,
    }
    with open(paths[3], "w") as f:
        json.dump(
            {"config": asdict(config), "task": task_info, "environment": environment(), "runs": rows, "summary": summary},
            f,
            indent=2,
        )
        f.write("\n")
    return paths
