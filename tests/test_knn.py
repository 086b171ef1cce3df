"""Tests for grace_lightning.knn: the k-NN graph's build, incremental repair, recall and checkpointing (faiss)."""

import os

import faiss
import numpy as np
import pytest

from grace_lightning.knn import KnnGraph, set_faiss_threads
from tests.graph_data import embeddings, one_faiss_thread, unit  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ---------------------------------------------------------------------------------------------------------------
# data and reference computations (plain numpy, independent of the module)




def _move(x, frac, seed=1, scale=1.0):
    """Perturb a random `frac` of the rows (and renormalise); returns the new array and the sorted moved ids."""
    rng = np.random.default_rng(seed)
    moved = np.sort(rng.choice(len(x), int(frac * len(x)), replace=False))
    y = x.copy()
    y[moved] = unit(y[moved] + scale * rng.standard_normal((moved.size, x.shape[1])) / np.sqrt(x.shape[1]))
    return y, moved


def _exact_knn(x, k):
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    nb = np.take_along_axis(top, order, axis=1)
    return nb, np.take_along_axis(sims, nb, axis=1)


def _recall(neighbors, x):
    """recall@k of `neighbors` against exact search over all nodes."""
    truth, _ = _exact_knn(x, neighbors.shape[1])
    hits = (neighbors[:, :, None] == truth[:, None, :]).any(axis=1)
    return hits.mean()


