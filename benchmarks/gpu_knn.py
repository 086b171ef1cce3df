"""Exact k-NN on the GPU against faiss on the CPU: the graph GRACE builds, by each of KnnGraph's search paths.

``KnnGraph.build`` with ``method="flat", device="cuda"`` (exact search as blocked matrix products and a top-k,
:class:`~grace_lightning.knn_torch.TorchFlatIndex`: what ``Grace(graph_device="cuda")`` runs) beside faiss's
exact search and GRACE's HNSW settings on the machine's cores, each the whole build (rows, reserves, floors), with
its recall@k (``KnnGraph.recall`` on ``--recall-queries`` nodes). The pool is synthetic and low-rank like
``graph_build.py``'s hard case (24 latent dimensions plus noise, no clusters), unit rows, in GRACE's graph
dimension (32).

    python benchmarks/gpu_knn.py --sizes 100000,1000000          # on a GPU machine

Writes ``benchmarks/results/gpu_knn.json`` (or ``--out``). A method whose build would exceed ``--max-seconds``
(estimated from the smaller sizes, O(N^2) for exact search) is skipped at that size and marked so. Until
``TorchFlatIndex`` existed this script timed its own matrix-product loop (fp32 and bf16 products, the neighbour
lists alone): ``benchmarks/results/gpu_check/run1/gpu_knn.json`` holds those numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from grace_lightning.knn import KnnGraph, set_faiss_threads


def low_rank_pool(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24), dtype=np.float32) @ rng.standard_normal((24, d), dtype=np.float32)
    x += 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_knn.json"))
    args = parser.parse_args()
    threads = set_faiss_threads(1)
    cuda = torch.cuda.is_available()
    rows, seconds_at = [], {}

    def timed(name: str, n: int, x: np.ndarray, **build) -> None:
        previous = seconds_at.get(name)
        if previous is not None and previous[1] * (n / previous[0]) ** 2 > args.max_seconds:
            rows.append({"n": n, "method": name, "skipped": f"estimated over {args.max_seconds:.0f} s"})
            print(f"{n:>9,} {name:<32} skipped (estimated over {args.max_seconds:.0f} s)", flush=True)
            return
        began = time.perf_counter()
        graph = KnnGraph.build(x, k=args.k, **build)
        took = time.perf_counter() - began
        seconds_at[name] = (n, took)
        row = {"n": n, "method": name, "seconds": took, "recall": graph.recall(x, sample=args.recall_queries)}
        rows.append(row)
        print(f"{n:>9,} {name:<32} {took:8.2f} s  recall@{args.k} {row['recall']:.4f}", flush=True)

    on_gpu = "KnnGraph exact on the GPU"
    if cuda:  # warm-up: CUDA context, kernels and allocator
        KnnGraph.build(low_rank_pool(8192, args.dim), k=args.k, method="flat", device="cuda")
    for n in [int(s) for s in args.sizes.split(",")]:
        x = low_rank_pool(n, args.dim)
        if cuda:
            timed(on_gpu, n, x, method="flat", device="cuda")
            torch.cuda.empty_cache()
        timed("faiss cpu exact (IndexFlatIP)", n, x, method="flat")
        timed("faiss cpu hnsw (GRACE's)", n, x, method="hnsw", ef_construction=20, ef_search=24)
        # HNSW is not O(N^2): do not let the exact methods' extrapolation skip it.
        seconds_at.pop("faiss cpu hnsw (GRACE's)", None)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "dim": args.dim, "k": args.k, "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "faiss_threads": threads, "torch": torch.__version__,
                    "faiss": faiss.__version__, "processor": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
