"""GIP's greedy on lm-mixture's encoder embeddings: what the exact and the stochastic greedy cost and pick.

On ``lm-mixture-minilm`` GIP runs no scoring pass (its embeddings come from all-MiniLM-L6-v2), so a refresh costs
its log-det greedy alone. This script runs that greedy as a refresh does (the pool's and the reference set's
MiniLM embeddings in the signal store's space: 256 dimensions, unit rows; GIP's default ``sigma2``/``sigma_q2``)
at each ``--fractions`` budget, with the exact greedy and the stochastic one at several ``epsilon``, and reports
per setting the seconds, the mutual information reached (as a share of the exact greedy's) and the share of the
picks that are Shakespeare (the task's target; the pool holds 20%).

    python benchmarks/gip_greedy_cost.py            # seeds 0,1,2; about two minutes (the encoder) plus a minute

Writes ``benchmarks/results/gip_greedy_cost.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import task_views, write_report  # noqa: E402

from grace_lightning.strategies.gip import GIP, greedy_logdet, greedy_logdet_stochastic  # noqa: E402


def measure_seed(seed: int, fractions: list[float], epsilons: list[float]) -> list[dict]:
    x, q, target = task_views(seed)
    defaults = GIP()
    rows = []
    for fraction in fractions:
        budget = int(fraction * x.shape[0])
        settings = [("exact", None)] + [("stochastic", e) for e in epsilons]
        exact_value = None
        for greedy, epsilon in settings:
            began = time.perf_counter()
            if greedy == "exact":
                result = greedy_logdet(x, q, budget, sigma2=defaults.sigma2, sigma_q2=defaults.sigma_q2)
            else:
                result = greedy_logdet_stochastic(
                    x, q, budget, sigma2=defaults.sigma2, sigma_q2=defaults.sigma_q2, epsilon=epsilon, seed=seed
                )
            seconds = time.perf_counter() - began
            value = float(result.values[-1])
            exact_value = value if exact_value is None else exact_value
            rows.append({
                "seed": seed, "fraction": fraction, "budget": budget, "greedy": greedy, "epsilon": epsilon,
                "seconds": seconds, "mutual_information": value, "value_vs_exact": value / exact_value,
                "target_share": float(target[result.picks].mean()),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,0.3")
    parser.add_argument("--epsilons", default="0.01,0.1,0.3")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gip_greedy_cost.json"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows = [row for s in args.seeds.split(",") for row in measure_seed(int(s), fractions, epsilons)]
    command = f"python benchmarks/gip_greedy_cost.py --seeds {args.seeds} --fractions {args.fractions} --epsilons {args.epsilons}"
    write_report(args.out, command, {"rows": rows})
    print(f"{'fraction':>8} {'greedy':<11}{'epsilon':>8}{'seconds':>9}{'MI vs exact':>13}{'Shakespeare':>13}")
    for fraction in fractions:
        for greedy, epsilon in [("exact", None)] + [("stochastic", e) for e in epsilons]:
            mine = [r for r in rows if r["fraction"] == fraction and r["greedy"] == greedy and r["epsilon"] == epsilon]
            print(f"{fraction:>8} {greedy:<11}{epsilon if epsilon is not None else '':>8}"
                  f"{np.mean([r['seconds'] for r in mine]):>9.2f}{np.mean([r['value_vs_exact'] for r in mine]):>13.4f}"
                  f"{np.mean([r['target_share'] for r in mine]):>13.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
