"""The benchmark's options: command-line arguments, an optional config file, and their validation.

A comparison is described by the options below, on the command line or in a JSON/TOML file given with
``--config`` (keys are the option names without dashes; options given on the command line win)::

    # compare.toml
    task = "fashion-mnist"
    strategies = ["full", "random", "infobatch", "el2n", "grace"]
    fractions = [0.1, 0.3, 0.5]
    seeds = [0, 1, 2]
    out = "bench_out/fashion"

    preset = "long"              # the task's long-training size ("quick", "default" or "long")
    lr_schedule = "cosine"       # the same schedule for every strategy, sized to each fit's steps
    refresh_every = 1            # the callback's settings, the same for every strategy
    precision = "bf16-mixed"     # the Trainer's precision (default "32-true"); bf16 needs a GPU or a recent CPU
    scoring_batch_size = 1024    # the callback's scoring batch (default: the callback's, twice the training batch)
    capture = false              # no free capture of signals on training batches (default true)
    evals_per_epoch = 4          # validate about 4 times an epoch (default 1: at each epoch's end)
    task_options = { noise = 0.3 }

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
from typing import Any, Optional, Union

from grace_lightning.validation import is_int

__all__ = ["BenchConfig", "DEFAULT_TASK", "PRESETS", "add_arguments", "load_file", "resolve"]

DEFAULT_TASK = "fashion-mnist"
DEFAULT_STRATEGIES = ["full", "random", "infobatch", "el2n", "grace", "grip", "group_mates", "gip"]
PRESETS = ("quick", "default", "long", "gpu")
DEFAULT_FRACTIONS = {"quick": [0.3], "default": [0.1, 0.3, 0.5], "long": [0.1, 0.3, 0.5], "gpu": [0.1, 0.3, 0.5]}
DEFAULT_SEEDS = {"quick": [0], "default": [0, 1, 2], "long": [0, 1, 2], "gpu": [0, 1, 2]}
LR_SCHEDULES = ("cosine", "constant")
OVERLAP_MODES = ("auto", "on", "off")
# The Trainer precisions the bench passes through. The 16-bit float ones run on a GPU only (Lightning refuses them
# on the CPU); bf16 runs anywhere, slowly on a CPU without bf16 instructions.
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
_GPU_ONLY_PRECISIONS = ("16-mixed", "16-true")
_FILE_KEYS = {
    "task", "strategies", "fractions", "seeds", "epochs", "out", "quick", "preset", "strategy_kwargs", "task_options",
    "lr_schedule", "refresh_every", "warmup_epochs", "anneal_epochs", "max_selection_share",
    "overlap", "precision", "scoring_batch_size", "capture", "evals_per_epoch",
}


@dataclass(frozen=True)
class BenchConfig:
    """One validated comparison: every (strategy, fraction) at every seed, on one task."""

    task: str
    strategies: list[str]
    fractions: list[float]
    seeds: list[int]
    epochs: int
    out: str
    preset: str  # "quick", "default" or "long": which of the task's sizes
    train_examples: Optional[int]
    val_examples: Optional[int]
    strategy_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)  # as given; the task fills in its defaults
    lr_schedule: str = "cosine"
    # The CoresetCallback's schedule and overhead budget: the same for every strategy of a comparison.
    refresh_every: int = 1
    warmup_epochs: int = 0
    anneal_epochs: int = 0
    # None = no budget; "default" = whatever CoresetCallback defaults to.
    max_selection_share: Union[float, str, None] = "default"
    overlap: str = "auto"  # the callback's `overlap`: "auto", "on" or "off"
    precision: str = "32-true"  # the Trainer's `precision`, the same for every run (the scoring pass follows it)
    scoring_batch_size: Optional[int] = None  # the callback's `scoring_batch_size`; None: the callback's default
    capture: bool = True  # the callback's `capture_training_signals`
    # Validations an epoch (about; see `evaluation_interval`): more points put random's frontier nearer each run's
    # seconds, so a gain at equal wall clock depends less on where random's evaluations happened to fall.
    evals_per_epoch: int = 1


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
    parser.add_argument(
        "--preset", default=None, help=f"the task's size: one of {', '.join(PRESETS)} (default: default; --quick = quick)"
    )
    parser.add_argument(
        "--task-option", action="append", default=None, metavar="NAME=VALUE", dest="task_options",
        help="a task option, e.g. noise=0.3 (repeatable; each task's options are in its module's docstring)",
    )
    parser.add_argument(
        "--lr-schedule", default=None, help="learning-rate schedule of every fit: cosine (to zero over the fit's "
        "steps; the default) or constant",
    )
    parser.add_argument("--refresh-every", type=int, default=None, help="refresh the coreset every N epochs (default 1)")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="epochs on the whole pool first (default 0)")
    parser.add_argument("--anneal-epochs", type=int, default=None, help="epochs on the whole pool last (default 0)")
    parser.add_argument(
        "--max-selection-share", default=None, help="the callback's overhead budget, a share in (0, 1) or `none` "
        "(default: the callback's own default)",
    )
    parser.add_argument(
        "--overlap", default=None, help="the callback's overlapped selection: auto (the default: on for grace, grip, "
        "group_mates and gip), on, or off (training waits for every selection)",
    )
    parser.add_argument(
        "--precision", default=None, help=f"the Trainer's precision for every run: one of {', '.join(PRECISIONS)} "
        "(default 32-true); the scoring pass and probes run under the same autocast",
    )
    parser.add_argument(
        "--scoring-batch-size", default=None, help="the callback's batch size for the scoring pass, probe evaluations "
        "and reference scoring, the same for every run (default: the callback's, twice the training batch)",
    )
    parser.add_argument(
        "--evals-per-epoch", default=None, help="validate about this many times an epoch, the last at the fit's end "
        "(default 1: at every epoch's end); more points make 'at equal wall clock' read random's frontier nearer "
        "each run's seconds, and cost validation time, which the training seconds leave out",
    )
    parser.add_argument(
        "--capture", default=None, help="on (the default) or off: the callback's free capture of signals on training "
        "batches (`capture_training_signals`); off, every signal comes from scoring passes",
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


def load_file(path: str, parser: argparse.ArgumentParser, option: str = "--config") -> dict[str, Any]:
    """A JSON or TOML file's top-level table; a file that cannot be read or parsed exits 2 naming ``option``."""
    try:
        if path.endswith(".toml"):
            import tomllib  # Python >= 3.11

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except ImportError:
        parser.error(f"argument {option}: TOML needs Python >= 3.11; give {path!r} as JSON instead")
    except OSError as error:
        parser.error(f"argument {option}: cannot read {path!r}: {error.strerror or error}")
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        parser.error(f"argument {option}: {path!r} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {error}")
    if not isinstance(data, dict):
        parser.error(f"argument {option}: {path!r} must hold a table/object of options")
    return data


