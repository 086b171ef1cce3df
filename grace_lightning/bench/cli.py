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
import time
from dataclasses import replace
from typing import Optional, Sequence

from grace_lightning.bench.config import BenchConfig, add_arguments, resolve
from grace_lightning.bench.report import (
    EVAL_COLUMNS,
    OTHER_SITTING,
    PAST_RANDOM,
    RUN_COLUMNS,
    SUMMARY_COLUMNS,
    format_markdown,
    format_table,
    summarize,
    write_results,
)
from grace_lightning.bench.runner import plan, quiet_and_restored, run_one

__all__ = ["EVAL_COLUMNS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "bench_main", "main", "run_bench"]


def warm_up(task, config: BenchConfig, first: tuple[int, str, float]) -> None:
    """One short untimed fit of the first run's strategy, so that one-off start-up costs (lazy imports, first-call
    kernel setup) do not land in the first timed run's wall clock."""
    _, strategy, fraction = first
    small = lambda n: 1_024 if n is None else min(n, 1_024)  # noqa: E731
    tiny = replace(
        config, epochs=1, warmup_epochs=0, anneal_epochs=0,
        train_examples=small(config.train_examples), val_examples=small(config.val_examples) // 2,
    )
    run_one(task, strategy, fraction, 0, tiny)


class Progress:
    """One line per finished run, with the runs done and an estimate of the time left (mean run so far)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.seconds = total, 0, 0.0

    def line(self, row: dict, metric: str) -> str:
        self.done += 1
        self.seconds += row["wall_seconds"]
        left = (self.total - self.done) * self.seconds / self.done
        eta = f", about {_duration(left)} left" if self.done < self.total else ""
        return (
            f"  [{self.done}/{self.total}] {row['task']} {row['strategy']} fraction={row['fraction']:g} seed={row['seed']}: "
            f"{metric} {row['final_metric']:.4f}, {row['train_seconds']:.1f} s training "
            f"({row['selection_seconds']:.2f} s selection){eta}"
        )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_bench(config: BenchConfig, progress: Optional[Progress] = None, tables: Optional[list] = None, title: str = "") -> int:
    """Run every planned fit not already in the comparison's journal, print the table and write the files.

    Finished runs are appended to ``<out>/runs.jsonl`` as they end; run again with the same options, the bench
    skips them, so a crash or a kill costs at most the run in progress. Returns the exit code.
    """
    from grace_lightning.bench.journal import Journal
    from grace_lightning.bench.tasks import get_task

    task = get_task(config.task, **config.task_options)
    order = plan(config)
    journal = Journal(config)
    todo = [key for key in order if not journal.done(*key)]
    print(
        f"grace-lightning bench: task {config.task} ({config.preset} size), {len(order)} runs of {config.epochs} epochs "
        f"-> {config.out}",
        flush=True,
    )
    if journal.dropped:
        print(f"  {journal.path}: dropped {journal.dropped} runs of another configuration", flush=True)
    if len(todo) < len(order):
        print(f"  resuming: {len(order) - len(todo)} of {len(order)} runs already done", flush=True)
    if progress is None:
        progress = Progress(len(todo))
    if todo:
        from grace_lightning.bench.suite import code_version

        commit = code_version()  # recorded in every row: a resumed comparison may mix commits, and says so
        # ... and the sitting: the report marks an equal-wall-clock gain read against random runs of another one.
        sitting = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with quiet_and_restored():
            warm_up(task, config, todo[0])
            for seed, strategy, fraction in todo:
                row = {**run_one(task, strategy, fraction, seed, config), "commit": commit, "sitting": sitting}
                journal.add(row)
                print(progress.line(row, task.metric), flush=True)
    rows = [journal.rows[(seed, strategy, float(fraction))] for seed, strategy, fraction in order]
    rows.sort(key=lambda r: (config.strategies.index(r["strategy"]), r["fraction"], r["seed"]))
    summary = summarize(rows, task)
    table = format_table(summary, task)
    print()
    print(table)
    if any(s.get("gain_past_random") for s in summary):
        print(PAST_RANDOM)
    if any(s.get("gain_other_sitting") for s in summary):
        print(OTHER_SITTING)
    if tables is not None:
        tables.append((title or config.task, config, format_markdown(summary, task)))
    files = write_results(config, task, rows, summary)
    from grace_lightning.bench.plots import write_plots  # matplotlib only once there is something to plot

    files += write_plots(rows, summary, config.out, task)
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
    _add_suite_arguments(bench)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _dispatch(args, bench)


def bench_main(argv: Optional[Sequence[str]] = None, prog: str = "python -m grace_lightning.bench") -> int:
    """The ``bench`` command on its own (``python -m grace_lightning.bench ...``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    add_arguments(parser)
    _add_suite_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _dispatch(args, parser)


def _add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=None, help="run the comparisons of a suite file (e.g. benchmarks/suite.toml), "
                        "resumable; every other option goes in the file")
    parser.add_argument("--only", default=None, help="with --suite: comma-separated names of the comparisons to run")


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from grace_lightning.bench.suite import load_suite, run_suite

    if args.suite is None:
        if args.only is not None:
            parser.error("argument --only: needs --suite")
        return run_bench(resolve(args, parser))
    given = [name for name, value in vars(args).items() if name not in ("suite", "only", "command") and value is not None]
    if given:
        parser.error(f"argument --suite: give --{given[0].replace('_', '-')} in the suite file instead")
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    return run_suite(load_suite(args.suite, parser, only))


if __name__ == "__main__":
    sys.exit(main())