def _check_rows(graph, x):
    n, k = graph.neighbors.shape
    assert graph.neighbors.dtype == np.int64 and graph.similarities.dtype == np.float32
    assert (graph.neighbors != np.arange(n)[:, None]).all(), "a node is its own neighbour"
    assert (np.diff(graph.similarities, axis=1) <= 1e-6).all(), "rows not sorted by similarity"
    valid = graph.neighbors >= 0
    for row, ok in zip(graph.neighbors, valid):
        assert len(set(row[ok])) == ok.sum(), "duplicate neighbour in a row"
    dots = np.einsum("ij,ij->i", x[np.repeat(np.arange(n), k)], x[np.where(valid, graph.neighbors, 0).ravel()])
    np.testing.assert_allclose(graph.similarities[valid], dots.reshape(n, k)[valid], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# build


def test_flat_build_equals_brute_force():
    x = unit(np.random.default_rng(0).standard_normal((600, 16)))
    graph = KnnGraph.build(x, k=7, method="flat")
    truth, truth_sims = _exact_knn(x, 7)
    assert graph.method == "flat" and graph.neighbors.shape == (600, 7)
    np.testing.assert_array_equal(graph.neighbors, truth)
    np.testing.assert_allclose(graph.similarities, truth_sims, atol=1e-5)
    _check_rows(graph, x)
    assert graph.recall(x, sample=600) == 1.0


def test_auto_method_follows_threshold():
    x = embeddings(300)
    assert KnnGraph.build(x, k=5).method == "flat"
    assert KnnGraph.build(x, k=5, exact_threshold=299).method == "ivf"
    with pytest.raises(ValueError, match="'auto', 'flat', 'ivf' or 'hnsw'"):
        KnnGraph.build(x, k=5, method="lsh")
    for name, value in (("ivf_lists", 0), ("ivf_probes", -1), ("ivf_probes", 2.5)):
        with pytest.raises(ValueError, match=name):
            KnnGraph.build(x, k=5, method="ivf", **{name: value})


def test_duplicates_float16_and_tiny_pools():
    # duplicates: another id can tie with self; self must still be removed and the twin kept
    x = np.repeat(embeddings(50, seed=3), 2, axis=0).astype(np.float16)
    graph = KnnGraph.build(x, k=3)
    assert (graph.neighbors != np.arange(100)[:, None]).all()
    twins = np.arange(100) ^ 1
    assert (graph.neighbors == twins[:, None]).any(axis=1).all()
    # fewer than k other nodes: -1 / -inf padding, last
    for method in ("flat", "hnsw", "ivf"):
        small = KnnGraph.build(embeddings(4, seed=4), k=6, method=method)
        assert (small.neighbors[:, 3:] == -1).all() and np.isneginf(small.similarities[:, 3:]).all()
        assert (small.neighbors[:, :3] >= 0).all()
        assert (small.neighbors != np.arange(4)[:, None]).all()


def test_hnsw_build_recall():
    x = embeddings(5000)
    graph = KnnGraph.build(x, k=10, method="hnsw")
    assert graph.method == "hnsw"
    full = _recall(graph.neighbors, x)
    assert full >= 0.9
    assert abs(graph.recall(x, sample=1000) - full) < 0.03
    _check_rows(graph, x)


def test_ivf_build_recall_and_lists():
    x = embeddings(5000)
    graph = KnnGraph.build(x, k=10, method="ivf")
    assert graph.method == "ivf" and graph.ivf_lists == 71 and graph._index.nprobe == 8  # round(sqrt(5000))
    full = _recall(graph.neighbors, x)
    assert full >= 0.9
    _check_rows(graph, x)
    # probing every list is exact search; probing one finds fewer true neighbours: the probes are what it searches
    every = KnnGraph.build(x, k=10, method="ivf", ivf_lists=16, ivf_probes=16)
    one = KnnGraph.build(x, k=10, method="ivf", ivf_lists=16, ivf_probes=1)
    np.testing.assert_array_equal(every.neighbors, _exact_knn(x, 10)[0])
    assert _recall(one.neighbors, x) < _recall(every.neighbors, x) - 0.02


def test_recall_counts_misses():
    x = embeddings(500, seed=5)
    graph = KnnGraph.build(x, k=5)
    graph.neighbors[::2, -1] = (np.arange(0, 500, 2) + 250) % 500  # corrupt the last edge of every other row
    assert graph.recall(x, sample=500) == pytest.approx(_recall(graph.neighbors, x))
    assert graph.recall(x, sample=500) < 1.0


# ---------------------------------------------------------------------------------------------------------------
# incremental repair


@pytest.mark.parametrize("method", ["flat", "ivf", "hnsw-overlay", "hnsw-inplace"])
@pytest.mark.parametrize("repair", ["search", "two_hop"])
def test_update_restores_recall(method, repair):
    x = embeddings(4000, seed=6)
    # inplace_drift 0: every moved node goes to the overlay; 2 (the largest distance between unit vectors): every
    # moved node is written into the HNSW index in place (these moves are large: cosine to the old vector ~0.7)
    inplace = {"hnsw-overlay": 0.0, "hnsw-inplace": 2.0}.get(method, 0.5)
    method = method.split("-")[0]
    graph = KnnGraph.build(x, k=10, method=method, repair=repair, inplace_drift=inplace)
    before = graph.neighbors.copy()
    y, moved = _move(x, 0.05)

    stats = graph.update(y, moved)

    assert stats["moved"] == stats["requeried"] == moved.size
    assert stats["rebuilt"] is False and stats["reverse_patched"] > 0 and stats["seconds"] >= 0
    assert stats["overlay"] == (moved.size if method == "hnsw" and inplace == 0.0 else 0)
    assert stats["inplace"] == (moved.size if method == "hnsw" and inplace == 2.0 else 0)
    _check_rows(graph, y)
    fresh = _recall(KnnGraph.build(y, k=10, method=method).neighbors, y)
    updated = _recall(graph.neighbors, y)
    stale = _recall(before, y)
    assert updated >= fresh - 0.02
    assert stale < updated - 0.03  # not updating is clearly worse, so this test can fail


def test_update_moves_node_next_to_its_new_neighbours():
    x = embeddings(1000, seed=7)
    for method in ("flat", "hnsw", "ivf"):
        graph = KnnGraph.build(x, k=5, method=method)
        y = x.copy()
        y[:10] = unit(x[500:510] + 1e-3)  # nodes 0-9 jump next to 500-509
        graph.update(y, np.arange(10))
        assert (graph.neighbors[:10, 0] == np.arange(500, 510)).all()
        assert all(i in graph.neighbors[500 + i] for i in range(10))  # reverse edges inserted


def test_overlay_limit_triggers_rebuild_and_moving_again_replaces():
    x = embeddings(3000, seed=8)
    graph = KnnGraph.build(x, k=10, method="hnsw", overlay_limit=0.08, inplace_drift=0.0)
    y, first = _move(x, 0.05, seed=11)
    assert graph.update(y, first)["overlay"] == first.size
    y2 = y.copy()
    y2[first] = _move(y, 1.0, seed=12)[0][first]
    stats = graph.update(y2, first)  # the same nodes again: their overlay entries are replaced, not added
    assert not stats["rebuilt"] and stats["overlay"] == first.size
    assert _recall(graph.neighbors, y2) >= 0.97

    z, second = _move(y2, 0.05, seed=13)
    stats = graph.update(z, second)  # > 8% of the nodes would now be in the overlay
    assert stats["rebuilt"] is True and stats["overlay"] == 0
    _check_rows(graph, z)
    assert _recall(graph.neighbors, z) >= 0.97


def test_hnsw_search_skips_stale_entries():
    """White-box: after an overlay update, searches return every node at its *new* vector, never the stale HNSW copy."""
    x = embeddings(3000, seed=12)
    graph = KnnGraph.build(x, k=10, method="hnsw", overlay_limit=0.5)
    moved = np.sort(np.random.default_rng(0).choice(3000, 1200, replace=False))
    y = x.copy()
    y[moved] = -x[moved]  # far from where the HNSW index still has them
    assert graph.update(y, moved)["overlay"] == moved.size
    queries = np.arange(0, 3000, 5)
    labels, sims = graph._query(y, queries, 10)
    assert (labels >= 0).all()
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", y[queries], y[labels]), atol=1e-5)
    assert np.isin(labels, moved).any()  # the overlay's hits are in the results too


def test_update_without_moves_and_bad_input():
    x = embeddings(200, seed=9)
    graph = KnnGraph.build(x, k=4)
    before = graph.neighbors.copy()
    stats = graph.update(x, np.array([], dtype=np.int64))
    assert stats["moved"] == 0 and stats["requeried"] == 0
    np.testing.assert_array_equal(graph.neighbors, before)
    with pytest.raises(ValueError):
        graph.update(x[:100], [1])
    with pytest.raises(ValueError):
        graph.update(x, [200])


# ---------------------------------------------------------------------------------------------------------------
# checkpointing and threads


@pytest.mark.parametrize("method", ["flat", "hnsw", "ivf"])
def test_state_dict_round_trip(method):
    torch = pytest.importorskip("torch")
    x = embeddings(1500, seed=10)
    graph = KnnGraph.build(x, k=8, method=method, ef_search=48)
    y, moved = _move(x, 0.03, seed=2)
    graph.update(y, moved)
    # what a Lightning checkpoint holds: tensors for the arrays
    state = {key: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for key, v in graph.state_dict().items()}
    restored = KnnGraph.from_state_dict(state, y)
    assert restored.method == method and restored.k == 8 and restored.ef_search == 48
    np.testing.assert_array_equal(restored.neighbors, graph.neighbors)
    np.testing.assert_array_equal(restored.similarities, graph.similarities)

    z, moved2 = _move(y, 0.05, seed=3)
    stats = restored.update(z, moved2)
    assert stats["moved"] == moved2.size
    _check_rows(restored, z)
    assert _recall(restored.neighbors, z) >= _recall(KnnGraph.build(z, k=8, method=method).neighbors, z) - 0.02
    with pytest.raises(ValueError):
        KnnGraph.from_state_dict(graph.state_dict(), y[:10])


def test_restored_ivf_graph_repairs_exactly_like_the_original():
    """Resume: the IVF lists are restored from the state, not retrained on the moved vectors, so a repair after a
    restore searches the same lists and leaves the same rows as a repair without one."""
    x = embeddings(3000, seed=14)
    graph = KnnGraph.build(x, k=8, method="ivf", ivf_probes=2)
    y, moved = _move(x, 0.3, seed=4, scale=3.0)  # far enough that lists trained on y would differ
    graph.update(y, moved)
    restored = KnnGraph.from_state_dict(graph.state_dict(), y)
    np.testing.assert_array_equal(restored._centroids(), graph._centroids())
    retrained = KnnGraph.build(y, k=8, method="ivf", ivf_probes=2)
    assert not np.array_equal(retrained._centroids(), graph._centroids())
    z, moved2 = _move(y, 0.1, seed=5)
    graph.update(z, moved2)
    restored.update(z, moved2)
    np.testing.assert_array_equal(restored.neighbors, graph.neighbors)
    np.testing.assert_array_equal(restored.similarities, graph.similarities)
    np.testing.assert_array_equal(restored.floor, graph.floor)
    state = graph.state_dict()
    state["ivf_centroids"] = None
    with pytest.raises(ValueError, match="list centres"):
        KnnGraph.from_state_dict(state, z)


def test_set_faiss_threads():
    previous = faiss.omp_get_max_threads()
    try:
        n = set_faiss_threads(2)
        assert n == max(1, os.cpu_count() // 2) and faiss.omp_get_max_threads() == n
        if os.cpu_count() == 2:
            assert n == 1
        assert set_faiss_threads(10_000) == 1
        assert set_faiss_threads() == os.cpu_count() == faiss.omp_get_max_threads()
    finally:
        faiss.omp_set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# exact search with torch (a GPU where there is one; the same code on the CPU here)


@pytest.fixture
def torch_search_on_the_cpu(monkeypatch):
    """Let ``device="cpu:0"`` through to the torch index (``resolve_device`` maps every CPU name to faiss)."""
    import grace_lightning.knn as knn

    monkeypatch.setattr(knn, "resolve_device", lambda device: device)


def test_torch_index_searches_like_faiss_flat():
    from grace_lightning.knn_torch import TorchFlatIndex

    x = unit(np.random.default_rng(4).standard_normal((700, 12)))
    q = x[:50] + 0.01
    ours, theirs = TorchFlatIndex(12, "cpu"), faiss.IndexFlatIP(12)
    for index in (ours, theirs):
        index.add(x[:300])
        index.add(x[300:])  # added in two parts, as after a reset
    assert ours.ntotal == theirs.ntotal == 700 and ours.d == 12
    sims, labels = ours.search(q, 9)
    want_sims, want_labels = theirs.search(q, 9)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    ours.reset()
    sims, labels = ours.search(q[:2], 3)  # empty: faiss's convention for missing results
    assert (labels == -1).all() and np.isneginf(sims).all()


def test_torch_exact_graph_equals_faiss_and_repairs_alike(torch_search_on_the_cpu, monkeypatch):
    import grace_lightning.knn_torch as knn_torch

    monkeypatch.setattr(knn_torch, "BLOCK_SCORES", 5 * 800)  # 5 query rows a block: many blocks
    x = embeddings(800, seed=7)
    on_torch = KnnGraph.build(x, k=6, method="flat", device="cpu:0")
    on_faiss = KnnGraph.build(x, k=6, method="flat")
    assert on_torch.device == "cpu:0" and type(on_torch._index).__name__ == "TorchFlatIndex"
    np.testing.assert_array_equal(on_torch.neighbors, on_faiss.neighbors)
    np.testing.assert_allclose(on_torch.similarities, on_faiss.similarities, atol=1e-5)
    y, moved = _move(x, 0.05, seed=8)
    on_torch.update(y, moved)
    on_faiss.update(y, moved)
    np.testing.assert_array_equal(on_torch.neighbors, on_faiss.neighbors)
    _check_rows(on_torch, y)
    # A checkpoint names the device; where it is not (here: no GPU) the graph searches with faiss again.
    state = on_torch.state_dict()
    assert state["device"] == "cpu:0"
    state["device"] = "cuda:0"
    restored = KnnGraph.from_state_dict(state, y)
    assert restored.device == ("cuda:0" if torch_cuda() else "cpu")
    np.testing.assert_array_equal(restored.neighbors, on_torch.neighbors)


def test_hnsw_ignores_the_search_device():
    graph = KnnGraph.build(embeddings(300), k=4, method="hnsw", device="cpu")
    assert graph.device == "cpu"


def test_bad_search_device_names_the_parameter():
    from grace_lightning.knn import resolve_device

    with pytest.raises(ValueError, match="device"):
        KnnGraph.build(embeddings(50), k=3, device="tpu")
    assert resolve_device("cpu:0") == "cpu"
    if not torch_cuda():
        with pytest.raises(ValueError, match="no CUDA device is visible; use device='cpu'"):
            resolve_device("cuda")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_torch_index_keeps_its_own_copy():
    """Like faiss, the index holds a copy: writing into the caller's array afterwards changes no search."""
    from grace_lightning.knn_torch import TorchFlatIndex

    x = unit(np.random.default_rng(5).standard_normal((50, 8)))
    index = TorchFlatIndex(8, "cpu")
    index.add(x)
    before = index.search(x[:3], 4)
    x[:] = x[::-1].copy()
    after = index.search(index._x[:3].numpy(), 4)
    np.testing.assert_array_equal(before[1], after[1])
