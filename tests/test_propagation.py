"""Tests for grace_lightning.propagation: edge weights, score/drift propagation and neighbour means (numpy)."""

import numpy as np
import pytest

from grace_lightning.knn import KnnGraph
from grace_lightning.propagation import (
    Neighbourhood, edge_weights, fill_unknown, neighbour_mean, outvoted_labels, propagate, propagate_drift,
)
from tests.graph_data import embeddings, one_faiss_thread, unit  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ---------------------------------------------------------------------------------------------------------------
# data (plain numpy, independent of the module)




# ---------------------------------------------------------------------------------------------------------------
# weights and propagation


def _random_graph(n=300, k=6, seed=0):
    """Random rows with some missing (-1) and some negative-similarity edges, plus a few isolated nodes."""
    rng = np.random.default_rng(seed)
    nb = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    sims = rng.uniform(-0.3, 1.0, (n, k)).astype(np.float32)
    nb[rng.random((n, k)) < 0.1] = -1
    nb[:5] = -1  # isolated
    sims[nb < 0] = -np.inf
    anchors = rng.random(n) < 0.2
    anchors[:5] = False
    return nb, sims, anchors


def test_edge_weights():
    nb = np.array([[1, 2, -1]])
    sims = np.array([[0.5, -0.25, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(edge_weights(nb, sims), [[0.5, 0.0, 0.0]])  # -1 edge -> 0 even with a value
    np.testing.assert_array_equal(edge_weights(np.array([[0.5, -0.25, -np.inf]])), [[0.5, 0.0, 0.0]])
    assert edge_weights(sims).dtype == np.float32


def _loop_propagate(z, nb, w, anchors, mode):
    out = z.astype(np.float64).copy()
    for i in range(len(z)):
        if anchors[i]:
            continue
        js = [(j, wj) for j, wj in zip(nb[i], w[i]) if j >= 0 and wj > 0 and anchors[j]]
        if not js:
            continue
        total = sum(wj for _, wj in js)
        acc = sum(wj * z[j].astype(np.float64) for j, wj in js)
        out[i] = (z[i] + acc) / (1 + total) if mode == "exact" else 0.5 * z[i] + 0.5 * acc / total
    return out


@pytest.mark.parametrize("mode", ["exact", "paper_eq21"])
def test_propagate_matches_formula(mode):
    nb, sims, anchors = _random_graph()
    w = edge_weights(nb, sims)
    rng = np.random.default_rng(1)
    for z in (rng.standard_normal(300).astype(np.float32), rng.standard_normal((300, 3)).astype(np.float32)):
        original = z.copy()
        out = propagate(z, nb, w, anchors, mode=mode)
        np.testing.assert_array_equal(z, original)  # input untouched
        np.testing.assert_allclose(out, _loop_propagate(z, nb, w, anchors, mode), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[anchors], z[anchors])
        np.testing.assert_array_equal(out[:5], z[:5])  # isolated
        has_anchor = ((nb >= 0) & (w > 0) & anchors[np.where(nb >= 0, nb, 0)]).any(axis=1)
        untouched = ~anchors & ~has_anchor
        assert untouched.sum() > 5
        np.testing.assert_array_equal(out[untouched], z[untouched])
        assert not np.allclose(out[~anchors & has_anchor], z[~anchors & has_anchor])
    # (N, d) is column-wise the same as (N,)
    zd = rng.standard_normal((300, 2)).astype(np.float32)
    for c in range(2):
        column = propagate(zd[:, c], nb, w, anchors, mode)
        np.testing.assert_allclose(propagate(zd, nb, w, anchors, mode)[:, c], column, rtol=1e-6)


def test_propagate_exact_is_the_energy_minimiser():
    nb, sims, anchors = _random_graph(seed=2)
    w = edge_weights(nb, sims)
    z = np.random.default_rng(3).standard_normal(300).astype(np.float32)
    out = propagate(z, nb, w, anchors, mode="exact")
    paper = propagate(z, nb, w, anchors, mode="paper_eq21")
    checked = 0
    for i in np.flatnonzero(~anchors):
        js = [(j, wj) for j, wj in zip(nb[i], w[i]) if j >= 0 and wj > 0 and anchors[j]]
        if not js:
            continue

        def energy(v):
            return 0.5 * (v - z[i]) ** 2 + 0.5 * sum(wj * (v - z[j]) ** 2 for j, wj in js)

        h = 1e-3
        gradient = (energy(out[i] + h) - energy(out[i] - h)) / (2 * h)
        assert abs(gradient) < 1e-4
        assert energy(out[i]) <= min(energy(out[i] + 0.01), energy(out[i] - 0.01))
        assert energy(out[i]) <= energy(paper[i]) + 1e-9  # Eq. 21 is not the minimiser in general
        checked += 1
        if checked == 10:
            break
    assert checked == 10


def test_propagate_rejects_bad_input():
    nb, sims, anchors = _random_graph()
    w = edge_weights(nb, sims)
    with pytest.raises(ValueError):
        propagate(np.zeros(300), nb, w, anchors, mode="eq21")
    with pytest.raises(ValueError):
        propagate(np.zeros(299), nb, w, anchors)
    with pytest.raises(ValueError):
        propagate(np.zeros(300), nb, w, anchors.astype(int))


@pytest.mark.parametrize("mode", ["exact", "paper_eq21"])
def test_propagate_drift(mode):
    x = embeddings(800, seed=11)
    graph = KnnGraph.build(x, k=6)
    w = edge_weights(graph.neighbors, graph.similarities)
    rng = np.random.default_rng(4)
    anchors = rng.random(800) < 0.1
    direction = unit(rng.standard_normal((1, 32)))[0]
    new = x.copy()
    new[anchors] = unit(x[anchors] + 0.5 * direction)  # anchors all drift the same way
    drift = np.zeros_like(x)
    drift[anchors] = new[anchors] - x[anchors]
    drift[~anchors] = 100.0  # must be ignored

    out = propagate_drift(new, drift, graph.neighbors, w, anchors, mode=mode)

    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[anchors], new[anchors])
    has_anchor = ((w > 0) & anchors[graph.neighbors]).any(axis=1) & ~anchors
    assert has_anchor.sum() > 100
    np.testing.assert_array_equal(out[~anchors & ~has_anchor], x[~anchors & ~has_anchor])
    # followers moved toward the anchors' drift direction
    assert ((out[has_anchor] - x[has_anchor]) @ direction > 0).all()
    # and by the formula
    wa = np.where(anchors[graph.neighbors], w, 0)
    acc = np.einsum("ik,ikd->id", wa, drift[graph.neighbors])
    total = wa.sum(axis=1, keepdims=True)
    step = acc / (1 + total) if mode == "exact" else 0.5 * acc / np.maximum(total, 1e-12)
    np.testing.assert_allclose(out[has_anchor], unit(x + step)[has_anchor], atol=1e-5)


def test_neighbour_mean():
    nb, sims, _ = _random_graph(seed=5)
    w = edge_weights(nb, sims)
    g = np.random.default_rng(6).standard_normal(300).astype(np.float32)
    out = neighbour_mean(g, nb, w)
    for i in range(300):
        js = [(j, wj) for j, wj in zip(nb[i], w[i]) if j >= 0 and wj > 0]
        expected = sum(wj * g[j] for j, wj in js) / sum(wj for _, wj in js) if js else g[i]
        assert out[i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(out[:5], g[:5])  # no edge: own value
    g2 = np.stack([g, 2 * g], axis=1)
    np.testing.assert_allclose(neighbour_mean(g2, nb, w)[:, 1], 2 * out, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_prepared_neighbourhood_gives_the_sparse_sums_bit_for_bit(dtype):
    """The (N,) path sums every edge, zero weights included; it must equal the sparse path (positive edges only,
    which the (N, d) path takes) to the bit, or GRACE's draws would change with the speed-up."""
    nb, sims, _ = _random_graph(n=2000, k=8, seed=7)
    w = edge_weights(nb, sims)
    hood = Neighbourhood(nb, w)
    g = np.random.default_rng(8).lognormal(size=2000).astype(dtype)
    fast = hood.mean(g)
    assert fast.dtype == dtype
    np.testing.assert_array_equal(fast, hood.mean(g[:, None])[:, 0])
    np.testing.assert_array_equal(fast, neighbour_mean(g, nb, w))
    np.testing.assert_array_equal(fast[:5], g[:5])  # isolated nodes keep their value
    # A non-finite value reached only through zero-weight edges must not leak into anyone's mean.
    poisoned = g.copy()
    zero_only = np.setdiff1d(np.arange(2000), nb[w > 0])
    assert zero_only.size > 0
    poisoned[zero_only[0]] = np.nan
    out = hood.mean(poisoned)
    others = np.setdiff1d(np.arange(2000), zero_only[:1])
    np.testing.assert_array_equal(out[others], fast[others])
    with pytest.raises(ValueError, match="one row per node"):
        hood.mean(g[:10])


def test_neighbourhood_median_ignores_a_minority_of_outliers_and_missing_edges():
    nb, sims, _ = _random_graph(n=400, k=7, seed=9)
    w = edge_weights(nb, sims)
    hood = Neighbourhood(nb, w)
    g = np.random.default_rng(10).random(400).astype(np.float32)
    med = hood.median(g)
    for i in range(400):
        js = [j for j, wj in zip(nb[i], w[i]) if j >= 0 and wj > 0]
        assert med[i] == pytest.approx(np.median(g[js]) if js else g[i], rel=1e-6)
    # Three huge values among seven neighbours move the mean, not the median.
    star = np.array([[1, 2, 3, 4, 5, 6, 7]] + [[0, -1, -1, -1, -1, -1, -1]] * 7)
    star_hood = Neighbourhood(star, np.where(star >= 0, 1.0, 0.0).astype(np.float32))
    values = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 100.0, 100.0, 100.0], dtype=np.float32)
    assert star_hood.median(values)[0] == 1.0 and star_hood.mean(values)[0] > 40
    with pytest.raises(ValueError, match="one value per node"):
        hood.median(np.ones((400, 2), dtype=np.float32))


def test_fill_unknown_matches_the_hop_by_hop_formula_and_keeps_known_values():
    nb, sims, known = _random_graph(n=300, k=6, seed=4)
    w = edge_weights(nb, sims)
    hood = Neighbourhood(nb, w)
    values = np.where(known, np.random.default_rng(5).random(300), 0.0).astype(np.float32)
    out = fill_unknown(values, known, hood, hops=2)
    assert np.array_equal(out[known], values[known]), "a measured value moved"
    # Reference: the same rounds written node by node.
    expect, have = values.astype(np.float64), known.copy()
    for _ in range(2):
        nxt, reached = expect.copy(), have.copy()
        for i in np.flatnonzero(~have):
            js = [(j, wj) for j, wj in zip(nb[i], w[i]) if j >= 0 and wj > 0 and have[j]]
            if js:
                nxt[i] = sum(wj * expect[j] for j, wj in js) / sum(wj for _, wj in js)
                reached[i] = True
        expect, have = nxt, reached
    expect[~have] = values[known].mean()
    assert (~have).any() and np.allclose(out, expect, rtol=1e-5), "some nodes out of reach, all as the formula says"
    assert np.array_equal(fill_unknown(values, np.zeros(300, bool), hood), np.zeros(300, np.float32))
    with pytest.raises(ValueError, match=r"must both be \(300,\)"):
        fill_unknown(values[:10], known[:10], hood)


def test_outvoted_labels_match_a_node_by_node_vote_in_chunks_and_with_unknown_labels(monkeypatch):
    nb, sims, _ = _random_graph(n=300, k=6, seed=6)
    w = edge_weights(nb, sims)
    labels = np.random.default_rng(7).integers(-1, 4, 300)  # a fifth unknown (-1)
    expect = np.zeros(300, bool)
    for i in range(300):
        if labels[i] < 0:
            continue
        votes: dict[int, float] = {}
        for j, wj in zip(nb[i], w[i]):
            if j >= 0 and labels[j] >= 0:
                votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + float(wj)
        own = votes.pop(int(labels[i]), 0.0)
        expect[i] = max(votes.values(), default=0.0) > own + 1e-6
    assert 0.2 < expect.mean() < 0.8, "a test graph with both outcomes"
    assert np.array_equal(outvoted_labels(labels, nb, w), expect)
    import grace_lightning.propagation as propagation

    monkeypatch.setattr(propagation, "_GATHER_BYTES", 1000)  # a few rows a chunk: the same answer
    assert np.array_equal(outvoted_labels(labels, nb, w), expect)
    # a tie keeps the label; a node with no labelled neighbour keeps it too
    tie = outvoted_labels(np.array([0, 0, 1]), np.array([[1, 2], [0, -1], [0, -1]]), np.ones((3, 2), np.float32))
    assert tie.tolist() == [False, False, True]
    assert not outvoted_labels(np.array([3, -1, -1]), np.array([[1, 2], [0, 2], [0, 1]]), np.ones((3, 2), np.float32)).any()


def test_fill_unknown_gives_an_unmeasured_example_its_own_cluster_s_importance():
    """GRACE on fixed embeddings: a tenth of the pool measured, a hard cluster's unmeasured examples come out hard."""
    x = embeddings(3000, clusters=20, seed=2)
    graph = KnnGraph.build(x, k=10, method="flat")
    cluster = np.argmax(x @ x[np.random.default_rng(0).choice(3000, 20, replace=False)].T, axis=1)
    hard = np.isin(cluster, [0, 1, 2])
    importance = np.where(hard, 5.0, 1.0).astype(np.float32)
    known = np.random.default_rng(1).random(3000) < 0.1
    hood = Neighbourhood(graph.neighbors, edge_weights(graph.neighbors, graph.similarities))
    out = fill_unknown(np.where(known, importance, 0.0), known, hood)
    assert out[~known & hard].mean() > 3.5 and out[~known & ~hard].mean() < 1.5