def _check_keys(data: dict, where: str, parser: argparse.ArgumentParser) -> None:
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        parser.error(
            f"argument --config: unknown key {', '.join(repr(k) for k in unknown)} in {where}; "
            f"known keys: {', '.join(sorted(_FILE_KEYS))}"
        )


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser, file: Optional[dict] = None) -> BenchConfig:
    """Merge the config file (or the given ``file`` table) and the options, check every value, return the config.

    Exits with code 2 through ``parser.error`` (naming the option) on the first bad value, before any training.
    """
    from grace_lightning import available_strategies
    from grace_lightning.bench.tasks import TaskUnavailable, available_tasks, get_task

    if file is None:
        file = load_file(args.config, parser) if getattr(args, "config", None) else {}
        _check_keys(file, repr(args.config), parser)
    else:
        _check_keys(file, "the suite's comparison", parser)

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return file.get(name) if value is None else value

    quick = bool(pick("quick"))
    preset = pick("preset")
    if preset is not None and preset not in PRESETS:
        parser.error(f"argument --preset: unknown preset {preset!r}; give one of {', '.join(PRESETS)}")
    if quick and preset not in (None, "quick"):
        parser.error(f"argument --quick: conflicts with --preset {preset}; give one of them")
    preset = "quick" if quick else (preset or "default")

    task_name = pick("task") or DEFAULT_TASK
    if task_name not in available_tasks():
        parser.error(f"argument --task: unknown task {task_name!r}; available: {', '.join(available_tasks())}")
    task_options = _task_options(args.task_options, file.get("task_options"), parser)
    try:
        task = get_task(task_name, **task_options)
    except ValueError as error:
        parser.error(f"argument --task-option: {error}")
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

    if preset not in task.sizes:
        parser.error(f"argument --preset: task {task_name!r} has no {preset!r} size; it has {', '.join(task.sizes)}")
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

    lr_schedule = pick("lr_schedule") or "cosine"
    if lr_schedule not in LR_SCHEDULES:
        parser.error(f"argument --lr-schedule: unknown schedule {lr_schedule!r}; give one of {', '.join(LR_SCHEDULES)}")
    schedule = {}
    for name, low, default in (("refresh_every", 1, 1), ("warmup_epochs", 0, 0), ("anneal_epochs", 0, 0)):
        value = pick(name)
        value = default if value is None else value
        if not is_int(value) or value < low:
            parser.error(f"argument --{name.replace('_', '-')}: must be an integer >= {low}, got {value!r}")
        schedule[name] = int(value)
    if schedule["warmup_epochs"] + schedule["anneal_epochs"] >= epochs:
        parser.error(
            f"argument --warmup-epochs: warm-up ({schedule['warmup_epochs']}) and anneal ({schedule['anneal_epochs']}) "
            f"epochs leave no coreset epoch of {epochs}; lower them or raise --epochs"
        )
    share = pick("max_selection_share")
    share = "default" if share is None else share
    if isinstance(share, str) and share.strip().lower() in ("none", "default"):
        share = None if share.strip().lower() == "none" else "default"
    if share not in (None, "default"):
        try:
            share = float(share)
        except (TypeError, ValueError):
            share = math.nan
        if not 0.0 < share < 1.0:
            parser.error(f"argument --max-selection-share: must be a share in (0, 1) or `none`, got {pick('max_selection_share')!r}")
    overlap = str(pick("overlap") or "auto").strip().lower()
    if overlap not in OVERLAP_MODES:
        parser.error(f"argument --overlap: must be one of {', '.join(OVERLAP_MODES)}, got {pick('overlap')!r}")
    precision = str(pick("precision") or "32-true").strip()
    if precision not in PRECISIONS:
        parser.error(f"argument --precision: must be one of {', '.join(PRECISIONS)}, got {pick('precision')!r}")
    if precision in _GPU_ONLY_PRECISIONS:
        import torch

        if not torch.cuda.is_available():
            parser.error(f"argument --precision: {precision} needs a CUDA GPU and none is visible; use bf16-mixed or 32-true")
    scoring_batch_size = pick("scoring_batch_size")
    if scoring_batch_size is not None:
        try:
            scoring_batch_size = int(str(scoring_batch_size).strip())
        except ValueError:
            scoring_batch_size = 0
        if scoring_batch_size < 1:
            parser.error(
                f"argument --scoring-batch-size: must be a positive integer (e.g. 1024), got {pick('scoring_batch_size')!r}"
            )
    evals_per_epoch = pick("evals_per_epoch")
    evals_per_epoch = 1 if evals_per_epoch is None else evals_per_epoch
    try:
        evals_per_epoch = int(str(evals_per_epoch).strip())
    except ValueError:
        evals_per_epoch = 0
    if evals_per_epoch < 1:
        parser.error(f"argument --evals-per-epoch: must be a positive integer (e.g. 4), got {pick('evals_per_epoch')!r}")
    capture = pick("capture")
    capture = True if capture is None else capture
    if not isinstance(capture, bool):
        word = str(capture).strip().lower()
        if word not in ("on", "off", "true", "false"):
            parser.error(f"argument --capture: must be on or off, got {pick('capture')!r}")
        capture = word in ("on", "true")

    # Data that cannot be built for these options (e.g. too little text for a mixture share) stop here too.
    from grace_lightning.bench.tasks import TaskSize

    try:
        task.make_data(TaskSize(size.train_examples, size.val_examples, epochs), seed=0)
    except (TaskUnavailable, ValueError) as error:
        parser.error(f"argument --task-option: {task_name!r} cannot build its data: {error}")

    suffix = "" if preset == "default" else f"-{preset}"
    out = pick("out") or os.path.join("bench_out", task_name + suffix)
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
        task_options=task_options,
        lr_schedule=lr_schedule,
        max_selection_share=share,
        overlap=overlap,
        precision=precision,
        scoring_batch_size=scoring_batch_size,
        capture=capture,
        evals_per_epoch=evals_per_epoch,
        **schedule,
    )


def _task_options(given: Optional[list[str]], from_file: Any, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--task-option name=value`` items over the file's ``task_options`` table (values stay strings: the task
    converts and checks them)."""
    if from_file is None:
        options: dict[str, Any] = {}
    elif isinstance(from_file, dict):
        options = dict(from_file)
    else:
        parser.error("argument --config: `task_options` must be a table of option names to values")
    for item in given or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"argument --task-option: {item!r} is not NAME=VALUE, e.g. noise=0.3")
        options[name.strip()] = value.strip()
    return options


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
