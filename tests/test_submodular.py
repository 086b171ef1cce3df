"""Importance-weighted facility location and its (lazy) greedy: grace_lightning/submodular.py."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest

from grace_lightning import submodular
from grace_lightning.submodular import facility_location_value, select_facility_location


def random_graph(rng, n, k, ties=False, missing=0.1):
    """A random sparse k-NN-like graph; with ``ties`` weights/importance come from small grids."""
    neighbors = rng.integers(0, n, size=(n, k), dtype=np.int64)  # duplicates and self loops included
    if ties:
        weights = rng.choice(np.array([0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32), size=(n, k))
        importance = rng.choice(np.array([0.0, 0.5, 1.0]), size=n)
    else:
        weights = rng.random((n, k), dtype=np.float32)
        importance = rng.random(n)
    gone = rng.random((n, k)) < missing
    neighbors[gone] = -1
    weights[gone] = 0.0
    return neighbors, weights, importance


def dense_similarity(neighbors, weights):
    """``W[v, s] = w_vs`` as a dense matrix: 1 on the diagonal, the largest listed weight elsewhere."""
    n, k = neighbors.shape
    dense = np.zeros((n, n))
    for v in range(n):
        for j in range(k):
            s = neighbors[v, j]
            if s >= 0:
                dense[v, s] = max(dense[v, s], float(weights[v, j]))
    np.fill_diagonal(dense, 1.0)
    return dense


def dense_value(selected, dense, importance, lam):
    sel = sorted(set(int(s) for s in selected))
    if not sel:
        return 0.0
    return float(importance @ dense[:, sel].max(axis=1) + lam * importance[sel].sum())


# ----------------------------------------------------------------------------------------------------
# Lazy greedy == plain greedy
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_lazy_matches_plain_greedy(ties):
    rng = np.random.default_rng(1234 + ties)
    for trial in range(60):
        n = int(rng.integers(30, 201))
        k = int(rng.integers(3, 9))
        lam = [0.0, 0.5, 1.0][trial % 3]
        neighbors, weights, importance = random_graph(rng, n, k, ties=ties)
        # Mostly short budgets (cheap plain greedy); every 5th runs to the end through the zero-gain tail.
        budget = n if trial % 5 == 0 else int(rng.integers(1, min(n, 60) + 1))
        lazy = select_facility_location(neighbors, weights, importance, budget, lam=lam, lazy=True)
        plain = select_facility_location(neighbors, weights, importance, budget, lam=lam, lazy=False)
        ctx = f"trial {trial}: n={n} k={k} lam={lam} budget={budget}"
        np.testing.assert_array_equal(lazy.selected, plain.selected, err_msg=ctx)
        np.testing.assert_array_equal(lazy.gains, plain.gains, err_msg=ctx)  # bit-identical
        np.testing.assert_array_equal(lazy.coverage, plain.coverage, err_msg=ctx)
        assert lazy.uncovered == plain.uncovered
        assert len(set(lazy.selected.tolist())) == budget
        # Lazy greedy must actually save work.
        if budget > 5:
            assert lazy.evaluations < plain.evaluations, ctx
        # F(S) is the sum of the marginal gains (duplicate edges / self loops handled the same way).
        value = facility_location_value(lazy.selected, neighbors, weights, importance, lam=lam)
        assert value == pytest.approx(lazy.gains.sum(), rel=1e-12, abs=1e-12), ctx


def test_lazy_matches_plain_greedy_larger_graph():
    rng = np.random.default_rng(7)
    neighbors, weights, importance = random_graph(rng, 600, 10)
    lazy = select_facility_location(neighbors, weights, importance, 120)
    plain = select_facility_location(neighbors, weights, importance, 120, lazy=False)
    np.testing.assert_array_equal(lazy.selected, plain.selected)
    np.testing.assert_array_equal(lazy.gains, plain.gains)
    assert lazy.evaluations < plain.evaluations / 20


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_batched_lazy_matches_plain_greedy(ties):
    # The batched lazy greedy accepts several picks per vectorised re-evaluation; it must still be plain greedy,
    # bit for bit, whatever the batch size (1 = the scalar Minoux loop, None = adaptive).
    rng = np.random.default_rng(99 + ties)
    accepted_several = False
    for trial in range(40):
        n = int(rng.integers(30, 301))
        k = int(rng.integers(1, 9))
        lam = [0.0, 0.5, 1.0][trial % 3]
        neighbors, weights, importance = random_graph(rng, n, k, ties=ties)
        budget = n if trial % 5 == 0 else int(rng.integers(1, min(n, 80) + 1))
        plain = select_facility_location(neighbors, weights, importance, budget, lam=lam, lazy=False)
        for batch_size in (1, 2, 5, 64, None):
            res = select_facility_location(neighbors, weights, importance, budget, lam=lam, batch_size=batch_size)
            ctx = f"trial {trial}: n={n} k={k} lam={lam} budget={budget} batch_size={batch_size}"
            np.testing.assert_array_equal(res.selected, plain.selected, err_msg=ctx)
            np.testing.assert_array_equal(res.gains, plain.gains, err_msg=ctx)  # bit-identical
            np.testing.assert_array_equal(res.coverage, plain.coverage, err_msg=ctx)
            assert res.uncovered == plain.uncovered
            if batch_size == 64 and budget > 20 and n - budget > 64:  # every round evaluates 64 nodes
                accepted_several |= res.evaluations < 64 * budget  # some round picked more than one node
    assert accepted_several


def test_batch_gains_are_the_scalar_gains_bit_for_bit():
    rng = np.random.default_rng(5)
    n = 400
    neighbors, weights, importance = random_graph(rng, n, 12, missing=0.0)
    importance = np.exp(rng.normal(0.0, 3.0, size=n))  # many magnitudes: summation order shows in the bits
    neighbors, weights, importance, lam = submodular._validate_graph(neighbors, weights, importance, 0.7)
    indptr, src, w, imp_src = submodular._reverse_csr(neighbors, weights, importance)
    cover = np.where(rng.random(n) < 0.3, rng.random(n), 0.0)  # a partly covered pool
    gain, _ = submodular._make_gain(indptr, src, w, imp_src, lam * importance, memoryview(cover))
    ids = rng.permutation(n)[:150]
    got, row, node, weight = submodular._batch_gains(ids, indptr, src, w, imp_src, lam * importance, cover)
    np.testing.assert_array_equal(got, [gain(int(s)) for s in ids])
    # the active records are exactly those with w_vs > cover[v]
    assert np.all(weight > cover[node])
    expected = sum(int(np.sum(w[indptr[s]:indptr[s + 1]] > cover[src[indptr[s]:indptr[s + 1]]])) for s in ids)
    assert row.size == expected
    # numpy's pairwise sum of the same terms differs in the last bits for some rows: the test has teeth
    pairwise = []
    for s in ids:
        seg = slice(indptr[s], indptr[s + 1])
        c = cover[src[seg]]
        pairwise.append(lam * importance[s] + np.sum(np.where(w[seg] > c, imp_src[seg] * (w[seg] - c), 0.0)))
    assert np.any(np.asarray(pairwise) != got)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "8"])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        select_facility_location(*_good(), 1, batch_size=batch_size)


def test_tie_rule_smallest_index():
    # All nodes identical (a ring with equal weights): every first gain ties, so the smallest id wins;
    # afterwards the nodes it does not touch still tie and the smallest of them wins.
    n = 10
    neighbors = np.stack([(np.arange(n) + 1) % n, (np.arange(n) - 1) % n], axis=1)
    weights = np.full((n, 2), 0.5, dtype=np.float32)
    importance = np.ones(n)
    # Oracle: greedy on dense marginal values (exact in binary: all weights are 0.5), first maximiser.
    dense = dense_similarity(neighbors, weights)
    picks = []
    for _ in range(3):
        base = dense_value(picks, dense, importance, 0.0)
        g = [dense_value(picks + [s], dense, importance, 0.0) - base if s not in picks else -1 for s in range(n)]
        picks.append(int(np.argmax(g)))  # np.argmax returns the first (smallest) maximiser
    assert picks == [0, 3, 6]  # gain 2; then 3..7 tie at 2 (1 and 9 half covered); then 6..7 tie
    for lazy in (True, False):
        res = select_facility_location(neighbors, weights, importance, 3, lam=0.0, lazy=lazy)
        assert res.selected.tolist() == picks


# ----------------------------------------------------------------------------------------------------
# Approximation guarantee and submodularity sanity
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,budget", [(12, 3), (10, 4)])
def test_greedy_within_one_minus_one_over_e_of_optimum(n, budget):
    rng = np.random.default_rng(n * 100 + budget)
    for trial in range(8):
        k = int(rng.integers(2, 5))
        lam = [0.0, 0.5, 1.0][trial % 3]
        neighbors, weights, importance = random_graph(rng, n, k, ties=trial % 2 == 1)
        dense = dense_similarity(neighbors, weights)
        optimum = max(dense_value(list(c), dense, importance, lam) for c in itertools.combinations(range(n), budget))
        res = select_facility_location(neighbors, weights, importance, budget, lam=lam)
        value = facility_location_value(res.selected, neighbors, weights, importance, lam=lam)
        assert value >= (1.0 - 1.0 / math.e) * optimum - 1e-12
        assert value <= optimum + 1e-12
        # Greedy gains of a submodular function never increase (exactly: computed gains are monotone).
        assert np.all(np.diff(res.gains) <= 0.0), res.gains
        assert value == pytest.approx(res.gains.sum(), rel=1e-12, abs=1e-12)
        # Each gain is the marginal value of the pick given the earlier picks.
        for i in range(budget):
            marginal = dense_value(res.selected[: i + 1], dense, importance, lam) - dense_value(
                res.selected[:i], dense, importance, lam)
            assert res.gains[i] == pytest.approx(marginal, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Objective value
# ----------------------------------------------------------------------------------------------------


def test_value_matches_dense_computation():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        k = int(rng.integers(1, 7))
        lam = float(rng.choice([0.0, 0.3, 1.0, 2.0]))
        neighbors, weights, importance = random_graph(rng, n, k, ties=trial % 2 == 0, missing=0.2)
        dense = dense_similarity(neighbors, weights)
        size = int(rng.integers(0, n + 1))
        selected = rng.choice(n, size=size, replace=True)  # repeats: S is a set
        expected = dense_value(selected, dense, importance, lam)
        got = facility_location_value(selected, neighbors, weights, importance, lam=lam)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert facility_location_value([], neighbors, weights, importance) == 0.0


def test_value_by_hand():
    neighbors = np.array([[1], [0], [-1]])
    weights = np.array([[0.5], [0.25], [0.0]], dtype=np.float32)
    importance = np.array([1.0, 2.0, 4.0])
    # S = {0}: node 0 covers itself (1*1), node 1 via w_10 = 0.25 (2*0.25), node 2 not at all; + lam*1.
    assert facility_location_value([0], neighbors, weights, importance, lam=0.5) == pytest.approx(1 + 0.5 + 0.5)
    # S = {1, 2}: node 0 via w_01 = 0.5 (1*0.5), 1 and 2 themselves (2 + 4); + 0 * (2 + 4).
    assert facility_location_value([1, 2], neighbors, weights, importance, lam=0.0) == pytest.approx(6.5)


# ----------------------------------------------------------------------------------------------------
# Coverage counts and weights
# ----------------------------------------------------------------------------------------------------


def hand_graph():
    """8 nodes, k = 2, importance 1, lam = 0.

    Reverse lists R(s) with weights: R(0) = {1: .9, 2: .5, 7: 0}, R(1) = {0: .9}, R(2) = {0: .5},
    R(3) = {2: .5, 4: .8}, R(4) = {3: .8}, R(5) = {4: .3}, R(6) = {5: .2}, R(7) = {}.
    First gains: 1 + sum of R(s): node 0 has 2.4, the largest -> pick 0 (covers 1 at .9, 2 at .5).
    Then gain(3) = 1 + max(0, .5 - .5) + .8 = 1.8 and gain(4) = 1 + .8 = 1.8 tie -> pick 3.
    """
    neighbors = np.array([[1, 2], [0, -1], [0, 3], [4, -1], [3, 5], [6, -1], [-1, -1], [0, -1]])
    weights = np.array([[0.9, 0.5], [0.9, 0.0], [0.5, 0.5], [0.8, 0.0], [0.8, 0.3], [0.2, 0.0], [0.0, 0.0],
                        [0.0, 0.0]], dtype=np.float32)
    return neighbors, weights, np.ones(8)


@pytest.mark.parametrize("lazy", [True, False])
def test_coverage_by_hand(lazy):
    neighbors, weights, importance = hand_graph()
    res = select_facility_location(neighbors, weights, importance, 2, lam=0.0, lazy=lazy)
    assert res.selected.tolist() == [0, 3]
    def f32(x: float) -> float:
        return float(np.float32(x))

    assert res.gains.tolist() == [1.0 + f32(0.9) + f32(0.5), 1.0 + f32(0.8)]
    # Node 1 -> 0 (only pick in N(1)); node 2 -> 0 (w=.5 ties with pick 3: smallest id); node 4 -> 3;
    # node 7 -> 0 (a zero-weight edge still names its pick); nodes 5 (N = {6}) and 6 (no edges) are
    # uncovered and spread evenly: counts (1+3, 1+1) + 2/2 = (5, 3), normalised by their mean 4.
    assert res.coverage.tolist() == [4, 2]
    assert res.coverage.dtype == np.int64
    assert res.uncovered == 2
    assert res.coverage.sum() + res.uncovered == 8
    assert res.weights.dtype == np.float32
    np.testing.assert_allclose(res.weights, [1.25, 0.75])
    assert float(res.weights.mean()) == pytest.approx(1.0)


def test_coverage_everything_picked_and_random_weights_mean_one():
    neighbors, weights, importance = hand_graph()
    res = select_facility_location(neighbors, weights, importance, 8, lam=0.0)
    assert sorted(res.selected.tolist()) == list(range(8))
    assert res.coverage.tolist() == [1] * 8 and res.uncovered == 0
    np.testing.assert_array_equal(res.weights, np.ones(8, dtype=np.float32))

    rng = np.random.default_rng(11)
    neighbors, weights, importance = random_graph(rng, 500, 6)
    res = select_facility_location(neighbors, weights, importance, 37)
    assert res.coverage.sum() + res.uncovered == 500
    assert float(res.weights.mean()) == pytest.approx(1.0, rel=1e-6)
    assert np.all(res.weights > 0)
    spread = res.coverage + res.uncovered / 37
    np.testing.assert_allclose(res.weights, spread / spread.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Exactly `budget` picks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [True, False])
def test_exact_budget_after_everything_is_covered(lazy):
    n = 6
    neighbors = np.array([[j for j in range(n) if j != i] for i in range(n)])
    weights = np.ones((n, n - 1), dtype=np.float32)
    # One pick covers everything; then all gains are 0 and the smallest remaining ids fill the budget.
    res = select_facility_location(neighbors, weights, np.ones(n), 4, lam=0.0, lazy=lazy)
    assert res.selected.tolist() == [0, 1, 2, 3]
    assert res.gains.tolist() == [6.0, 0.0, 0.0, 0.0]
    # All importance 0 and lam = 0: every gain is 0 from the start.
    res = select_facility_location(neighbors, weights, np.zeros(n), n, lam=0.0, lazy=lazy)
    assert res.selected.tolist() == list(range(n))
    assert res.gains.tolist() == [0.0] * n
    # lam > 0 keeps ranking the rest by importance once coverage is saturated.
    importance = np.array([1.0, 0.0, 3.0, 0.0, 2.0, 0.0])
    res = select_facility_location(neighbors, weights, importance, 5, lam=1.0, lazy=lazy)
    assert res.selected.tolist() == [2, 4, 0, 1, 3]
    assert res.gains.tolist() == [9.0, 2.0, 1.0, 0.0, 0.0]


def test_budget_zero_and_full():
    rng = np.random.default_rng(5)
    neighbors, weights, importance = random_graph(rng, 40, 4)
    res = select_facility_location(neighbors, weights, importance, 0)
    assert res.selected.shape == (0,) and res.selected.dtype == np.int64
    assert res.gains.shape == (0,) and res.coverage.shape == (0,) and res.weights.shape == (0,)
    assert res.uncovered == 40 and res.evaluations == 0
    res = select_facility_location(neighbors, weights, importance, np.int64(40))
    assert sorted(res.selected.tolist()) == list(range(40))


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _good():
    neighbors = np.array([[1, -1], [0, 2], [1, -1]])
    weights = np.array([[0.5, 0.0], [0.5, 0.3], [0.3, 0.0]], dtype=np.float32)
    return neighbors, weights, np.ones(3)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda nb, w, g: (nb[:, 0], w, g), "neighbors"),
        (lambda nb, w, g: (nb.astype(np.float64), w, g), "neighbors"),
        (lambda nb, w, g: (np.where(nb == 2, 3, nb), w, g), "neighbors"),
        (lambda nb, w, g: (np.where(nb == -1, -2, nb), w, g), "neighbors"),
        (lambda nb, w, g: (nb, w[:, :1], g), "weights"),
        (lambda nb, w, g: (nb, w.astype(np.int64), g), "weights"),
        (lambda nb, w, g: (nb, w + 0.8, g), "weights"),
        (lambda nb, w, g: (nb, w - 0.4, g), "weights"),
        (lambda nb, w, g: (nb, np.where(w > 0.4, np.nan, w), g), "weights"),
        (lambda nb, w, g: (nb, w, g[:2]), "importance"),
        (lambda nb, w, g: (nb, w, g - 2.0), "importance"),
        (lambda nb, w, g: (nb, w, np.array([1.0, np.inf, 1.0])), "importance"),
    ],
)
def test_bad_graph_inputs(change, match):
    neighbors, weights, importance = change(*_good())
    with pytest.raises(ValueError, match=match):
        select_facility_location(neighbors, weights, importance, 1)
    with pytest.raises(ValueError, match=match):
        facility_location_value([0], neighbors, weights, importance)


@pytest.mark.parametrize("budget", [4, -1, 1.5, "2", None, True])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        select_facility_location(*_good(), budget)


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), "x"])
def test_bad_lam(lam):
    with pytest.raises(ValueError, match="lam"):
        select_facility_location(*_good(), 1, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        facility_location_value([0], *_good(), lam=lam)


def test_bad_selected_and_lazy():
    with pytest.raises(ValueError, match="selected"):
        facility_location_value([3], *_good())
    with pytest.raises(ValueError, match="selected"):
        facility_location_value([0.5], *_good())
    with pytest.raises(ValueError, match="lazy"):
        select_facility_location(*_good(), 1, lazy="yes")


def test_negative_zero_inputs_are_harmless():
    # -0.0 passes ">= 0" checks; the greedy orders gains by bit pattern, so it must be normalised.
    neighbors, weights, _ = _good()
    importance = np.array([-0.0, -0.0, 1.0])
    a = select_facility_location(neighbors, -np.zeros_like(weights), importance, 3, lam=-0.0)
    b = select_facility_location(neighbors, np.zeros_like(weights), np.abs(importance), 3, lam=0.0, lazy=False)
    np.testing.assert_array_equal(a.selected, b.selected)
    assert a.selected.tolist() == [2, 0, 1]


def test_docstring_examples():
    failures, tried = doctest.testmod(submodular, verbose=False)
    assert tried >= 3 and failures == 0


def test_initial_bounds_are_upper_bounds_of_exact_first_gains():
    # numpy's vectorised first pass sums in another order than the exact loop; the lazy heap needs
    # bounds >= the exact values (a bound one ulp low can change the pick on a near-tie).
    rng = np.random.default_rng(21)
    low = 0
    for trial in range(20):
        n = 300
        neighbors, weights, _ = random_graph(rng, n, 12, missing=0.0)
        importance = np.exp(rng.normal(0.0, 3.0, size=n))  # many magnitudes: rounding shows up
        neighbors, weights, importance, lam = submodular._validate_graph(neighbors, weights, importance, 0.7)
        indptr, src, w, imp_src = submodular._reverse_csr(neighbors, weights, importance)
        gain, _ = submodular._make_gain(indptr, src, w, imp_src, lam * importance, memoryview(np.zeros(n)))
        exact = np.array([gain(s) for s in range(n)])
        bound = submodular._initial_bounds(indptr, w, imp_src, lam * importance)
        assert np.all(bound >= exact)
        assert np.allclose(bound, exact, rtol=1e-12)
        plain_sum = lam * importance + np.add.reduceat(w * imp_src, indptr[:-1])
        low += int(np.sum(plain_sum < exact))
    assert low > 0  # the uninflated vectorised sum does fall below the exact one: the test has teeth


def test_coverage_weights_match_the_greedys_own_for_its_picks():
    from grace_lightning.submodular import coverage_weights

    rng = np.random.default_rng(5)
    nb = rng.integers(0, 300, size=(300, 6))
    w = rng.random((300, 6), dtype=np.float32)
    result = select_facility_location(nb, w, rng.random(300), budget=40)
    assert np.array_equal(coverage_weights(result.selected, nb, w), result.weights)
