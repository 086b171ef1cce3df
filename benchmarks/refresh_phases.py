"""Where one fit's selection time goes, refresh by refresh: the callback's own phase timings.

Trains one bench run (``grace_lightning.bench.runner.build_single_run``: the bench's data, model, batch size, cosine
schedule and per-epoch validation; selection synchronous, so every second is on the training thread) and
prints, for every refresh, its seconds split into the phases the callback and the strategy record: the scoring
pass, probes, the strategy's own work and its parts (GRACE: graph build or repair, propagation, the greedy or
the draw; GRIP: the intra-cluster density).

    python benchmarks/refresh_phases.py --strategy grace
    python benchmarks/refresh_phases.py --strategy grace --kwargs '{"selector": "sample"}'
    python benchmarks/refresh_phases.py --strategy grip

Writes ``benchmarks/results/refresh_phases/<strategy>[-<label>]-<task>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.runner import build_single_run, quiet_and_restored  # noqa: E402

# What a record holds besides the phases: counts and the running totals.
COUNTS = ("refresh", "scored", "anchors", "moved", "clusters", "probe_examples")


def run(
    task_name: str, options: dict, strategy: str, kwargs: dict, epochs: int, fraction: float, seed: int, warmup: int
) -> list[dict]:
    with quiet_and_restored():  # Trainer(deterministic=True) sets global flags when it is built
        built = build_single_run(
            task_name, strategy, fraction, seed, epochs, task_options=options, strategy_kwargs=kwargs,
            warmup_epochs=warmup,
        )
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    return [
        {k: v for k, v in record.items() if k.endswith("seconds") or k in COUNTS}
        for record in built.callback.history
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion-mnist-noisy")
    parser.add_argument("--options", default='{"noise": 0.3}', help="task options, JSON")
    parser.add_argument("--strategy", default="grace")
    parser.add_argument("--kwargs", default="{}", help="strategy settings, JSON")
    parser.add_argument("--label", default="", help="added to the output's name (e.g. 'sample')")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-epochs", type=int, default=0, help="epochs streamed over the whole pool first")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = run(args.task, json.loads(args.options), args.strategy, json.loads(args.kwargs), args.epochs,
                  args.fraction, args.seed, args.warmup_epochs)
    name = "-".join(part for part in (args.strategy, args.label, args.task) if part)
    out = args.out or str(Path(__file__).parent / "results" / "refresh_phases" / f"{name}.json")
    command = (
        f"python benchmarks/refresh_phases.py --task {args.task} --options '{args.options}' --strategy {args.strategy} "
        f"--kwargs '{args.kwargs}' --epochs {args.epochs} --fraction {args.fraction} --seed {args.seed}"
        + (f" --warmup-epochs {args.warmup_epochs}" if args.warmup_epochs else "")
    )
    write_report(out, command, {"records": records})
    for record in records:
        cells = ", ".join(f"{k} {v:.3f}" if k.endswith("seconds") else f"{k} {v:g}" for k, v in record.items()
                          if k != "selection_seconds_total")
        print(cells)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
