"""The README's GRACE-against-random table from one sitting of ``benchmarks/grace_random.toml``.

For each regime and budget: random's and GRACE's final accuracy, GRACE's selection share, both training times,
GRACE's paired gain over random at equal training seconds (the bench's ``gain_vs_random`` columns of
``summary.csv``), and GRACE's training seconds until it came within 0.005 of full data's best accuracy, counted
from ``evals.csv``. Full data ran in the first sitting only (it does not depend on GRACE's defaults): its best
accuracy, final accuracy and seconds are read from ``benchmarks/results/grace_random/`` (copied there from
``grace_random-3b98cd0``).

    python benchmarks/grace_random_table.py benchmarks/results/grace_random-ivf
    python benchmarks/grace_random_table.py benchmarks/results/grace_pixels --variant -pixels

``--variant`` reads the comparisons named ``<regime><variant>`` instead (a GRACE variant with random beside it
in its own comparison, as ``benchmarks/grace_pixels.toml`` writes them); regimes without one are left out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REGIMES = {
    "fashion-mnist-noisy": "Fashion-MNIST, 30% noise, 10 epochs",
    "fashion-mnist-long": "Fashion-MNIST, 20 epochs",
    "tweets-noisy": "tweets, 30% noise, 10 epochs",
    "tweets-long": "tweets, 30 epochs",
}


def summary(folder: Path) -> dict[tuple[str, str], dict]:
    return {(r["strategy"], r["fraction"]): r for r in csv.DictReader(open(folder / "summary.csv"))}


def time_to_target(evals: list[dict], fraction: str, target: float) -> str:
    times = []
    seeds = sorted({e["seed"] for e in evals if e["strategy"] == "grace" and e["fraction"] == fraction})
    for seed in seeds:
        hits = [float(e["train_seconds"]) for e in evals
                if e["strategy"] == "grace" and e["fraction"] == fraction and e["seed"] == seed and float(e["metric"]) >= target]
        if hits:
            times.append(min(hits))
    return f"{statistics.mean(times):.1f} s ({len(times)}/{len(seeds)})" if times else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sitting", help="the sitting's folder, e.g. benchmarks/results/grace_random-ivf")
    parser.add_argument("--variant", default="", help="suffix of the comparisons to read, e.g. -pixels")
    args = parser.parse_args()
    print("| regime | budget | random | GRACE | GRACE sel. share | GRACE train s (random's) | GRACE vs random @ equal s "
          "| time to full's target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for regime, name in REGIMES.items():
        folder = Path(args.sitting) / f"{regime}{args.variant}"
        if not (folder / "summary.csv").exists():
            continue
        full = summary(RESULTS / "grace_random" / regime)[("full", "1.0")]
        rows, evals = summary(folder), list(csv.DictReader(open(folder / "evals.csv")))
        target = float(full["best_mean"]) - 0.005
        label = f"{name} (full data: {float(full['final_mean']):.4f}, {float(full['train_seconds_mean']):.0f} s)"
        for fraction in ("0.1", "0.3", "0.5"):
            grace, random = rows.get(("grace", fraction)), rows.get(("random", fraction))
            if grace is None or random is None:
                continue
            noise = " ~" if grace["gain_within_noise"] == "True" else ""
            print(f"| {label if fraction == '0.1' else ''} | {fraction} | {float(random['final_mean']):.4f} "
                  f"| {float(grace['final_mean']):.4f} ± {float(grace['final_std']):.4f} "
                  f"| {100 * float(grace['selection_share_mean']):.1f}% "
                  f"| {float(grace['train_seconds_mean']):.1f} ({float(random['train_seconds_mean']):.1f}) "
                  f"| {float(grace['gain_vs_random_mean']):+.4f} ± {float(grace['gain_vs_random_std']):.4f}{noise} "
                  f"| {time_to_target(evals, fraction, target)} |")


if __name__ == "__main__":
    main()
