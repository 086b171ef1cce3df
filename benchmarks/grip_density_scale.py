"""GRIP's intra-cluster density at the cluster sizes of large pools: exact k-NN against a sampled reference.

GRIP clusters the pool into at most 256 clusters, so at ten million examples a cluster holds about 40,000, and
the exact k-NN density inside it costs ``O(N_k² d)``. ``density_sample`` (default 4096) searches neighbours among
a uniform sample of the cluster instead. This times :func:`grace_lightning.strategies.grip.local_density` on one
synthetic cluster per size (20 Gaussian sub-blobs of different spreads, 128 dimensions, as the bench CNN's
embeddings) both ways
and reports how well the sampled densities keep the exact ones' order (Spearman).

    python benchmarks/grip_density_scale.py
    python benchmarks/grip_density_scale.py --sizes 4000,16000 --sample 4096

Writes ``benchmarks/results/grip_density_scale.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from grace_lightning.strategies.grip import local_density


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4000,16000,40000")
    parser.add_argument("--sample", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--knn", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grip_density_scale.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        # A cluster: 20 sub-blobs around one centre, each of its own spread, so that densities differ within
        # and between them.
        centre = 3.0 * rng.standard_normal(args.dim)
        blob = rng.integers(0, 20, size=n)
        offsets = rng.standard_normal((20, args.dim))
        spread = rng.uniform(0.2, 1.0, size=20)[blob, None]
        x = (centre + offsets[blob] + spread * rng.standard_normal((n, args.dim))).astype(np.float32)
        began = time.perf_counter()
        exact = local_density(x, args.knn)
        exact_s = time.perf_counter() - began
        reference = np.sort(rng.choice(n, size=min(args.sample, n), replace=False))
        began = time.perf_counter()
        sampled = local_density(x, args.knn, reference)
        sampled_s = time.perf_counter() - began
        spearman = float(np.corrcoef(_ranks(exact), _ranks(sampled))[0, 1])
        rows.append({"cluster_size": n, "exact_seconds": exact_s, "sampled_seconds": sampled_s, "spearman": spearman})
        print(f"cluster of {n:>6}: exact {exact_s:7.2f} s, sample of {min(args.sample, n)} {sampled_s:6.2f} s, "
              f"Spearman {spearman:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/grip_density_scale.py " + f"--sizes {args.sizes} --sample {args.sample}",
        "dim": args.dim, "knn": args.knn, "rows": rows,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
