"""Shared by the k-NN graph, propagation and doctest tests: clustered embeddings and a one-thread faiss fixture."""

from __future__ import annotations

import faiss
import numpy as np
import pytest


@pytest.fixture(scope="module")
def one_faiss_thread():
    """One faiss thread: OpenMP barriers crawl when other processes share the 2 cores; results do not depend on it."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embeddings(n, d=32, rank=8, clusters=40, seed=0):
    """Clustered, low-rank unit vectors: closer to real embeddings than iid Gaussians (where ANN recall is poor)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, rank))
    z = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, rank))
    return unit(z @ rng.standard_normal((rank, d)) + 0.4 * rng.standard_normal((n, d)))
