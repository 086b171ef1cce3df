"""What the free training signals cost: the training loop's seconds outside selection, with and without capture.

GRACE reads each training batch's per-example loss, gradient norm and embedding (captured by hooks on the
model's forward pass, so examples trained on need no rescoring). That work runs inside training steps, so the
bench counts it in "train s" but not in "selection s". This benchmark separates it: three setups on one bench
task, the same budget and seed, interleaved over ``--repeats`` rounds, the order rotated every round (the
median is reported):

* ``random``: no signals, nothing captured;
* ``grace``: GRACE at its defaults, capturing the training batches' signals;
* ``grace, no capture``: ``capture_training_signals=False``, so the scoring passes measure what capture would have.

For each: the fit's training seconds (validation excluded), its selection seconds (scoring passes included), and
the difference, the training loop's own seconds. Capture's cost is ``grace`` minus ``grace, no capture`` in
that last column (the same subsets' sizes; only where each example's signals come from differs).

    python benchmarks/capture_cost.py --repeats 6           # fashion-mnist-noisy, budget 0.3, 5 epochs

Writes ``benchmarks/results/capture_cost.json``. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.runner import build_single_run, quiet_and_restored  # noqa: E402

SETUPS = [("random", "random", True), ("grace", "grace", True), ("grace, no capture", "grace", False)]


def fit_once(task_name: str, options: dict, strategy: str, capture: bool, fraction: float, epochs: int, seed: int) -> dict:
    with quiet_and_restored():
        built = build_single_run(task_name, strategy, fraction, seed, epochs, task_options=options)
        built.callback.capture_training_signals = capture
        began = time.perf_counter()
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
        train = time.perf_counter() - began - built.clock.validation_seconds  # as the bench counts it
    selection = float(built.callback.history[-1]["selection_seconds_total"])
    return {"train_seconds": train, "selection_seconds": selection, "loop_seconds": train - selection,
            "steps": int(built.trainer.global_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion-mnist-noisy")
    parser.add_argument("--options", default='{"noise": 0.3}', help="task options, JSON")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture_cost.json"))
    args = parser.parse_args()
    options = json.loads(args.options)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in SETUPS}
    for round_ in range(args.repeats):
        # Rotate the order every round: a machine that speeds up or slows down within a round would otherwise
        # favour whichever setup runs in the same place each time.
        shift = round_ % len(SETUPS)
        for name, strategy, capture in SETUPS[shift:] + SETUPS[:shift]:
            runs[name].append(fit_once(args.task, options, strategy, capture, args.fraction, args.epochs, args.seed))
    summary = {}
    for name, rows in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in rows) for key in ("train_seconds", "selection_seconds", "loop_seconds")}
        summary[name]["steps"] = rows[0]["steps"]
        print(f"{name:20s} train {summary[name]['train_seconds']:6.2f} s  selection {summary[name]['selection_seconds']:5.2f} s"
              f"  loop {summary[name]['loop_seconds']:6.2f} s  ({summary[name]['steps']} steps)")
    capture = summary["grace"]["loop_seconds"] - summary["grace, no capture"]["loop_seconds"]
    per_step_ms = 1000 * capture / summary["grace"]["steps"]
    print(f"capture: {capture:.2f} s of the training loop, {per_step_ms:.2f} ms per step")
    command = " ".join(["python", "benchmarks/capture_cost.py", *sys.argv[1:]])
    write_report(args.out, command, {"args": vars(args), "runs": runs, "median": summary,
                                     "capture_seconds": capture, "capture_ms_per_step": per_step_ms})


if __name__ == "__main__":
    main()
