"""GIP's greedy on lm-mixture's encoder embeddings: what the exact and the stochastic greedy cost and pick.

On ``lm-mixture-minilm`` GIP runs no scoring pass (its embeddings come from all-MiniLM-L6-v2), so a refresh costs
its log-det greedy alone. This script runs that greedy as a refresh does (the pool's and the reference set's
MiniLM embeddings in the signal store's space: 256 dimensions, unit rows; GIP's default ``sigma2``/``sigma_q2``)
at each ``--fractions`` budget, with the exact greedy and the stochastic one at several ``epsilon`` (and
``picks_per_step``, its picks per step: 1 is the sequential greedy, GIP's default 16), and reports
per setting the seconds, the mutual information reached (as a share of the exact greedy's) and the share of the
picks that are Shakespeare (the task's target; the pool holds 20%).

    python benchmarks/gip_greedy_cost.py            # seeds 0,1,2; about two minutes (the encoder) plus a minute
    python benchmarks/gip_greedy_cost.py --epsilons 0.01 --picks-per-step 1,4,16,64 --out ...

Writes ``benchmarks/results/gip_greedy_cost.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import task_views, write_report  # noqa: E402

from grace_lightning.strategies.gip import GIP, greedy_logdet, greedy_logdet_stochastic  # noqa: E402


def settings(epsilons: list[float], steps: list[int]) -> list[tuple[str, Optional[float], Optional[int]]]:
    return [("exact", None, None)] + [("stochastic", e, b) for e in epsilons for b in steps]


def measure_seed(seed: int, fractions: list[float], epsilons: list[float], steps: list[int]) -> list[dict]:
    x, q, target = task_views(seed)
    defaults = GIP()
    rows = []
    for fraction in fractions:
        budget = int(fraction * x.shape[0])
        exact_value = None
        for greedy, epsilon, per_step in settings(epsilons, steps):
            began = time.perf_counter()
            if greedy == "exact":
                result = greedy_logdet(x, q, budget, sigma2=defaults.sigma2, sigma_q2=defaults.sigma_q2)
            else:
                result = greedy_logdet_stochastic(
                    x, q, budget, sigma2=defaults.sigma2, sigma_q2=defaults.sigma_q2, epsilon=epsilon, seed=seed,
                    batch=per_step,
                )
            seconds = time.perf_counter() - began
            value = float(result.values[-1])
            exact_value = value if exact_value is None else exact_value
            rows.append({
                "seed": seed, "fraction": fraction, "budget": budget, "greedy": greedy, "epsilon": epsilon,
                "picks_per_step": per_step,
                "seconds": seconds, "mutual_information": value, "value_vs_exact": value / exact_value,
                "target_share": float(target[result.picks].mean()),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,0.3")
    parser.add_argument("--epsilons", default="0.01,0.1,0.3")
    parser.add_argument("--picks-per-step", default="1,16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gip_greedy_cost.json"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    steps = [int(b) for b in args.picks_per_step.split(",")]
    rows = [row for s in args.seeds.split(",") for row in measure_seed(int(s), fractions, epsilons, steps)]
    command = (
        f"python benchmarks/gip_greedy_cost.py --seeds {args.seeds} --fractions {args.fractions} "
        f"--epsilons {args.epsilons} --picks-per-step {args.picks_per_step}"
    )
    write_report(args.out, command, {"rows": rows})
    print(f"{'fraction':>8} {'greedy':<11}{'epsilon':>8}{'per step':>9}{'seconds':>9}{'MI vs exact':>13}{'Shakespeare':>13}")
    for fraction in fractions:
        for greedy, epsilon, per_step in settings(epsilons, steps):
            mine = [
                r for r in rows if r["fraction"] == fraction and r["greedy"] == greedy and r["epsilon"] == epsilon
                and r.get("picks_per_step") == per_step
            ]
            print(f"{fraction:>8} {greedy:<11}{epsilon if epsilon is not None else '':>8}"
                  f"{per_step if per_step is not None else '':>9}"
                  f"{np.mean([r['seconds'] for r in mine]):>9.2f}{np.mean([r['value_vs_exact'] for r in mine]):>13.4f}"
                  f"{np.mean([r['target_share'] for r in mine]):>13.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
