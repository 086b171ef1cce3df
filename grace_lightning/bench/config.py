"""The benchmark's options: command-line arguments, an optional config file, and their validation.

A comparison is described by the options below, on the command line or in a JSON/TOML file given with
``--config`` (keys are the option names without dashes; options given on the command line win)::

    # compare.toml
    task = "fashion-mnist"
    strategies = ["full", "random", "infobatch", "el2n", "grace"]
    fractions = [0.1, 0.3, 0.5]
    seeds = [0, 1, 2]
    out = "bench_out/fashion"

    [strategy_kwargs.el2n]
    score_epoch = 1

Everything is validated before any training; a bad value exits with code 2 and a message naming the option.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from grace_lightning.validation import is_int

__all__ = ["BenchConfig", "DEFAULT_TASK", "add_arguments", "resolve"]

DEFAULT_TASK = "fashion-mnist"
DEFAULT_STRATEGIES = ["full", "random", "infobatch", "el2n", "grace", "grip", "group_mates", "gip"]
DEFAULT_FRACTIONS = {"quick": [0.3], "default": [0.1, 0.3, 0.5]}
DEFAULT_SEEDS = {"quick": [0], "default": [0, 1, 2]}
_FILE_KEYS = {"task", "strategies", "fractions", "seeds", "epochs", "out", "quick", "strategy_kwargs"}


@dataclass(frozen=True)
class BenchConfig:
    """One validated comparison: every (strategy, fraction) at every seed, on one task."""

    task: str
    strategies: list[str]
    fractions: list[float]
    seeds: list[int]
    epochs: int
    out: str
    preset: str  # "quick" or "default": which of the task's sizes
    train_examples: Optional[int]
    val_examples: Optional[int]
    strategy_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grace_lightning.bench.tasks import available_tasks

    # Defaults are None here and filled in by `resolve`, so that a config file can supply any of them.
    parser.add_argument("--config", default=None, help="JSON or TOML file describing the comparison (options win over it)")
    parser.add_argument(
        "--task", default=None, help=f"one of {', '.join(available_tasks())} (default: {DEFAULT_TASK})"
    )
    parser.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated strategy names (default: {','.join(DEFAULT_STRATEGIES)}); "
        "`full` runs once at fraction 1.0 as the reference",
    )
    parser.add_argument(
        "--fractions",
        default=None,
        help="comma-separated budgets in (0, 1] for every strategy but `full` (default: 0.1,0.3,0.5; with --quick 0.3)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated integer seeds (default: 0,1,2; with --quick 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the task's size)")
    parser.add_argument("--out", default=None, help="output directory (default: bench_out/<task>)")
    parser.add_argument(
        "--quick", action="store_true", default=None, help="the task's small size, one seed, fraction 0.3: minutes on 2 cores"
    )


def _split(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _dedupe(items: list) -> list:
    seen: list = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _load_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        if path.endswith(".toml"):
            import tomllib  # Python >= 3.11

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except ImportError:
        parser.error(f"argument --config: TOML needs Python >= 3.11; give {path!r} as JSON instead")
    except OSError as error:
        parser.error(f"argument --config: cannot read {path!r}: {error.strerror or error}")
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        parser.error(f"argument --config: {path!r} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {error}")
    if not isinstance(data, dict):
        parser.error(f"argument --config: {path!r} must hold a table/object of options")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        parser.error(
            f"argument --config: unknown key {', '.join(repr(k) for k in unknown)} in {path!r}; "
            f"known keys: {', '.join(sorted(_FILE_KEYS))}"
        )
    return data


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    """Merge the config file and the options, check every value, and return the config.

    Exits with code 2 through ``parser.error`` (naming the option) on the first bad value, before any training.
    """
    from grace_lightning import available_strategies
    from grace_lightning.bench.tasks import TaskUnavailable, available_tasks, get_task

    file = _load_file(args.config, parser) if args.config else {}

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return file.get(name) if value is None else value

    quick = bool(pick("quick"))
    preset = "quick" if quick else "default"

    task_name = pick("task") or DEFAULT_TASK
    if task_name not in available_tasks():
        parser.error(f"argument --task: unknown task {task_name!r}; available: {', '.join(available_tasks())}")
    task = get_task(task_name)
    try:
        task.check_available()
    except TaskUnavailable as error:
        parser.error(f"argument --task: {task_name!r} cannot run here: {error}")

    available = available_strategies()
    raw = pick("strategies")
    strategies = _dedupe(_split(raw)) if raw is not None else list(DEFAULT_STRATEGIES)
    if not strategies:
        parser.error(f"argument --strategies: no strategy given; available: {', '.join(available)}")
    unknown = [s for s in strategies if s not in available]
    if unknown:
        parser.error(
            f"argument --strategies: unknown strategy {', '.join(repr(s) for s in unknown)}; "
            f"available: {', '.join(available)}"
        )

    raw = pick("fractions")
    fractions: list[float] = []
    for text in _split(raw) if raw is not None else [str(f) for f in DEFAULT_FRACTIONS[preset]]:
        try:
            value = float(text)
        except ValueError:
            parser.error(f"argument --fractions: {text!r} is not a number; give fractions in (0, 1], e.g. 0.1,0.3")
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            parser.error(f"argument --fractions: {text} is outside (0, 1]; give fractions in (0, 1], e.g. 0.1,0.3")
        fractions.append(value)
    fractions = _dedupe(fractions)
    if not fractions and any(s != "full" for s in strategies):
        parser.error("argument --fractions: no fraction given; give fractions in (0, 1], e.g. 0.3")

    raw = pick("seeds")
    seeds: list[int] = []
    for text in _split(raw) if raw is not None else [str(s) for s in DEFAULT_SEEDS[preset]]:
        try:
            seeds.append(int(text))
        except ValueError:
            parser.error(f"argument --seeds: {text!r} is not an integer; give comma-separated integers, e.g. 0,1,2")
    seeds = _dedupe(seeds)
    if not seeds:
        parser.error("argument --seeds: no seed given; give comma-separated integers, e.g. 0,1,2")

    size = task.sizes[preset]
    epochs = pick("epochs")
    if epochs is None:
        epochs = size.epochs
    if not is_int(epochs) or epochs < 1:
        parser.error(f"argument --epochs: must be a positive integer, got {epochs!r}")

    strategy_kwargs = file.get("strategy_kwargs", {})
    if not isinstance(strategy_kwargs, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in strategy_kwargs.items()
    ):
        parser.error("argument --config: `strategy_kwargs` must map strategy names to tables of keyword arguments")
    stray = sorted(set(strategy_kwargs) - set(strategies))
    if stray:
        parser.error(f"argument --config: `strategy_kwargs` names {', '.join(map(repr, stray))}, which is not in --strategies")
    from grace_lightning.strategies.base import build_strategy

    for name, kwargs in strategy_kwargs.items():
        try:
            build_strategy(name, **kwargs)
        except ValueError as error:
            parser.error(f"argument --config: strategy_kwargs.{name}: {error}")

    out = pick("out") or os.path.join("bench_out", task_name + ("-quick" if quick else ""))
    problem = _unwritable(out)
    if problem:
        parser.error(f"argument --out: cannot write to {out!r}: {problem}")

    return BenchConfig(
        task=task_name,
        strategies=strategies,
        fractions=fractions,
        seeds=seeds,
        epochs=epochs,
        out=out,
        preset=preset,
        train_examples=size.train_examples,
        val_examples=size.val_examples,
        strategy_kwargs={k: dict(v) for k, v in strategy_kwargs.items()},
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
