"""What GRACE's first graph build costs, and at what recall, on the embeddings of real runs.

For each pool, the node embeddings GRACE builds its graph on (graph space, ``graph_dim=32``, after its first
informed refresh of a bench run: the bench's data, model and schedule, 2 epochs, budget 0.3, seed 0), and a
synthetic low-rank pool of the same size as the hard case (24 latent dimensions plus noise, no clusters). Each
pool's graph is built with ``KnnGraph.build`` (k = 10, GRACE's reserve) at each setting below, and its
recall@10 measured on 2,000 nodes against exact search. The inverted file (faiss ``IndexIVFFlat``, ``sqrt(N)``
lists, 8 probed) is GRACE's graph above ``exact_threshold`` since ``a6efd8c``; HNSW (``graph_method="hnsw"``) was
before. Results written before that commit timed the inverted file outside ``KnnGraph`` (faiss's default k-means
sample, 40 rows a list), so its seconds there differ a little.

    python benchmarks/graph_build.py

Writes ``benchmarks/results/graph_build.json``. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from lm_mixture_signals import write_report  # noqa: E402

from grace_lightning.bench.runner import build_single_run, quiet_and_restored  # noqa: E402
from grace_lightning.knn import KnnGraph, set_faiss_threads  # noqa: E402

# (label, KnnGraph.build keywords)
SETTINGS = [
    ("exact", {"method": "flat"}),
    ("hnsw efC40 efS64 (GRACE before 3b98cd0)", {"method": "hnsw", "ef_construction": 40, "ef_search": 64}),
    ("hnsw efC20 efS24 (GRACE's graph_method='hnsw')", {"method": "hnsw", "ef_construction": 20, "ef_search": 24}),
    ("hnsw M16 efC20 efS24", {"method": "hnsw", "hnsw_m": 16, "ef_construction": 20, "ef_search": 24}),
    ("hnsw M8 efC20 efS24", {"method": "hnsw", "hnsw_m": 8, "ef_construction": 20, "ef_search": 24}),
    ("hnsw M16 efC10 efS24", {"method": "hnsw", "hnsw_m": 16, "ef_construction": 10, "ef_search": 24}),
    ("ivf sqrt(N) lists, 8 probed (GRACE's default)", {"method": "ivf"}),
    ("ivf sqrt(N) lists, 16 probed", {"method": "ivf", "ivf_probes": 16}),
]
POOLS = [("fashion-mnist", {}), ("tweets", {})]


def run_embeddings(task_name: str, options: dict) -> np.ndarray:
    """GRACE's node embeddings after the first informed refresh of a 2-epoch bench run (budget 0.3, seed 0)."""
    with quiet_and_restored():
        built = build_single_run(task_name, "grace", 0.3, 0, 2, task_options=options)
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    return np.ascontiguousarray(built.callback._strategy_state.node_embedding, dtype=np.float32)


def low_rank(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24), dtype=np.float32) @ rng.standard_normal((24, dim), dtype=np.float32)
    x += 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "graph_build.json"))
    args = parser.parse_args()
    threads = set_faiss_threads(1)
    pools = [(name, run_embeddings(name, options)) for name, options in POOLS]
    pools.append(("synthetic low-rank", low_rank(pools[0][1].shape[0])))
    rows = []
    for name, x in pools:
        for label, kwargs in SETTINGS:
            began = time.perf_counter()
            graph = KnnGraph.build(x, k=10, **kwargs)
            seconds = time.perf_counter() - began
            rows.append({"pool": name, "n": x.shape[0], "setting": label, "seconds": seconds,
                         "recall_at_10": graph.recall(x, sample=2000)})
    for r in rows:
        print(f"{r['pool']:20s} {r['n']:>7,} {r['setting']:42s} {r['seconds']:6.2f} s  recall@10 {r['recall_at_10']:.3f}")
    write_report(args.out, "python benchmarks/graph_build.py", {"faiss_threads": threads, "rows": rows})


if __name__ == "__main__":
    main()
