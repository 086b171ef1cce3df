"""Per-step overhead of CoresetSampler + CoresetCallback against a plain shuffled DataLoader.

Both setups train the same MLP (grace_lightning.bench.tasks) on the same generated data for the same number
of steps: the coreset one uses ``CoresetSampler(fraction=1.0)`` and ``CoresetCallback(strategy="random")``
refreshed every epoch, so it draws a fresh "subset" (a permutation of the whole pool) each epoch and
does all of its per-batch bookkeeping, while training on exactly as many batches as the plain one.

Timing: the wall clock of the whole ``trainer.fit`` (selection cost included) divided by the steps
trained; the same for the training loop alone (first batch to end of training); and the fit's process
CPU time per step, which other jobs on the machine disturb less. Each is the median over ``--repeats`` fits
after ``--warmup`` untimed ones, the two setups interleaved (order alternating each repeat) so that drift
in machine load hits both alike. The overhead is given as the ratio of the two medians and as the median
of the per-repeat ratios (each repeat's two fits ran back to back); the target verdict is given only when
the paired ratios' interquartile range lies wholly on one side of it. The sampler alone is timed too:
iterating ``iter(sampler)`` against ``torch.utils.data.RandomSampler`` over the same number of indices.

    python benchmarks/overhead.py                 # table on stdout, JSON in benchmarks/results/overhead.json
    python benchmarks/overhead.py --repeats 15 --out /tmp/overhead.json

Target: overhead under 1% of the step time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from grace_lightning import CoresetCallback, CoresetSampler
from grace_lightning.bench.tasks.mixture import MixtureConfig, build_model, make_mixture
from grace_lightning.sampler import LoaderPosition

TARGET_PERCENT = 1.0


class LoopTimer(L.Callback):
    """Wall clock of the training loop alone (from the first batch's start to the end of training)."""

    def __init__(self) -> None:
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()


def one_fit(setup: str, data, args) -> dict:
    model = build_model(data, seed=0)
    timer = LoopTimer()
    callbacks: list[L.Callback] = [timer]
    if setup == "plain":
        loader = DataLoader(
            data.train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
    else:
        sampler = CoresetSampler(data.train, fraction=1.0, seed=0)
        loader = DataLoader(data.train, batch_size=args.batch_size, sampler=sampler)
        callbacks.append(CoresetCallback(sampler, strategy="random", refresh_every_n_epochs=1, seed=0))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    began, began_cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    wall, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    steps = int(trainer.global_step)
    return {
        "steps": steps,
        "fit_ms_per_step": 1e3 * wall / steps,
        "fit_cpu_ms_per_step": 1e3 * cpu / steps,
        "loop_ms_per_step": 1e3 * (timer.end - timer.start) / steps,
    }


def time_iteration(make_iterable, repeats: int) -> list[float]:
    """Seconds to exhaust a fresh iterator, per repeat (one untimed pass first)."""
    times = []
    for r in range(repeats + 1):
        iterable = make_iterable()
        began = time.perf_counter()
        for _ in iterable:
            pass
        if r:
            times.append(time.perf_counter() - began)
    return times


def sampler_alone(data, args) -> dict:
    n = len(data.train)
    bound = CoresetSampler(data.train, fraction=1.0, seed=0)
    # As CoresetCallback binds it in training: batch by batch at the DataLoader's batch size.
    bound.bind(0, 1, lambda: LoaderPosition(0, args.batch_size, False))
    unbound = CoresetSampler(data.train, fraction=1.0, seed=0)  # plain PyTorch use, no callback
    plain = RandomSampler(data.train, generator=torch.Generator().manual_seed(0))
    assert len(bound) == len(unbound) == len(plain) == n
    result = {"indices_per_pass": n}
    for name, make in (
        ("random_sampler", lambda: iter(plain)),
        ("coreset_sampler_bound", lambda: iter(bound)),
        ("coreset_sampler_unbound", lambda: iter(unbound)),
    ):
        times = time_iteration(make, args.repeats)
        result[name] = {"us_per_index": 1e6 * statistics.median(times) / n, "seconds": times}
    # The callback's per-step lookup of the batch's indices and weights (on_train_batch_start).
    nb = bound.batches_per_epoch(args.batch_size)
    times = time_iteration(lambda: (bound.batch_indices(b, args.batch_size) for b in range(nb)), args.repeats)
    result["batch_indices_lookup"] = {"us_per_call": 1e6 * statistics.median(times) / nb, "seconds": times}
    return result


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed fits per setup (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed fits per setup first (default 1)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (default 3)")
    parser.add_argument("--examples", type=int, default=20_000, help="generated examples, 80%% trained on (default 20000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args(argv)
    for name in ("repeats", "epochs", "examples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be positive")
    if args.warmup < 0:
        parser.error("argument --warmup: must be >= 0")
    if args.threads < 0:
        parser.error("argument --threads: must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    data = make_mixture(MixtureConfig(num_examples=args.examples), seed=0)
    runs: dict[str, list[dict]] = {"plain": [], "coreset": []}
    for r in range(args.warmup + args.repeats):
        order = ("plain", "coreset") if r % 2 == 0 else ("coreset", "plain")
        for setup in order:
            result = one_fit(setup, data, args)
            if r >= args.warmup:
                runs[setup].append(result)
        print(f"  repeat {r + 1}/{args.warmup + args.repeats}{' (warm-up)' if r < args.warmup else ''}", file=sys.stderr)
    steps = {s: runs[s][0]["steps"] for s in runs}
    assert steps["plain"] == steps["coreset"], steps

    summary = {}
    for metric in ("fit_ms_per_step", "loop_ms_per_step", "fit_cpu_ms_per_step"):
        plain = statistics.median(x[metric] for x in runs["plain"])
        coreset = statistics.median(x[metric] for x in runs["coreset"])
        # Each repeat's two fits ran back to back: the median of their ratios cancels slow drift in load.
        ratios = sorted(c[metric] / p[metric] - 1 for p, c in zip(runs["plain"], runs["coreset"]))
        paired = statistics.median(ratios)
        q1, q3 = (statistics.quantiles(ratios, n=4, method="inclusive")[i] for i in (0, 2)) if len(ratios) > 1 else (paired, paired)
        summary[metric] = {
            "plain": plain,
            "coreset": coreset,
            "overhead_ms": coreset - plain,
            "overhead_percent": 100 * (coreset - plain) / plain,
            "paired_overhead_percent": 100 * paired,
            "paired_overhead_percent_q1_q3": [100 * q1, 100 * q3],
            "plain_spread_percent": 100 * (max(x[metric] for x in runs["plain"]) / plain - 1),
        }
    alone = sampler_alone(data, args)

    fit = summary["fit_ms_per_step"]
    columns = [("fit wall", "fit_ms_per_step"), ("loop wall", "loop_ms_per_step"), ("fit CPU", "fit_cpu_ms_per_step")]
    rows = [
        ("plain DataLoader(shuffle=True), ms/step", [f"{summary[m]['plain']:.3f}" for _, m in columns]),
        ('CoresetSampler + CoresetCallback("random"), ms/step', [f"{summary[m]['coreset']:.3f}" for _, m in columns]),
        ("overhead, ms/step", [f"{summary[m]['overhead_ms']:+.3f}" for _, m in columns]),
        ("overhead, ratio of the medians", [f"{summary[m]['overhead_percent']:+.2f}%" for _, m in columns]),
        ("overhead, median of paired ratios", [f"{summary[m]['paired_overhead_percent']:+.2f}%" for _, m in columns]),
    ]
    w0 = max(len(r[0]) for r in rows)
    print(f"\n{steps['plain']} steps per fit (batch {args.batch_size}, {args.epochs} epochs, "
          f"{torch.get_num_threads()} torch threads), median of {args.repeats} fits per setup after "
          f"{args.warmup} warm-up, interleaved")
    print(f"{'':<{w0}}" + "".join(f"  {name:>10}" for name, _ in columns))
    print("-" * w0 + "".join(f"  {'-' * 10}" for _ in columns))
    for name, cells in rows:
        print(f"{name:<{w0}}" + "".join(f"  {c:>10}" for c in cells))
    print(f"\nsampler alone, {alone['indices_per_pass']} indices per pass, median of {args.repeats}:")
    for key, label in (
        ("random_sampler", "RandomSampler"),
        ("coreset_sampler_bound", f"CoresetSampler, bound as in training (batch {args.batch_size})"),
        ("coreset_sampler_unbound", "CoresetSampler, unbound (plain PyTorch use)"),
    ):
        print(f"  {label:<58} {alone[key]['us_per_index']:8.3f} us/index")
    print(f"  {'CoresetSampler.batch_indices (the callback, once a step)':<58} "
          f"{alone['batch_indices_lookup']['us_per_call']:8.1f} us/call")
    # A verdict only when the paired ratios' interquartile range lies wholly on one side of the target.
    q1, q3 = fit["paired_overhead_percent_q1_q3"]
    verdict = "met" if q3 < TARGET_PERCENT else "NOT met" if q1 > TARGET_PERCENT else "inconclusive (noise)"
    print(f"\npaired overhead, interquartile range: [{q1:+.2f}%, {q3:+.2f}%]; "
          f"slowest plain fit {fit['plain_spread_percent']:+.1f}% above the median")
    print(f"target: overhead < {TARGET_PERCENT:g}% of step time (fit wall clock): {verdict}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": vars(args),
        "environment": environment(),
        "steps_per_fit": steps["plain"],
        "summary": summary,
        "target_percent": TARGET_PERCENT,
        "verdict": verdict,
        "sampler_alone": alone,
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
