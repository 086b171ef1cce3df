"""Exact inner-product search on a torch device (a GPU): the part of ``faiss.IndexFlatIP`` that :class:`KnnGraph` uses.

On a GPU, exact k-NN is a matrix product and a top-k: on one H200, a whole ``KnnGraph`` build of 100,000 nodes in
32 dimensions took 0.31 s against 5.3 s for faiss's exact search and 0.75 s for its HNSW on 16 cores (recall 1.0
against 0.95), and 20.5 s at a million nodes (HNSW: 11.7 s, recall 0.91; ``benchmarks/gpu_knn.py``,
``benchmarks/results/gpu_check/run3``). Its cost grows as ``N^2``, so above about half a million nodes HNSW on the
CPU is the better method (GRACE's ``gpu_exact_threshold``).

faiss's GPU indexes are not on PyPI for current CUDA versions; torch, which the model already runs on, is.
Numpy in, numpy out, like faiss.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TorchFlatIndex"]

#: Similarity scores held at once per search block (floats): 2^26 is 256 MiB, small beside a training GPU's memory.
BLOCK_SCORES = 1 << 26


class TorchFlatIndex:
    """Exact maximum-inner-product search over float32 vectors held on ``device``, faiss's ``add`` / ``reset`` /
    ``search`` / ``d`` / ``ntotal``.

    ``search`` returns faiss's ``(similarities, labels)``, best first, with label ``-1`` and similarity
    ``-inf`` where fewer than ``k`` vectors exist. Products run in float32 (TF32 only if the caller enabled it
    for matrix products, ``torch.backends.cuda.matmul.allow_tf32``).

    Example:
        >>> index = TorchFlatIndex(2, "cpu")
        >>> index.add(np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32))
        >>> sims, labels = index.search(np.array([[1, 0]], dtype=np.float32), 2)
        >>> labels.tolist(), [round(float(v), 2) for v in sims[0]]
        ([[0, 2]], [1.0, 0.6])
    """

    def __init__(self, d: int, device: str | torch.device) -> None:
        self.d = int(d)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the caller's current device, kept from now
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._x = torch.empty((0, self.d), dtype=torch.float32, device=self.device)

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0])

    def add(self, x: np.ndarray) -> None:
        # A copy, as faiss keeps one: the caller may write into its array afterwards.
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, copy=True)
        self._x = rows if self.ntotal == 0 else torch.cat([self._x, rows])

    def reset(self) -> None:
        self._x = torch.empty((0, self.d), dtype=torch.float32, device=self.device)  # frees the vectors

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, found = self.ntotal, min(int(k), self.ntotal)
        queries = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        sims = np.full((queries.shape[0], int(k)), -np.inf, dtype=np.float32)
        labels = np.full((queries.shape[0], int(k)), -1, dtype=np.int64)
        if found == 0:
            return sims, labels
        rows = max(1, BLOCK_SCORES // n)
        with torch.no_grad():
            for start in range(0, queries.shape[0], rows):
                top = torch.topk(queries[start : start + rows] @ self._x.T, found, dim=1)
                sims[start : start + rows, :found] = top.values.cpu().numpy()
                labels[start : start + rows, :found] = top.indices.cpu().numpy()
        return sims, labels
