"""Command line: ``grace-lightning bench ...`` and ``python -m grace_lightning.bench ...``.

A short demo harness: train a small MLP on a generated Gaussian-mixture problem (grace_lightning.bench.tasks)
once per (strategy, fraction, seed), and report final validation accuracy, wall clock and selection cost.
Strategy "full" always runs at fraction 1.0 (the full-data reference); every other strategy runs at each
--fractions value. Writes runs.csv and runs.json to --out.

Options are validated before any training; a bad one exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

__all__ = ["main", "bench_main", "RUN_COLUMNS"]

# One row per (strategy, fraction, seed), in this order, in runs.csv and runs.json.
RUN_COLUMNS = [
    "strategy",
    "fraction",
    "seed",
    "epochs",
    "train_examples",
    "budget_per_epoch",
    "steps",
    "examples_seen",
    "final_val_accuracy",
    "wall_seconds",
    "selection_seconds",
    "selection_share",
]


@dataclass(frozen=True)
class Preset:
    num_examples: int
    epochs: int
    batch_size: int


PRESETS = {
    "default": Preset(num_examples=20_000, epochs=10, batch_size=128),
    "quick": Preset(num_examples=8_000, epochs=5, batch_size=128),
}


# ---------------------------------------------------------------------- arguments


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strategies",
        default="full,random,grace",
        help="comma-separated strategy names (default: full,random,grace); `full` runs at fraction 1.0 as the reference",
    )
    parser.add_argument(
        "--fractions",
        default="0.3",
        help="comma-separated budgets in (0, 1] for every strategy but `full` (default: 0.3)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated integer seeds (default: 0)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per run (default: {PRESETS['default'].epochs}; with --quick {PRESETS['quick'].epochs})",
    )
    parser.add_argument("--out", default="bench_out", help="output directory for runs.csv and runs.json (default: bench_out)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small preset: {PRESETS['quick'].num_examples} examples, {PRESETS['quick'].epochs} epochs",
    )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _dedupe(items: list) -> list:
    seen: list = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


@dataclass(frozen=True)
class BenchConfig:
    strategies: list[str]
    fractions: list[float]
    seeds: list[int]
    epochs: int
    out: str
    preset: str
    num_examples: int
    batch_size: int


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """Turn the parsed strings into a config, or exit 2 through ``parser.error`` naming the option."""
    from grace_lightning import available_strategies

    available = available_strategies()
    strategies = _dedupe(_split(args.strategies))
    if not strategies:
        parser.error(f"argument --strategies: no strategy given; available: {', '.join(available)}")
    unknown = [s for s in strategies if s not in available]
    if unknown:
        parser.error(
            f"argument --strategies: unknown strategy {', '.join(repr(s) for s in unknown)}; "
            f"available: {', '.join(available)}"
        )

    fractions: list[float] = []
    for text in _split(args.fractions):
        try:
            value = float(text)
        except ValueError:
            parser.error(f"argument --fractions: {text!r} is not a number; give fractions in (0, 1], e.g. 0.1,0.3")
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            parser.error(f"argument --fractions: {text} is outside (0, 1]")
        fractions.append(value)
    fractions = _dedupe(fractions)
    if not fractions and any(s != "full" for s in strategies):
        parser.error("argument --fractions: no fraction given; give fractions in (0, 1], e.g. 0.3")

    seeds: list[int] = []
    for text in _split(args.seeds):
        try:
            seeds.append(int(text))
        except ValueError:
            parser.error(f"argument --seeds: {text!r} is not an integer")
    seeds = _dedupe(seeds)
    if not seeds:
        parser.error("argument --seeds: no seed given; give comma-separated integers, e.g. 0,1,2")

    preset_name = "quick" if args.quick else "default"
    preset = PRESETS[preset_name]
    epochs = preset.epochs if args.epochs is None else args.epochs
    if epochs < 1:
        parser.error(f"argument --epochs: must be a positive integer, got {epochs}")

    out = args.out
    problem = _unwritable(out)
    if problem:
        parser.error(f"argument --out: cannot write to {out!r}: {problem}")

    return BenchConfig(
        strategies=strategies,
        fractions=fractions,
        seeds=seeds,
        epochs=epochs,
        out=out,
        preset=preset_name,
        num_examples=preset.num_examples,
        batch_size=preset.batch_size,
    )


def _unwritable(out: str) -> Optional[str]:
    """None if ``out`` is (or can be made) a writable directory, else the reason."""
    if not out:
        return "empty path"
    if os.path.exists(out) and not os.path.isdir(out):
        return "it exists and is not a directory"
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


# ---------------------------------------------------------------------- running


@contextlib.contextmanager
def _quiet_and_restored() -> Iterator[None]:
    """Silence Lightning's per-fit chatter, and undo the global flags ``Trainer(deterministic=True)`` sets."""
    import torch

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*log_every_n_steps.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def run_one(strategy: str, fraction: float, seed: int, config: BenchConfig) -> dict:
    """Train one fresh model on a coreset and return its row (see :data:`RUN_COLUMNS`)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from grace_lightning import CoresetCallback, CoresetSampler
    from grace_lightning.bench.tasks import MixtureConfig, build_model, make_mixture

    data = make_mixture(MixtureConfig(num_examples=config.num_examples), seed)
    model = build_model(data, seed)
    sampler = CoresetSampler(data.train, fraction=fraction, seed=seed)
    train_loader = DataLoader(data.train, batch_size=config.batch_size, sampler=sampler)
    val_loader = DataLoader(data.val, batch_size=1024, shuffle=False)
    callback = CoresetCallback(sampler, strategy=strategy, refresh_every_n_epochs=1, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        benchmark=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    began = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    wall = time.perf_counter() - began
    if not callback.history:
        raise RuntimeError(f"bench: the CoresetCallback recorded no selection in the {strategy!r} run.")
    selection = float(callback.history[-1]["selection_seconds_total"])
    return {
        "strategy": strategy,
        "fraction": fraction,
        "seed": seed,
        "epochs": config.epochs,
        "train_examples": len(data.train),
        "budget_per_epoch": sampler.budget,
        "steps": int(trainer.global_step),
        "examples_seen": int(model.examples_seen),
        "final_val_accuracy": model.accuracy_history[-1] if model.accuracy_history else float("nan"),
        "wall_seconds": wall,
        "selection_seconds": selection,
        "selection_share": selection / wall if wall > 0 else float("nan"),
        "val_accuracy_per_epoch": list(model.accuracy_history),
    }


def warm_up(config: BenchConfig) -> None:
    """One short untimed fit, so that one-off start-up costs (lazy imports, first-call kernel setup)
    do not land in the first timed run's wall clock."""
    from dataclasses import replace

    tiny = replace(config, num_examples=min(config.num_examples, 1_000), epochs=1)
    run_one(config.strategies[0], 1.0 if config.strategies[0] == "full" else config.fractions[0], 0, tiny)


