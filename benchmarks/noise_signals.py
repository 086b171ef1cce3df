"""Which per-example signal tells a flipped label from a hard example: the diagnostic behind ``contradiction_weight``.

Trains one bench run per pool (GRACE at its defaults, budget 0.3, 6 epochs, seed 0: the bench's data, model and
schedule) and reads the signal store at the end: each example's last measured gradient norm ``g``, its ratio to
its graph neighbours' edge-weighted mean (what ``outlier_damping`` damps), and its error norm
``‖softmax(z) − onehot(y)‖`` (EL2N; above 1 the model puts most of its mass on another class than the label, what
``contradiction_weight`` reads). For the noisy pools (30% of the labels flipped) it reports each signal's
quantiles among the flipped and the clean examples, and the share of each that a threshold flags; for the clean
pools, the share of all examples it flags (the hard examples a filter would wrongly take for noise).

Last, among the examples the model contradicts (error norm above 1), the share of their graph neighbours' edge
weight on contradicted neighbours: if a flipped label were an isolated contradiction and a hard clean example sat
among other contradicted ones, a low share would tell noise from hardness, and ``contradiction_weight`` could act
only there (and so be on by default). Reported as quantiles and as the share of each group below a threshold.

    python benchmarks/noise_signals.py

Writes ``benchmarks/results/noise_signals.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.runner import build_single_run, quiet_and_restored  # noqa: E402

POOLS = [
    ("fashion-mnist-noisy", {"noise": 0.3}),
    ("fashion-mnist", {}),
    ("tweets-noisy", {"noise": 0.3}),
    ("tweets", {}),
]
QUANTILES = [0.5, 0.75, 0.9, 0.95, 0.99]
RATIO_THRESHOLDS = [1.5, 2.0, 3.0, 4.0]
ERROR_THRESHOLDS = [0.9, 1.0, 1.1, 1.2]
SHARE_THRESHOLDS = [0.2, 0.3, 0.4, 0.5]


def signals(task: str, options: dict) -> dict[str, np.ndarray]:
    with quiet_and_restored():
        built = build_single_run(task, "grace", 0.3, 0, 6, task_options=options)
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    store, state = built.callback.store, built.callback._strategy_state
    grad = store.grad_norm.numpy().astype(np.float32)
    around = state.edges()[1].mean(grad)
    marked = built.data.marked
    errors = store.error_norm.numpy().astype(np.float32)
    return {
        "gradient ratio": grad / np.maximum(around, 1e-12),
        "error norm": errors,
        "neighbours contradicted": state.edges()[1].mean((errors > 1).astype(np.float32)),
        "flipped": np.zeros(store.pool_size, bool) if marked is None else marked.numpy().astype(bool),
    }


def flagged(values: np.ndarray, thresholds: list[float], below: bool = False) -> dict[str, float]:
    if below:
        return {f"< {t:g}": float(np.mean(values < t)) for t in thresholds}
    return {f"> {t:g}": float(np.mean(values > t)) for t in thresholds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "noise_signals.json"))
    args = parser.parse_args()
    report = {}
    for task, options in POOLS:
        found = signals(task, options)
        flipped = found.pop("flipped")
        contradicted = found["error norm"] > 1
        masks = {"flipped": flipped, "clean": ~flipped} if flipped.any() else {"all": np.ones_like(flipped)}
        entry = {}
        for name, values in found.items():
            thresholds = {"gradient ratio": RATIO_THRESHOLDS, "error norm": ERROR_THRESHOLDS}.get(name, SHARE_THRESHOLDS)
            if name == "neighbours contradicted":  # among the contradicted examples only
                groups = {f"contradicted {g}": values[m & contradicted] for g, m in masks.items()}
            else:
                groups = {g: values[m] for g, m in masks.items()}
            entry[name] = {
                group: {"quantiles": dict(zip(map(str, QUANTILES), np.quantile(v, QUANTILES).round(3).tolist())),
                        "flagged": flagged(v, thresholds, below=name == "neighbours contradicted")}
                for group, v in groups.items()
            }
            for group, stats in entry[name].items():
                print(f"{task:20s} {name:15s} {group:8s} quantiles {list(stats['quantiles'].values())} "
                      f"flagged {({k: round(v, 3) for k, v in stats['flagged'].items()})}")
        report[task] = entry
    write_report(args.out, "python benchmarks/noise_signals.py", {"budget": 0.3, "epochs": 6, "seed": 0, "pools": report})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
