"""``grace-lightning bench --suite FILE``: several comparisons, one after the other, resumable run by run.

A suite file (TOML or JSON) names an output folder, options shared by every comparison, and the comparisons::

    out = "bench_out/suite"

    [defaults]                 # any bench option; a comparison's own keys win
    seeds = [0, 1, 2]
    fractions = [0.1, 0.3, 0.5]

    [[comparison]]
    name = "fashion-long"      # its folder under `out` (default: <task>-<preset>)
    task = "fashion-mnist"
    preset = "long"

    [[comparison]]
    task = "fashion-mnist-noisy"
    task_options = { noise = 0.3 }

Every comparison is validated before the first run (a bad one exits with code 2 naming it). Each keeps its own
journal (``runs.jsonl``), so the suite started again after a crash or a kill continues where it stopped. A
progress line per run gives the runs done across the suite and an estimate of the time left. At the end
``<out>/suite.md`` gathers every comparison's table with the commit and the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from typing import Any, Optional

from grace_lightning.bench.config import BenchConfig, add_arguments, load_file, resolve

__all__ = ["load_suite", "run_suite"]

_SUITE_KEYS = {"out", "defaults", "comparison"}


def load_suite(path: str, parser: argparse.ArgumentParser, only: Optional[list[str]] = None) -> list[tuple[str, BenchConfig]]:
    """``[(name, config)]`` of the suite in ``path``, every comparison checked; exits 2 naming a bad one."""
    data = load_file(path, parser, option="--suite")
    unknown = sorted(set(data) - _SUITE_KEYS)
    if unknown:
        parser.error(f"argument --suite: unknown key {', '.join(map(repr, unknown))} in {path!r}; known: {', '.join(sorted(_SUITE_KEYS))}")
    defaults, comparisons = data.get("defaults", {}), data.get("comparison", [])
    if not isinstance(defaults, dict):
        parser.error(f"argument --suite: `defaults` in {path!r} must be a table of bench options")
    if not isinstance(comparisons, list) or not comparisons or not all(isinstance(c, dict) for c in comparisons):
        parser.error(f"argument --suite: {path!r} needs at least one [[comparison]] table")
    root = str(data.get("out") or os.path.join("bench_out", os.path.splitext(os.path.basename(path))[0]))
    suite: list[tuple[str, BenchConfig]] = []
    for i, comparison in enumerate(comparisons):
        options = {**defaults, **comparison}
        preset = "quick" if options.get("quick") else options.get("preset", "default")
        name = str(options.pop("name", "") or f"{options.get('task', 'fashion-mnist')}-{preset}")
        options["out"] = os.path.join(root, name)
        # Each comparison is checked by the bench's own resolver; its errors name the comparison.
        sub = argparse.ArgumentParser(prog=f"{parser.prog} --suite {path} [comparison {i + 1}: {name}]")
        add_arguments(sub)
        suite.append((name, resolve(sub.parse_args([]), sub, file=options)))
    names = [name for name, _ in suite]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        parser.error(f"argument --suite: comparison names repeat ({', '.join(duplicated)}); give each a distinct `name`")
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            parser.error(f"argument --only: no comparison named {', '.join(map(repr, missing))}; the suite has {', '.join(names)}")
        suite = [(name, config) for name, config in suite if name in only]
    return suite


def run_suite(suite: list[tuple[str, BenchConfig]], root: Optional[str] = None) -> int:
    """Run every comparison (skipping finished runs), then write ``suite.md`` beside them."""
    from grace_lightning.bench.cli import Progress, run_bench
    from grace_lightning.bench.journal import Journal
    from grace_lightning.bench.runner import plan

    commit = code_version()  # now: the code that runs, whatever is committed while it runs
    pending = [sum(not journal.done(*key) for key in plan(config)) for journal, config in ((Journal(c), c) for _, c in suite)]
    progress = Progress(sum(pending))
    print(f"grace-lightning bench --suite: {len(suite)} comparisons, {sum(pending)} runs to do", flush=True)
    tables = []
    for name, config in suite:
        run_bench(config, progress=progress, tables=tables, title=name)
    root = root or os.path.dirname(suite[0][1].out.rstrip(os.sep))
    path = os.path.join(root, "suite.md")
    report = _report(commit, tables)
    if os.path.exists(path):  # a run of some comparisons (--only) keeps the other comparisons' tables
        with open(path) as f:
            report = _merged(f.read(), report)
    with open(path, "w") as f:
        f.write(report)
    print(f"\nwrote {path}")
    return 0


def _sections(report: str) -> tuple[str, dict[str, str]]:
    """A suite report's header and its ``## <comparison>`` sections, by name, in order."""
    head, *parts = report.split("\n## ")
    return head, {part.split("\n", 1)[0]: "## " + part for part in parts}


def _merged(old: str, new: str) -> str:
    """``new``'s header and sections, with ``old``'s sections for the comparisons ``new`` does not hold, in place."""
    _, kept = _sections(old)
    head, fresh = _sections(new)
    names = list(kept) + [name for name in fresh if name not in kept]
    return "\n".join([head, *(fresh.get(name, kept.get(name, "")).rstrip("\n") + "\n" for name in names)])


def code_version(where: Optional[str] = None) -> str:
    """The short commit of the repository at ``where`` (this package's, by default), marked when tracked files
    other than benchmark results differ from it ("unknown" outside git)."""
    try:
        here = where or os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        # The journals and tables a run writes are tracked too; only a change elsewhere means other code ran.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results"],
            cwd=here, capture_output=True, text=True,
        )
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _report(commit: str, tables: list[tuple[str, BenchConfig, str]]) -> str:
    from grace_lightning.bench.report import environment

    env = environment()
    lines = [
        "# Benchmark suite", "",
        f"- tables written at commit {commit}; each comparison names the commits its runs ran at",
        f"- machine: {env['cpu_count']} CPUs ({env['processor']}), {env['platform']}; Python {env['python']}, "
        f"torch {env['torch']} with {env['torch_threads']} threads, Lightning {env['lightning']}, transformers "
        f"{env['transformers']}, numpy {env['numpy']}, faiss-cpu {env['faiss-cpu']}"
        + (f"; GPU: {env['gpu']}" if env.get("gpu") else ""),
        "",
    ]
    from grace_lightning.bench.report import OTHER_SITTING, PAST_RANDOM

    for mark, legend in (("^", PAST_RANDOM), ("†", OTHER_SITTING)):
        if any(f" {mark}" in table for _, _, table in tables):
            lines[-1:-1] = [f"- {legend}"]
    for name, config, table in tables:
        options: dict[str, Any] = {
            "task": config.task, "preset": config.preset, "epochs": config.epochs, "lr_schedule": config.lr_schedule,
            "refresh_every": config.refresh_every, "max_selection_share": config.max_selection_share,
            "seeds": config.seeds, "fractions": config.fractions,
        }
        if config.task_options:
            options["task_options"] = config.task_options
        if config.precision != "32-true":
            options["precision"] = config.precision
        if config.scoring_batch_size is not None:
            options["scoring_batch_size"] = config.scoring_batch_size
        if not config.capture:
            options["capture"] = False
        if config.evals_per_epoch != 1:
            options["evals_per_epoch"] = config.evals_per_epoch
        from grace_lightning.bench.journal import Journal

        ran_at = sorted({str(row.get("commit", "not recorded")) for row in Journal(config).rows.values()})
        options["runs_from_commits"] = ran_at
        lines += [f"## {name}", "", "`" + ", ".join(f"{k}={v}" for k, v in options.items()) + "`", "", table, ""]
    return "\n".join(lines)
