"""Command line: ``grace-lightning bench ...`` and ``python -m grace_lightning.bench ...``.

Compare coreset strategies on one task: train a fresh model once per (strategy, fraction, seed), in the same
process and under the same conditions, and report the final and best metric, wall clock with selection
included, the selection's share of it, examples seen, and time to reach the full-data run's metric.
Strategy "full" runs once per seed at fraction 1.0 (the reference); every other strategy at each fraction.
Writes runs.csv, evals.csv, summary.csv, runs.json and three PNG plots to --out.

Options are validated before any training; a bad one exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Optional, Sequence

from grace_lightning.bench.config import BenchConfig, add_arguments, resolve
from grace_lightning.bench.report import EVAL_COLUMNS, RUN_COLUMNS, SUMMARY_COLUMNS, format_table, summarize, write_results
from grace_lightning.bench.runner import plan, quiet_and_restored, run_one

__all__ = ["EVAL_COLUMNS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "bench_main", "main", "run_bench"]


def warm_up(task, config: BenchConfig) -> None:
    """One short untimed fit of the first planned pair, so that one-off start-up costs (lazy imports, first-call
    kernel setup) do not land in the first timed run's wall clock."""
    _, strategy, fraction = plan(config)[0]
    small = lambda n: 1_024 if n is None else min(n, 1_024)  # noqa: E731
    tiny = replace(config, epochs=1, train_examples=small(config.train_examples), val_examples=small(config.val_examples) // 2)
    run_one(task, strategy, fraction, 0, tiny)


def run_bench(config: BenchConfig) -> int:
    """Run every planned fit, print the table and write the files; returns the exit code."""
    from grace_lightning.bench.tasks import get_task

    task = get_task(config.task)
    order = plan(config)
    print(
        f"grace-lightning bench: task {config.task} ({config.preset} size), {len(order)} runs of {config.epochs} epochs "
        f"-> {config.out}",
        flush=True,
    )
    rows: list[dict] = []
    with quiet_and_restored():
        warm_up(task, config)
        for seed, strategy, fraction in order:
            row = run_one(task, strategy, fraction, seed, config)
            rows.append(row)
            print(
                f"  [{len(rows)}/{len(order)}] {strategy} fraction={fraction:g} seed={seed}: {task.metric} "
                f"{row['final_metric']:.4f}, {row['train_seconds']:.1f} s training ({row['selection_seconds']:.2f} s selection)",
                flush=True,
            )
    rows.sort(key=lambda r: (config.strategies.index(r["strategy"]), r["fraction"], r["seed"]))
    summary = summarize(rows, task)
    print()
    print(format_table(summary, task))
    files = write_results(config, task, rows, summary)
    from grace_lightning.bench.plots import write_plots  # matplotlib only once there is something to plot

    files += write_plots(rows, summary, config.out, task.metric)
    print(f"\nwrote {', '.join(files)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``grace-lightning COMMAND ...``; the only command so far is ``bench``."""
    parser = argparse.ArgumentParser(
        prog="grace-lightning", description="grace-lightning: dynamic coreset training for PyTorch Lightning."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="compare coreset strategies on a task: metric, wall clock and selection cost",
        description=__doc__.split("\n\n")[1],
    )
    add_arguments(bench)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_bench(resolve(args, bench))


def bench_main(argv: Optional[Sequence[str]] = None, prog: str = "python -m grace_lightning.bench") -> int:
    """The ``bench`` command on its own (``python -m grace_lightning.bench ...``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_bench(resolve(args, parser))


if __name__ == "__main__":
    sys.exit(main())
