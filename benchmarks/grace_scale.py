"""GRACE at scale: graph build, incremental refresh, recall and memory for N = 100k and 1M (d = 128).

Not a test. Each pool size runs in its own subprocess so that peak RSS is that run's own. Embeddings are
synthetic and low-rank (24 latent dimensions plus noise, unit-normalised), the closest stand-in for real
penultimate features; importance is log-normal. A refresh re-measures 5% of the pool as anchors, with
drifted embeddings and new importance, and runs GRACE's propagation, graph repair (only where the GRACE
settings ask for one: ``repair_share``, ``drift_threshold``) and selection (the scoring forward pass is excluded:
it is the model's cost, not the selector's).

    python benchmarks/grace_scale.py                       # N = 100k and 1M, writes benchmarks/results/grace_scale.json
    python benchmarks/grace_scale.py --sizes 100000        # one size
    python benchmarks/grace_scale.py --grace-kwargs '{"hnsw_m": 16}' --out benchmarks/results/grace_scale_m16.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _pool(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 24), dtype=np.float32)
    mix = rng.standard_normal((24, dim), dtype=np.float32)
    emb = latent @ mix + 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    importance = rng.lognormal(0.0, 0.5, n).astype(np.float32)
    return emb, importance


def run_one(n: int, dim: int, fraction: float, anchor_fraction: float, seed: int, grace_kwargs: dict) -> dict:
    import torch

    from grace_lightning import ExampleSignals, SelectionInput, SignalStore
    from grace_lightning.knn import set_faiss_threads
    from grace_lightning.strategies.grace import Grace, GraceState

    threads = set_faiss_threads(1)  # all cores: a single process
    emb, importance = _pool(n, dim, seed)
    budget = int(fraction * n)
    result: dict = {
        "n": n, "dim": dim, "budget": budget, "anchor_fraction": anchor_fraction, "faiss_threads": threads,
        "grace": repr(Grace(**grace_kwargs)), "grace_kwargs": grace_kwargs,
    }

    store = SignalStore(n, max_embedding_dim=None)
    chunk = 200_000
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        store.update(
            torch.arange(lo, hi),
            ExampleSignals(
                loss=torch.from_numpy(importance[lo:hi]),
                grad_norm=torch.from_numpy(importance[lo:hi]),
                embedding=torch.from_numpy(emb[lo:hi]),
            ),
            step=0,
        )
    # The store now holds the pool (fp16); drop the benchmark's own fp32 copy so peak RSS is the selector's.
    del emb
    grace = Grace(**{"k": 10, "anchor_fraction": anchor_fraction, **grace_kwargs})
    state = GraceState(n)

    def inputs(now: int) -> SelectionInput:
        return SelectionInput(
            pool_size=n, budget=budget, store=store, generator=torch.Generator().manual_seed(seed), now_batch=now, state=state
        )

    began = time.perf_counter()
    first = grace.select(inputs(0))
    result["first_refresh_seconds"] = time.perf_counter() - began  # build + selection: a full rebuild refresh
    result["first_refresh_phases"] = first.diagnostics
    result["graph_method"] = state.graph.method
    result["full_build_seconds"] = first.diagnostics["graph_seconds"]
    result["recall_at_10"] = state.graph.recall(state.node_embedding.astype(np.float32), sample=1000, seed=seed)

    # Anchors: the 5% GRACE asks to rescore, measured again with drifted embeddings and new importance.
    anchors = grace.to_score(inputs(100)).numpy()
    rng = np.random.default_rng(seed + 1)
    drifted = store.embedding[anchors].float().numpy() + 0.02 * rng.standard_normal((anchors.size, dim), dtype=np.float32)
    drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
    store.update(
        torch.from_numpy(anchors),
        ExampleSignals(
            loss=torch.from_numpy(importance[anchors] * 1.5),
            grad_norm=torch.from_numpy(importance[anchors] * 1.5),
            embedding=torch.from_numpy(drifted),
        ),
        step=100,
    )
    began = time.perf_counter()
    second = grace.select(inputs(100))
    result["incremental_refresh_seconds"] = time.perf_counter() - began
    result["incremental_phases"] = second.diagnostics
    current = state.node_embedding.astype(np.float32)
    result["recall_at_10_after_repair"] = state.graph.recall(current, sample=1000, seed=seed)
    result["speedup_vs_full_rebuild"] = result["first_refresh_seconds"] / result["incremental_refresh_seconds"]
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--fraction", type=float, default=0.1, help="coreset budget as a share of the pool")
    parser.add_argument("--anchor-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grace-kwargs", default="{}", help="JSON: GRACE parameters beyond k=10 and the anchor fraction")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grace_scale.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kwargs = json.loads(args.grace_kwargs)
        print(json.dumps(run_one(args.child, args.dim, args.fraction, args.anchor_fraction, args.seed, kwargs)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--fraction", str(args.fraction),
               "--anchor-fraction", str(args.anchor_fraction), "--seed", str(args.seed), "--grace-kwargs", args.grace_kwargs]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"done N={n}", file=sys.stderr)
    header = ("N", "graph", "full build s", "recall@10", "incr. refresh s", "  prop s", "  graph s", "  select s",
              "recall after repair", "speedup", "peak RSS GiB")
    print(" | ".join(header))
    for r in rows:
        p = r["incremental_phases"]
        print(" | ".join([
            f"{r['n']:,}", r["graph_method"], f"{r['full_build_seconds']:.1f}", f"{r['recall_at_10']:.3f}",
            f"{r['incremental_refresh_seconds']:.1f}", f"{p['propagation_seconds']:.1f}", f"{p['graph_seconds']:.1f}",
            f"{p['selection_seconds']:.1f}", f"{r['recall_at_10_after_repair']:.3f}", f"{r['speedup_vs_full_rebuild']:.1f}x",
            f"{r['peak_rss_gib']:.2f}",
        ]))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": __import__("os").cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
