"""Whether GRACE's training steps run slower than random's: the median seconds of a training step, epoch by epoch.

A callback put first in the Trainer's list times each step from its ``on_train_batch_start`` to its
``on_train_batch_end``: forward, backward and optimizer step, but not the coreset callback's end-of-batch work
(the free capture and the refreshes, which the bench reports on their own). Random, GRACE and GRACE without capture
run in turn, ``--rounds`` times, on one bench task (budget 0.5, seed 0).

    python benchmarks/step_times.py --rounds 2

Writes ``benchmarks/results/step_times.json`` (or ``--out``). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.runner import build_single_run, quiet_and_restored  # noqa: E402

SETUPS = [("random", "random", True), ("grace", "grace", True), ("grace, no capture", "grace", False)]


class StepTimer(L.Callback):
    """Milliseconds of every training step, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, list[float]] = {}
        self._began = 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.by_epoch.setdefault(trainer.current_epoch, []).append(1000 * (time.perf_counter() - self._began))


def step_times(task: str, strategy: str, capture: bool, fraction: float, epochs: int) -> list[float]:
    with quiet_and_restored():
        built = build_single_run(task, strategy, fraction, 0, epochs)
        built.callback.capture_training_signals = capture
        timer = StepTimer()
        built.trainer.callbacks.insert(0, timer)  # first: its end hook runs before the coreset callback's
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    return [statistics.median(times) for _, times in sorted(timer.by_epoch.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_times.json"))
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for name, strategy, capture in SETUPS:
            medians = step_times(args.task, strategy, capture, args.fraction, args.epochs)
            rows.append({"round": round_, "setup": name, "median_step_ms_by_epoch": medians})
            print(f"round {round_} {name:18s} " + " ".join(f"{m:5.2f}" for m in medians) + " ms", flush=True)
    command = " ".join(["python", "benchmarks/step_times.py", *sys.argv[1:]])
    write_report(args.out, command, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
