"""Spherical k-means on unit embeddings (faiss), shared by the strategies that cluster the pool (GRIP,
Group-MATES). Numpy in, numpy out; nothing here knows about Lightning or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from grace_lightning.validation import is_int

__all__ = ["Clusters", "spherical_kmeans"]


@dataclass(frozen=True)
class Clusters:
    """A partition of ``N`` unit vectors.

    Attributes:
        centroids: ``(K, d)`` float32 unit centroids.
        assignment: ``(N,)`` int64 cluster of each vector (its most similar centroid).
        similarity: ``(N,)`` float32 cosine of each vector to its centroid.
    """

    centroids: np.ndarray
    assignment: np.ndarray
    similarity: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> np.ndarray:
        """``(K,)`` int64 number of vectors per cluster (empty clusters count 0)."""
        return np.bincount(self.assignment, minlength=self.k).astype(np.int64)

    def members(self, c: int) -> np.ndarray:
        """Sorted ids of the vectors in cluster ``c``."""
        return np.flatnonzero(self.assignment == c)


def spherical_kmeans(embeddings, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256) -> Clusters:
    """Cluster unit rows by cosine with ``faiss.Kmeans(spherical=True)``; deterministic for a given ``seed``.

    ``embeddings`` ``(N, d)`` (float16/float32) are L2-normalised here (a zero row stays zero and lands in
    whichever cluster ties first). ``k`` is capped at ``N``. faiss trains on at most
    ``k * max_points_per_centroid`` rows it subsamples with ``seed``; every row is then assigned.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(5, 1, (50, 4)), rng.normal(-5, 1, (50, 4))]).astype(np.float32)
        >>> c = spherical_kmeans(x, 2, seed=0)
        >>> sorted(c.sizes().tolist())
        [50, 50]
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"spherical_kmeans: embeddings must be a non-empty (N, d) array, got shape {x.shape}")
    if not is_int(k) or k < 1:
        raise ValueError(f"spherical_kmeans: k must be a positive int, got {k!r}")
    faiss.normalize_L2(x)
    n, d = x.shape
    k = int(min(k, n))
    if k == 1:
        centroid = x.mean(axis=0, keepdims=True)
        norm = float(np.linalg.norm(centroid))
        centroid = centroid / norm if norm > 0 else np.eye(1, d, dtype=np.float32)
        return Clusters(centroid.astype(np.float32), np.zeros(n, dtype=np.int64), (x @ centroid[0]).astype(np.float32))
    km = faiss.Kmeans(
        d, k, niter=int(niter), seed=int(seed), spherical=True, max_points_per_centroid=int(max_points_per_centroid),
        verbose=False,
    )
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(centroids)
    sims, labels = index.search(x, 1)
    return Clusters(centroids, labels[:, 0].astype(np.int64), sims[:, 0].astype(np.float32))
