"""How much Shakespeare Group-MATES' cluster quotas let a subset of lm-mixture hold, whatever its influence model says.

Group-MATES clusters the candidates' embeddings (spherical k-means, ``round(sqrt(N) / 2)`` centroids by default)
and gives each cluster ``ceil(B · |C| / N)`` picks, the paper's rule (``cluster_budgets``). On embeddings that
separate the pool's sources, as a pretrained encoder's do, clusters follow the sources, so the quotas hand each
source its pool share. This script clusters lm-mixture's MiniLM embeddings (in the signal store's space, as the
``lm-mixture-minilm`` comparison gives them) as ``group_mates`` does and reports, per budget, the largest
Shakespeare share any selection under those quotas can have (a perfect influence model's), beside the most a
subset of that size can hold without quotas.

    python benchmarks/group_mates_quotas.py         # seeds 0,1,2; about a minute a seed (the encoder)

Writes ``benchmarks/results/group_mates_quotas.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import task_views, write_report  # noqa: E402

from grace_lightning.clustering import spherical_kmeans  # noqa: E402
from grace_lightning.strategies.group_mates import cluster_budgets, default_clusters  # noqa: E402


def measure_seed(seed: int, fractions: list[float]) -> dict:
    x, _, target = task_views(seed)
    n = x.shape[0]
    # group_mates' default count; its cap at the budget does not bind at these budgets (checked below)
    k = default_clusters(n, n)
    partition = spherical_kmeans(x, k, seed=seed)
    on_target = np.array([int(target[partition.members(c)].sum()) for c in range(partition.k)])
    sizes = partition.sizes()
    result = {"seed": seed, "clusters": int(partition.k), "pool_target_share": float(target.mean()),
              "target_in_target_clusters": float(on_target[on_target > 0.9 * np.maximum(sizes, 1)].sum() / target.sum()),
              "budgets": {}}
    for fraction in fractions:
        budget = int(fraction * n)
        if default_clusters(n, budget) != k:
            raise ValueError(f"group_mates would use {default_clusters(n, budget)} clusters at fraction {fraction}, not {k}")
        quotas = cluster_budgets(sizes, budget)
        result["budgets"][str(fraction)] = {
            "ceiling_with_quotas": float(np.minimum(quotas, on_target).sum() / budget),
            "ceiling_without_quotas": float(min(int(target.sum()), budget) / budget),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,0.3")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "group_mates_quotas.json"))
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    runs = [measure_seed(int(s), fractions) for s in args.seeds.split(",")]
    write_report(args.out, f"python benchmarks/group_mates_quotas.py --seeds {args.seeds} --fractions {args.fractions}", {"runs": runs})
    print(f"clusters {runs[0]['clusters']}; Shakespeare chunks in clusters over 90% Shakespeare: "
          f"{np.mean([r['target_in_target_clusters'] for r in runs]):.3f}")
    for f in fractions:
        cells = [r["budgets"][str(f)] for r in runs]
        print(f"budget {f}: most Shakespeare under the quotas {np.mean([c['ceiling_with_quotas'] for c in cells]):.3f}, "
              f"without {np.mean([c['ceiling_without_quotas'] for c in cells]):.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
