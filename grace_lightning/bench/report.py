"""Summaries of a benchmark: per-(strategy, fraction) statistics over seeds, the printed table, the files.

Files written to ``--out``:

- ``runs.csv``: one row per run (:data:`RUN_COLUMNS`);
- ``evals.csv``: one row per evaluation point of every run (:data:`EVAL_COLUMNS`);
- ``summary.csv``: one row per (strategy, fraction) (:data:`SUMMARY_COLUMNS`);
- ``runs.json``: the config, the machine, every run with its evaluation points, and the summary.

*Target*: the full-data runs' mean **best** metric (a long run may overfit, so its last evaluation is not its
best) minus the task's tolerance (plus it, for a metric where lower is better). *Time to target* is the training
seconds (validation excluded, selection included) a run took to first reach it; runs that never reach it count in
``target_reached`` but not in the mean time.

*Equal wall clock*, paired by seed (same seed = same pool, same initial weights): for every run, what the
full-data run and random had reached by the same training seconds, read from their evaluation points (the last
evaluation at or before that time; ``None`` before their first one). For random it is the best over its runs at
every budget of that seed: a strategy that takes twice random's time at 30% is compared with what random at 50%
reached in that time, since that is what the same seconds buy. The *gain* over random is the run's final metric
minus that, signed so that positive is better. A mean gain is *within noise* when a paired t-test over the seeds does not reject zero at 5%
(two-sided). The comparison reads two runs' seconds side by side, so it is only as good as the machine's speed
was the same for both: a gain is marked ``†`` when a random run it is paired with ran in another *sitting*
(another bench invocation, recorded as each row's ``sitting``; for rows from before that was recorded, another
commit).

*Examples to random's final*: the training examples a run had seen when it first matched the final metric of
random at its budget and seed (for a language-model task, times ``tokens_per_example`` gives tokens).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import statistics
from dataclasses import asdict
from typing import Optional

from grace_lightning.bench.config import BenchConfig
from grace_lightning.bench.tasks import BenchTask

__all__ = [
    "EVAL_COLUMNS", "OTHER_SITTING", "PAST_RANDOM", "RUN_COLUMNS", "SUMMARY_COLUMNS", "format_markdown", "format_table",
    "summarize", "write_results",
]

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
    "full_at_equal_seconds",  # full data's metric at this run's final training seconds (same seed)
    "random_at_equal_seconds",  # the best any random run of the same seed (any budget) had reached by then
    "gain_vs_random",  # final metric minus random_at_equal_seconds, positive = better
    "examples_to_random_final",  # examples seen when this run first matched random's final metric
    "marked_share",  # share of trained examples the task marks (noisy, off-target); empty when it marks none
]
EVAL_COLUMNS = [
    "task", "strategy", "fraction", "seed", "epoch", "step", "examples_seen",
    "wall_seconds", "train_seconds", "selection_seconds", "metric", "marked_share",
]
SUMMARY_COLUMNS = [
    "strategy", "fraction", "seeds",
    "final_mean", "final_std", "best_mean", "best_std",
    "train_seconds_mean", "train_seconds_std", "wall_seconds_mean",
    "selection_seconds_mean", "selection_share_mean", "examples_seen_mean",
    "target", "target_reached", "time_to_target_mean",
    "gain_vs_random_mean", "gain_vs_random_std", "gain_within_noise", "gain_other_sitting", "gain_past_random",
    "full_at_equal_seconds_mean",
    "examples_to_random_final_mean", "random_final_reached", "marked_share_mean",
]

OTHER_SITTING = (
    "†: paired with random runs from another sitting (another bench invocation or commit); the machine's speed may "
    "have differed, so those seconds compare loosely"
)

PAST_RANDOM = (
    "^: some run of the row trained longer than every random run of its seed; past random's longest run its frontier "
    "is that run's final metric, which a larger random budget could have beaten, so the gain is an upper bound "
    "(give the comparison a random budget that outlasts the strategy's)"
)

# Two-sided 95% quantiles of Student's t by degrees of freedom (1-10); 1.96 beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def target_metric(rows: list[dict], task: BenchTask) -> Optional[float]:
    """The full-data runs' mean best metric, minus the tolerance in the metric's bad direction (None without them)."""
    full = [r["best_metric"] for r in rows if r["strategy"] == "full"]
    if not full:
        return None
    mean = statistics.fmean(full)
    return mean - task.tolerance if task.higher_is_better else mean + task.tolerance


def first_reaching(evals: list[dict], target: Optional[float], higher_is_better: bool, key: str = "train_seconds"):
    """``key`` of the first evaluation whose metric reaches ``target``; None if none does (or no target)."""
    if target is None:
        return None
    for point in evals:
        if point["metric"] >= target if higher_is_better else point["metric"] <= target:
            return point[key]
    return None


def time_to_target(evals: list[dict], target: Optional[float], higher_is_better: bool) -> Optional[float]:
    """Training seconds at the first evaluation that reaches ``target``; None if none does."""
    return first_reaching(evals, target, higher_is_better, "train_seconds")


def metric_at(evals: list[dict], seconds: float) -> Optional[float]:
    """The metric of the last evaluation at or before ``seconds`` of training (None before the first one)."""
    value = None
    for point in evals:
        if point["train_seconds"] > seconds + 1e-9:
            break
        value = point["metric"]
    return value


def within_noise(gains: list[float]) -> Optional[bool]:
    """True when a paired two-sided t-test at 5% does not reject a zero mean gain (None with fewer than 2 seeds)."""
    if len(gains) < 2:
        return None
    sd = statistics.stdev(gains)
    if sd == 0.0:
        return statistics.fmean(gains) == 0.0
    t = abs(statistics.fmean(gains)) / (sd / math.sqrt(len(gains)))
    return t < _T95.get(len(gains) - 1, 1.96)


def _pair_with_references(rows: list[dict], task: BenchTask) -> None:
    """Fill each row's equal-wall-clock and examples-to-random columns from the same seed's full and random runs."""
    full = {r["seed"]: r for r in rows if r["strategy"] == "full"}
    randoms: dict[int, list[dict]] = {}
    for r in rows:
        if r["strategy"] == "random":
            randoms.setdefault(r["seed"], []).append(r)
    best = max if task.higher_is_better else min
    sign = 1.0 if task.higher_is_better else -1.0
    for row in rows:
        seconds = row["train_seconds"]
        f = full.get(row["seed"])
        row["full_at_equal_seconds"] = None if f is None else metric_at(f["evals"], seconds)
        # Random's frontier: the best any random run of this seed (any budget) had reached by these seconds, so a
        # slow strategy is compared with the larger random subset the same time would have paid for.
        reached = [m for m in (metric_at(r["evals"], seconds) for r in randoms.get(row["seed"], [])) if m is not None]
        at = best(reached) if reached else None
        row["random_at_equal_seconds"] = at
        row["gain_vs_random"] = None if at is None else sign * (row["final_metric"] - at)
        row["random_other_sitting"] = any(_sitting(r) != _sitting(row) for r in randoms.get(row["seed"], []))
        longest = max((r["train_seconds"] for r in randoms.get(row["seed"], [])), default=None)
        row["past_random_frontier"] = longest is not None and row["strategy"] != "random" and seconds > longest
        same_budget = next((r for r in randoms.get(row["seed"], []) if r["fraction"] == row["fraction"]), None)
        row["examples_to_random_final"] = None if same_budget is None else first_reaching(
            row["evals"], same_budget["final_metric"], task.higher_is_better, "examples_seen"
        )


def _sitting(row: dict) -> str:
    """Which bench invocation ran ``row``: its ``sitting``, or for rows from before that was recorded, its commit."""
    return str(row.get("sitting") or f"commit {row.get('commit')}")


def _std(values: list[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[dict], task: BenchTask) -> list[dict]:
    """Fill each row's ``time_to_target_seconds`` and return one summary per (strategy, fraction), in run order."""
    target = target_metric(rows, task)
    for row in rows:
        row["time_to_target_seconds"] = time_to_target(row["evals"], target, task.higher_is_better)
    _pair_with_references(rows, task)
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
        gains = [r["gain_vs_random"] for r in runs if r["gain_vs_random"] is not None]
        full_at = [r["full_at_equal_seconds"] for r in runs if r["full_at_equal_seconds"] is not None]
        to_random = [r["examples_to_random_final"] for r in runs if r["examples_to_random_final"] is not None]
        marked = [r["marked_share"] for r in runs if r.get("marked_share") is not None]
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
                "gain_vs_random_mean": statistics.fmean(gains) if gains else None,
                "gain_vs_random_std": _std(gains),
                "gain_within_noise": within_noise(gains),
                "gain_other_sitting": any(r["random_other_sitting"] for r in runs if r["gain_vs_random"] is not None),
                "gain_past_random": any(r["past_random_frontier"] for r in runs if r["gain_vs_random"] is not None),
                "full_at_equal_seconds_mean": statistics.fmean(full_at) if full_at else None,
                "examples_to_random_final_mean": statistics.fmean(to_random) if to_random else None,
                "random_final_reached": len(to_random),
                "marked_share_mean": statistics.fmean(marked) if marked else None,
            }
        )
    return summary