def _plan(config: BenchConfig) -> list[tuple[str, float]]:
    plan: list[tuple[str, float]] = []
    for strategy in config.strategies:
        for fraction in [1.0] if strategy == "full" else config.fractions:
            plan.append((strategy, fraction))
    return plan


# ---------------------------------------------------------------------- reporting


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (strategy, fraction): means over seeds, and the sample std of accuracy."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["fraction"]), []).append(row)
    summary = []
    for (strategy, fraction), runs in groups.items():
        acc = [r["final_val_accuracy"] for r in runs]
        wall = statistics.fmean(r["wall_seconds"] for r in runs)
        sel = statistics.fmean(r["selection_seconds"] for r in runs)
        summary.append(
            {
                "strategy": strategy,
                "fraction": fraction,
                "seeds": len(runs),
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
                "wall_seconds_mean": wall,
                "selection_seconds_mean": sel,
                "selection_share_mean": sel / wall if wall > 0 else float("nan"),
                "examples_seen_mean": statistics.fmean(r["examples_seen"] for r in runs),
            }
        )
    return summary


def format_table(summary: list[dict]) -> str:
    headers = ["strategy", "fraction", "seeds", "accuracy (mean ± std)", "wall s", "selection s", "sel. share", "examples seen"]
    lines = []
    for s in summary:
        std = "n/a" if s["accuracy_std"] is None else f"{s['accuracy_std']:.4f}"
        lines.append(
            [
                s["strategy"],
                f"{s['fraction']:g}",
                str(s["seeds"]),
                f"{s['accuracy_mean']:.4f} ± {std}",
                f"{s['wall_seconds_mean']:.2f}",
                f"{s['selection_seconds_mean']:.4f}",
                f"{100 * s['selection_share_mean']:.2f}%",
                f"{s['examples_seen_mean']:,.0f}",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    left = {0}  # the strategy name is left-aligned, numbers right-aligned

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(line) for line in lines)])


def _environment() -> dict:
    import lightning
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _write(config: BenchConfig, rows: list[dict], summary: list[dict]) -> tuple[str, str]:
    csv_path = os.path.join(config.out, "runs.csv")
    json_path = os.path.join(config.out, "runs.json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump(
            {"config": asdict(config), "environment": _environment(), "runs": rows, "summary": summary},
            f,
            indent=2,
        )
        f.write("\n")
    return csv_path, json_path


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = _validate(args, parser)  # exits 2 before any training
    plan = _plan(config)
    total = len(plan) * len(config.seeds)
    print(
        f"grace-lightning bench: {total} runs, {config.epochs} epochs each, "
        f"{config.num_examples} examples ({config.preset} preset) -> {config.out}",
        flush=True,
    )
    rows: list[dict] = []
    with _quiet_and_restored():
        warm_up(config)
        for strategy, fraction in plan:
            for seed in config.seeds:
                row = run_one(strategy, fraction, seed, config)
                rows.append(row)
                print(
                    f"  [{len(rows)}/{total}] {strategy} fraction={fraction:g} seed={seed}: "
                    f"accuracy {row['final_val_accuracy']:.4f}, {row['wall_seconds']:.2f} s",
                    flush=True,
                )
    summary = summarize(rows)
    print()
    print(format_table(summary))
    csv_path, json_path = _write(config, rows, summary)
    from grace_lightning.bench.plots import write_plots  # matplotlib only once there is something to plot

    plots = write_plots(rows, config.out)
    print(f"\nwrote {csv_path}, {json_path} and {', '.join(plots)}")
    return 0


# ---------------------------------------------------------------------- entry points


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``grace-lightning COMMAND ...``; the only command so far is ``bench``."""
    parser = argparse.ArgumentParser(
        prog="grace-lightning", description="grace-lightning: dynamic coreset training for PyTorch Lightning."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="train the demo task once per strategy, fraction and seed; report accuracy and cost",
        description=__doc__.split("\n\n")[1],
    )
    _add_bench_arguments(bench)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _run_bench(args, bench)


def bench_main(argv: Optional[Sequence[str]] = None, prog: str = "python -m grace_lightning.bench") -> int:
    """The ``bench`` command on its own (``python -m grace_lightning.bench ...``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1])
    _add_bench_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return _run_bench(args, parser)


if __name__ == "__main__":
    sys.exit(main())
