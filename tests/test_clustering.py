"""Spherical k-means shared by GRIP and Group-MATES."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from grace_lightning import clustering
from grace_lightning.clustering import spherical_kmeans


def _blobs(seed=0, per=60, dims=8, k=4):
    rng = np.random.default_rng(seed)
    centres = np.eye(dims)[:k] * 5
    x = np.concatenate([c + rng.standard_normal((per, dims)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(k), per)


def test_recovers_separated_directions_and_is_deterministic():
    x, truth = _blobs()
    a, b = spherical_kmeans(x, 4, seed=5), spherical_kmeans(x, 4, seed=5)
    assert np.array_equal(a.assignment, b.assignment) and np.array_equal(a.centroids, b.centroids)
    # each found cluster is one true blob
    for c in range(4):
        assert len(set(truth[a.members(c)])) == 1
    assert sorted(a.sizes().tolist()) == [60, 60, 60, 60]
    assert np.allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(a.similarity, np.einsum("ij,ij->i", unit, a.centroids[a.assignment]), atol=1e-5)


def test_k_is_capped_at_n_and_k1_is_the_mean_direction():
    x, _ = _blobs(per=2)
    assert spherical_kmeans(x, 100, seed=0).k == x.shape[0]
    one = spherical_kmeans(x, 1)
    mean = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = mean.mean(axis=0)
    assert np.allclose(one.centroids[0], mean / np.linalg.norm(mean), atol=1e-5) and one.sizes().tolist() == [8]


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        spherical_kmeans(np.ones((4, 2), np.float32), k)


def test_docstring_examples():
    assert doctest.testmod(clustering).failed == 0