def _pm(mean: float, std: Optional[float], digits: int) -> str:
    return f"{mean:.{digits}f} ± " + ("n/a" if std is None else f"{std:.{digits}f}")


def _gain(s: dict, digits: int) -> str:
    if s["strategy"] == "random" or s["gain_vs_random_mean"] is None:
        return "-"
    text = _pm(s["gain_vs_random_mean"], s["gain_vs_random_std"], digits)
    return (
        text + (" ^" if s["gain_past_random"] else "") + (" ~" if s["gain_within_noise"] else "")
        + (" †" if s["gain_other_sitting"] else "")
    )


def format_table(summary: list[dict], task: BenchTask) -> str:
    """The printed comparison: one line per (strategy, fraction), means ± sample std over seeds.

    "vs random @ equal s" is the paired gain over random (its best at any budget) at equal training seconds
    (positive is better); ``^`` marks an upper bound, read past random's longest run (:data:`PAST_RANDOM`), a
    trailing ``~`` a gain within noise, ``†`` one read against random runs of another sitting (:data:`OTHER_SITTING`). "marked" is the share of trained examples the task
    marks (noisy labels, off-target text), shown only for tasks that mark some.
    """
    digits = 4 if task.higher_is_better and task.metric == "accuracy" else 3
    target = summary[0]["target"] if summary else None
    target_head = "time to target s" if target is None else f"time to {target:.{digits}f} s"
    marked = any(s["marked_share_mean"] is not None for s in summary)
    headers = [
        "strategy", "budget", "seeds", f"final {task.metric}", f"best {task.metric}",
        "train s", "selection s", "sel. share", "examples seen", target_head, "vs random @ equal s",
    ] + (["marked"] if marked else [])
    lines = []
    for s in summary:
        ttt = "n/a" if s["target"] is None else (
            f"{s['time_to_target_mean']:.1f} ({s['target_reached']}/{s['seeds']})" if s["target_reached"] else f"never (0/{s['seeds']})"
        )
        line = [
            s["strategy"],
            f"{s['fraction']:g}",
            str(s["seeds"]),
            _pm(s["final_mean"], s["final_std"], digits),
            _pm(s["best_mean"], s["best_std"], digits),
            _pm(s["train_seconds_mean"], s["train_seconds_std"], 1),
            f"{s['selection_seconds_mean']:.2f}",
            f"{100 * s['selection_share_mean']:.1f}%",
            f"{s['examples_seen_mean']:,.0f}",
            ttt,
            _gain(s, digits),
        ]
        if marked:
            line.append("-" if s["marked_share_mean"] is None else f"{100 * s['marked_share_mean']:.1f}%")
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:  # the strategy name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def format_markdown(summary: list[dict], task: BenchTask) -> str:
    """The comparison as a Markdown table (for ``suite.md`` and the README): the printed table's columns."""
    lines = format_table(summary, task).splitlines()
    header, rows = lines[0], lines[2:]
    # The printed table aligns columns with runs of 2+ spaces; cells never contain two spaces in a row.
    split = lambda line: [cell.strip() for cell in re.split(r"\s{2,}", line.strip())]  # noqa: E731
    head = split(header)
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    out += ["| " + " | ".join(split(row)) + " |" for row in rows]
    return "\n".join(out)


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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # The LM tasks' model is transformers' GPT-2: two sittings' runs of one seed ended 0.5 perplexity points
        # apart with the same code and torch, in virtual environments installed by different sessions.
        **{name: _installed(name) for name in ("transformers", "numpy", "faiss-cpu")},
    }


def _installed(distribution: str) -> Optional[str]:
    """The installed version of a package (read from its metadata, without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


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
        "settings": task.settings,
    }
    with open(paths[3], "w") as f:
        json.dump(
            {"config": asdict(config), "task": task_info, "environment": environment(), "runs": rows, "summary": summary},
            f,
            indent=2,
        )
        f.write("\n")
    return paths
