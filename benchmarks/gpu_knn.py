"""Would a GPU k-NN graph pay? Exact self-k-NN on the GPU (torch matmul + top-k) against the faiss CPU builds.

GRACE builds its graph with faiss on the CPU (``KnnGraph``: exact ``IndexFlatIP`` up to 200k nodes, HNSW above).
On a GPU machine the same exact search is a blocked matrix product and a top-k: this measures it (fp32 and bf16
products; the bf16 one keeps fp32 accumulation) beside faiss's exact and HNSW builds on the machine's cores,
with recall@k of each against exact fp32 search on ``--recall-queries`` nodes. The pool is synthetic and
low-rank like ``graph_build.py``'s hard case (24 latent dimensions plus noise, no clusters), unit rows, in
GRACE's graph dimension (32).

    python benchmarks/gpu_knn.py --sizes 100000,1000000          # on a GPU machine

Writes ``benchmarks/results/gpu_knn.json`` (or ``--out``). A method whose build would exceed ``--max-seconds``
(estimated from the smaller sizes, O(N^2) for exact search) is skipped at that size and marked so.
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


def torch_knn(x: torch.Tensor, k: int, dtype: torch.dtype, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most similar other rows (inner product), exact up to the product's precision."""
    n = x.shape[0]
    xs = x.to(dtype)
    labels = torch.empty((n, k), dtype=torch.int64, device=x.device)
    sims = torch.empty((n, k), dtype=torch.float32, device=x.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = xs[start:stop] @ xs.T
        rows = torch.arange(stop - start, device=x.device)
        scores[rows, rows + start] = -torch.inf  # not its own neighbour
        top = torch.topk(scores, k, dim=1)
        sims[start:stop], labels[start:stop] = top.values.float(), top.indices
    return labels, sims


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


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

    def timed(method: str, n: int, build) -> None:
        previous = seconds_at.get(method)
        if previous is not None and previous[1] * (n / previous[0]) ** 2 > args.max_seconds:
            rows.append({"n": n, "method": method, "skipped": f"estimated over {args.max_seconds:.0f} s"})
            print(f"{n:>9,} {method:<28} skipped (estimated over {args.max_seconds:.0f} s)", flush=True)
            return
        began = time.perf_counter()
        labels = build()
        took = time.perf_counter() - began
        seconds_at[method] = (n, took)
        row = {"n": n, "method": method, "seconds": took, "recall": recall(labels[probe], truth)}
        rows.append(row)
        print(f"{n:>9,} {method:<28} {took:8.2f} s  recall@{args.k} {row['recall']:.4f}", flush=True)

    for n in [int(s) for s in args.sizes.split(",")]:
        x = low_rank_pool(n, args.dim)
        probe = np.random.default_rng(1).choice(n, size=min(args.recall_queries, n), replace=False)
        _, truth_labels = faiss.knn(x[probe], x, args.k + 1, metric=faiss.METRIC_INNER_PRODUCT)
        truth = np.array([[j for j in row if j != i][: args.k] for i, row in zip(probe, truth_labels)])
        if cuda:
            xg = torch.from_numpy(x).cuda()
            for name, dtype in (("torch cuda exact fp32", torch.float32), ("torch cuda exact bf16", torch.bfloat16)):
                torch_knn(xg[:8192], args.k, dtype)  # warm-up: kernels and allocator
                torch.cuda.synchronize()

                def build(dtype=dtype):
                    # As many results as KnnGraph.build asks faiss for (k + its reserve of 5 + the floor's one).
                    labels, _ = torch_knn(xg, args.k + 6, dtype)
                    torch.cuda.synchronize()
                    return labels[:, : args.k].cpu().numpy()

                timed(name, n, build)
            del xg
            torch.cuda.empty_cache()
        timed("faiss cpu exact (IndexFlatIP)", n, lambda: KnnGraph.build(x, k=args.k, method="flat").neighbors)
        hnsw = {"method": "hnsw", "ef_construction": 20, "ef_search": 24}  # GRACE's default HNSW settings
        timed("faiss cpu hnsw (GRACE's)", n, lambda: KnnGraph.build(x, k=args.k, **hnsw).neighbors)
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
