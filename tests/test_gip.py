"""GIP: the greedy procedures against brute-force objectives, and the strategy as a pure function of its inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grace_lightning.strategies.gip as gip
from grace_lightning import ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.strategies.gip import GIP, QueryPosterior, greedy_logdet, greedy_projection


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _projection_value(x_s: np.ndarray, q: np.ndarray) -> float:
    """‖Q P_S‖_F² with P_S from a least-squares fit on the chosen rows (independent of the greedy's updates)."""
    if len(x_s) == 0:
        return 0.0
    coef, *_ = np.linalg.lstsq(x_s.T, q.T, rcond=None)  # q_k ≈ X_S^T c_k
    return float(np.square(x_s.T @ coef).sum())


def _information(x_s: np.ndarray, q: np.ndarray, sigma2: float, sigma_q2: float) -> float:
    """F(S) = −½ log det(Q Σ_S Q^T + σ_q² I), Σ_S = (I + σ⁻² X_S^T X_S)⁻¹, on the explicit m × m matrix."""
    d = q.shape[1]
    sigma = np.linalg.inv(np.eye(d) + x_s.T @ x_s / sigma2) if len(x_s) else np.eye(d)
    sign, logdet = np.linalg.slogdet(q @ sigma @ q.T + sigma_q2 * np.eye(q.shape[0]))
    assert sign > 0
    return -0.5 * logdet


# ---------------------------------------------------------------------- projection objective


@pytest.mark.parametrize("m", [6, 30], ids=["fewer_queries_than_d", "more_queries_than_d"])
def test_projection_greedy_value_and_picks_match_brute_force_after_every_step(m):
    rng = np.random.default_rng(0)
    x, q = _unit_rows(rng, 60, 12), rng.standard_normal((m, 12))
    result = greedy_projection(x, q, budget=12)
    assert result.picks.dtype == np.int64 and len(set(result.picks.tolist())) == result.picks.size
    assert result.picks.size == 12, "generic candidates hold the queries' span only once they span all d = 12 dims"
    for t, pick in enumerate(result.picks):
        before = result.picks[:t]
        brute = _projection_value(x[np.append(before, pick)], q)
        assert result.values[t] == pytest.approx(brute, rel=1e-9, abs=1e-9)
        # The pick is the best single addition by brute force, too.
        best = max(_projection_value(x[np.append(before, i)], q) for i in range(len(x)) if i not in before)
        assert brute == pytest.approx(best, rel=1e-9)
    assert result.values[-1] == pytest.approx(float(np.square(q).sum()), rel=1e-6)  # 12 = d picks span everything


def test_projection_recovers_a_known_query_span_in_exactly_r_picks():
    rng = np.random.default_rng(3)
    d, r = 32, 5
    x = _unit_rows(rng, 400, d)
    generators = rng.choice(400, r, replace=False)
    q = rng.standard_normal((24, r)) @ x[generators]  # queries: random combinations of r candidate rows
    total = float(np.square(q).sum())
    for dtype in (np.float64, np.float32):
        result = greedy_projection(x.astype(dtype), q, budget=r + 4)
        assert sorted(result.picks.tolist()) == sorted(generators.tolist())
        assert result.picks.size == r, "the span is saturated after r picks: the greedy must stop there"
        assert result.values[r - 1] == pytest.approx(total, rel=1e-5)
        assert result.values[r - 2] < total * (1 - 1e-3), "r - 1 picks cannot hold an r-dimensional span"


def test_projection_stops_when_every_candidate_is_in_the_span():
    x = np.eye(3)[[0, 1, 0, 1, 1]]  # only two directions among five rows
    result = greedy_projection(x, np.ones((4, 3)), budget=5)
    assert sorted(result.picks.tolist()) == [0, 1]
    assert result.values[-1] == pytest.approx(8.0)  # the third axis' energy (4) is out of reach


# ---------------------------------------------------------------------- log-det objective


@pytest.mark.parametrize("m", [5, 40], ids=["low_rank_queries", "more_queries_than_d"])
@pytest.mark.parametrize("refactor_every", [None, 2], ids=["rank_one_updates", "frequent_rebuilds"])
def test_incremental_logdet_gain_equals_the_determinant_difference(m, refactor_every):
    rng = np.random.default_rng(1)
    sigma2, sigma_q2 = 0.1, 1e-3
    x, q = _unit_rows(rng, 30, 10), rng.standard_normal((m, 10)) / 3
    order = rng.permutation(30)
    for size in (0, 1, 3, 7, 14):
        chosen = order[:size]
        posterior = QueryPosterior(q, sigma2, sigma_q2, refactor_every=refactor_every)
        for i in chosen:
            posterior.add(x[i])
        f_s = _information(x[chosen], q, sigma2, sigma_q2)
        assert posterior.mutual_information == pytest.approx(f_s - _information(x[:0], q, sigma2, sigma_q2), rel=1e-8)
        others = order[size:][:6]
        gains = posterior.gains(x[others])
        for i, gain in zip(others, gains):
            direct = _information(x[np.append(chosen, i)], q, sigma2, sigma_q2) - f_s
            assert gain == pytest.approx(direct, rel=1e-7, abs=1e-10)
            assert gain > 0


@pytest.mark.parametrize("every", [None, 3], ids=["default", "frequent_rebuilds_and_rescores"])
def test_logdet_greedy_takes_the_best_determinant_gain_at_every_step(monkeypatch, every):
    if every is not None:  # exercise the exact rebuild and rescore paths on a small problem
        monkeypatch.setattr(gip, "_REFACTOR_EVERY", every)
        monkeypatch.setattr(gip, "_RESCORE_EVERY", every + 1)
    rng = np.random.default_rng(2)
    sigma2, sigma_q2 = 0.1, 1e-3
    x, q = _unit_rows(rng, 40, 8), rng.standard_normal((4, 8))  # rank-4 queries, budget beyond d
    initial = [5, 17]
    result = greedy_logdet(x, q, budget=14, sigma2=sigma2, sigma_q2=sigma_q2, initial=initial)
    assert result.picks.size == 14 and not set(result.picks.tolist()) & set(initial)
    f0 = _information(x[:0], q, sigma2, sigma_q2)
    chosen = list(initial)
    for t, pick in enumerate(result.picks):
        f_s = _information(x[chosen], q, sigma2, sigma_q2)
        gains = {i: _information(x[chosen + [i]], q, sigma2, sigma_q2) - f_s for i in range(40) if i not in chosen}
        assert gains[int(pick)] >= max(gains.values()) - 1e-9
        chosen.append(int(pick))
        assert result.values[t] == pytest.approx(_information(x[chosen], q, sigma2, sigma_q2) - f0, rel=1e-8)
    assert np.all(np.diff(result.values) > 0), "information never hurts"


def test_logdet_greedy_in_float32_matches_float64():
    rng = np.random.default_rng(4)
    x, q = _unit_rows(rng, 500, 16), rng.standard_normal((40, 16))
    exact = greedy_logdet(x, q, budget=60)
    single = greedy_logdet(x.astype(np.float32), q, budget=60)
    assert single.values[-1] == pytest.approx(exact.values[-1], rel=1e-4)
    assert np.mean(single.picks == exact.picks) > 0.9


# ---------------------------------------------------------------------- the strategy


def _aligned_pool(seed=0, n_aligned=60, n_distractors=240, d=16, r=4, noise=0.05, query_noise=0.0, measured=None):
    """Aligned examples lie near an r-dimensional target span (``noise`` off it); distractors are orthogonal to it.

    The reference queries are random combinations of the target directions, plus ``query_noise`` in all d.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    target, rest = basis[:, :r], basis[:, r:]
    aligned = torch.randn(n_aligned, r, generator=g) @ target.T + noise * torch.randn(n_aligned, d, generator=g)
    distractors = torch.randn(n_distractors, d - r, generator=g) @ rest.T
    embedding = torch.cat([aligned, distractors])
    perm = torch.randperm(len(embedding), generator=g)
    embedding, is_aligned = embedding[perm], (perm < n_aligned)
    n = len(embedding)
    store = SignalStore(n)
    idx = torch.arange(n) if measured is None else measured
    store.update(idx, ExampleSignals(loss=torch.ones(len(idx)), grad_norm=torch.ones(len(idx)), embedding=embedding[idx]), step=0)
    queries = torch.randn(32, r, generator=g) @ target.T + query_noise * torch.randn(32, d, generator=g)
    reference = ExampleSignals(loss=torch.ones(32), grad_norm=torch.ones(32), embedding=queries)
    return store, is_aligned, reference


def _inputs(store, budget, reference=None, quality=None, seed=0):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        reference=reference, quality=quality,
    )


@pytest.mark.parametrize("budget, objective", [(4, 0.0), (40, 1.0)], ids=["projection", "logdet"])
def test_gip_selects_budget_distinct_examples_aligned_with_the_reference(budget, objective):
    store, is_aligned, reference = _aligned_pool()
    selection = GIP().select(_inputs(store, budget, reference=reference))
    idx = selection.indices
    assert idx.dtype == torch.int64 and idx.numel() == budget and idx.unique().numel() == budget
    assert bool((idx.diff() > 0).all()) and selection.weights is None
    assert selection.diagnostics["objective_logdet"] == objective  # auto: projection iff budget <= d = 16
    assert selection.diagnostics["queries"] == 32.0 and selection.diagnostics["filled_unmeasured"] == 0.0
    share = float(is_aligned[idx].float().mean())
    assert share >= 0.95, f"{share:.2f} of the picks are aligned; the pool's rate is {float(is_aligned.float().mean()):.2f}"


def test_gip_projection_fills_the_budget_past_saturation_with_logdet_picks():
    store, is_aligned, reference = _aligned_pool()
    selection = GIP(objective="projection").select(_inputs(store, 30, reference=reference))
    d = selection.diagnostics
    assert selection.indices.unique().numel() == 30
    assert d["projection_picks"] + d["logdet_picks"] == 30 and d["projection_picks"] <= 16
    assert 0.9 < d["projection_share"] <= 1.0 + 1e-6


def test_gip_larger_query_noise_ignores_weak_query_directions():
    # Queries with a little energy off the target span: the log-det counts a direction once its query energy
    # is well above sigma_q2, so a small sigma_q2 spends picks on the distractors that explain the weak ones.
    store, is_aligned, reference = _aligned_pool(query_noise=0.02)
    shares = [
        float(is_aligned[GIP(sigma_q2=sq).select(_inputs(store, 40, reference=reference)).indices].float().mean())
        for sq in (1e-3, 1.0)
    ]
    assert shares[1] > shares[0] + 0.2, shares
    assert shares[0] > 2 * float(is_aligned.float().mean()), "still far above the pool's rate"


def test_gip_quality_queries_favour_high_quality_examples():
    store, is_aligned, _ = _aligned_pool(noise=0.0)
    quality = torch.where(is_aligned, 5.0, -1.0)  # negative scores count as 0
    strategy = GIP(queries="quality", max_queries=20)
    selection = strategy.select(_inputs(store, 30, quality=quality))
    assert selection.diagnostics["queries"] == 20.0 and selection.diagnostics["reference_queries"] == 0.0
    assert float(is_aligned[selection.indices].float().mean()) >= 0.9
    # auto prefers the reference set when the refresh has both
    both = GIP().select(_inputs(store, 30, reference=_aligned_pool()[2], quality=quality))
    assert both.diagnostics["reference_queries"] == 1.0


def test_gip_same_seed_same_selection_and_fills_from_unmeasured_examples():
    measured = torch.arange(0, 300, 3)  # 100 measured
    store, is_aligned, _ = _aligned_pool(measured=measured)
    quality = is_aligned.float() + 0.5
    strategy = GIP(queries="quality", max_queries=10)  # a drawn query subset: the generator matters
    a = strategy.select(_inputs(store, 130, quality=quality, seed=7))
    b = strategy.select(_inputs(store, 130, quality=quality, seed=7))
    assert torch.equal(a.indices, b.indices)
    assert a.indices.numel() == 130 and a.indices.unique().numel() == 130
    assert bool(torch.isin(measured, a.indices).all()), "every measured example is chosen before any fill"
    assert a.diagnostics["filled_unmeasured"] == 30.0
    c = strategy.select(_inputs(store, 130, quality=quality, seed=8))
    assert not torch.equal(a.indices, c.indices), "the fill is drawn with the generator"


def test_gip_check_inputs_says_how_to_pass_queries():
    with pytest.raises(ValueError, match=r"reference=dataset.*quality=scores"):
        GIP().check_inputs(has_reference=False, has_quality=False)
    with pytest.raises(ValueError, match=r"reference=dataset"):
        GIP(queries="reference").check_inputs(has_reference=False, has_quality=True)
    with pytest.raises(ValueError, match=r"quality=scores"):
        GIP(queries="quality").check_inputs(has_reference=True, has_quality=False)
    GIP().check_inputs(has_reference=True, has_quality=False)
    GIP().check_inputs(has_reference=False, has_quality=True)
    assert GIP.needs == frozenset({"embedding"}) and GIP.reference == "optional"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"objective": "mi"}, "objective"),
        ({"queries": "metadata"}, "queries"),
        ({"sigma2": 0.0}, "sigma2"),
        ({"sigma2": -1.0}, "sigma2"),
        ({"sigma2": math.nan}, "sigma2"),
        ({"sigma_q2": 0}, "sigma_q2"),
        ({"sigma_q2": "small"}, "sigma_q2"),
        ({"max_queries": 0}, "max_queries"),
        ({"max_queries": 2.5}, "max_queries"),
        ({"max_queries": True}, "max_queries"),
    ],
)
def test_gip_rejects_bad_parameters_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        GIP(**kwargs)


def test_gip_is_registered_and_rejects_a_pool_without_embeddings():
    strategy = build_strategy("gip", objective="logdet", sigma2=0.5)
    assert isinstance(strategy, GIP) and "logdet" in repr(strategy)
    store = SignalStore(10)
    store.update(torch.arange(10), ExampleSignals(loss=torch.ones(10), grad_norm=torch.ones(10)), step=0)
    with pytest.raises(ValueError, match="embedding"):
        strategy.select(_inputs(store, 5, quality=torch.ones(10)))


# ----------------------------------------------------------------------------------------------------------------
# stochastic greedy (the default for large picks x candidates)


def test_stochastic_greedy_reaches_the_exact_greedys_value_and_is_seeded():
    from grace_lightning.strategies.gip import greedy_logdet, greedy_logdet_stochastic

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((48, 24))
    for budget in (100, 600):
        exact = greedy_logdet(x, q, budget)
        fast = greedy_logdet_stochastic(x, q, budget, seed=1)
        assert fast.picks.size == budget == np.unique(fast.picks).size
        assert fast.values[-1] >= 0.99 * exact.values[-1]
        assert np.array_equal(fast.picks, greedy_logdet_stochastic(x, q, budget, seed=1).picks)
        assert not np.array_equal(fast.picks, greedy_logdet_stochastic(x, q, budget, seed=2).picks)
    # it is a greedy, not a draw: far better than a uniform subset of the same size
    uniform = rng.choice(3000, size=100, replace=False)
    from grace_lightning.strategies.gip import QueryPosterior

    post = QueryPosterior(q, 0.1, 1e-3)
    for i in uniform:
        post.add(x[i])
    assert greedy_logdet_stochastic(x, q, 100, seed=1).values[-1] > post.mutual_information + 0.5  # nats


@pytest.mark.parametrize("refactor_every", [None, 5], ids=["rank_b_updates", "rebuild_mid_batch"])
def test_adding_a_block_equals_adding_its_rows_one_at_a_time(refactor_every):
    rng = np.random.default_rng(7)
    x, q = _unit_rows(rng, 40, 12), _unit_rows(rng, 30, 12)
    one, block = QueryPosterior(q, 0.1, 1e-3, refactor_every), QueryPosterior(q, 0.1, 1e-3, refactor_every)
    for lo in (0, 3, 9, 17):  # blocks of 3, 6 and 8 rows; with refactor_every=5 the rebuilds fall inside blocks
        hi = {0: 3, 3: 9, 9: 17, 17: 25}[lo]
        gains = [one.add(row) for row in x[lo:hi]]
        assert block.add_many(x[lo:hi]) == pytest.approx(sum(gains), rel=1e-9, abs=1e-12)
        assert block.size == one.size == hi
        np.testing.assert_allclose(block.sigma, one.sigma, atol=1e-10)
        np.testing.assert_allclose(block.m, one.m, atol=1e-8)
        assert block.mutual_information == pytest.approx(one.mutual_information, rel=1e-9)
    mi = _information(x[:25], q, 0.1, 1e-3) - _information(x[:0], q, 0.1, 1e-3)
    assert block.mutual_information == pytest.approx(mi, rel=1e-9)


def test_stochastic_greedy_in_steps_of_several_picks_keeps_the_objective():
    from grace_lightning.strategies.gip import greedy_logdet_stochastic

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 24))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[1500:1600] = x[:100]  # exact duplicates in one step must not break the rank-b update
    q = rng.standard_normal((48, 24))
    for budget in (600, 1500):
        exact = greedy_logdet(x, q, budget)
        for batch in (4, 16, 64):
            fast = greedy_logdet_stochastic(x, q, budget, seed=1, batch=batch)
            assert fast.picks.size == budget == np.unique(fast.picks).size
            assert fast.values[-1] >= 0.99 * exact.values[-1]
            mi = _information(x[fast.picks], q, 0.1, 1e-3) - _information(x[:0], q, 0.1, 1e-3)
            assert fast.values[-1] == pytest.approx(mi, rel=1e-9)
            steps = np.unique(fast.values).size  # values repeat within a step
            assert steps >= 64 and steps >= budget // batch
    # batch=1 is the sequential greedy, bit for bit; so is any batch on a budget under 128 (at least 64 steps)
    sequential = greedy_logdet_stochastic(x, q, 100, seed=3).picks
    for batch in (1, 64):
        assert np.array_equal(greedy_logdet_stochastic(x, q, 100, seed=3, batch=batch).picks, sequential)
    with pytest.raises(ValueError, match="`batch` must be"):
        greedy_logdet_stochastic(x, q, 10, batch=0)
    with pytest.raises(ValueError, match="picks_per_step"):
        GIP(picks_per_step=0)


def test_auto_switches_to_the_stochastic_greedy_for_large_problems():
    n, d = 2000, 16
    g = torch.Generator().manual_seed(0)
    store = SignalStore(n, max_embedding_dim=None)
    store.update(torch.arange(n), ExampleSignals(loss=torch.rand(n), grad_norm=torch.rand(n), embedding=torch.randn(n, d, generator=g)), step=0)
    ref = ExampleSignals(loss=torch.rand(32), grad_norm=torch.rand(32), embedding=torch.randn(32, d, generator=g))
    inputs = SelectionInput(pool_size=n, budget=500, store=store, generator=torch.Generator().manual_seed(1), reference=ref)
    small = GIP(exact_limit=1e9).select(inputs)
    large = GIP(exact_limit=1e3).select(SelectionInput(pool_size=n, budget=500, store=store, generator=torch.Generator().manual_seed(1), reference=ref))
    assert small.diagnostics["stochastic_greedy"] == 0.0 and large.diagnostics["stochastic_greedy"] == 1.0
    assert large.indices.numel() == 500 == torch.unique(large.indices).numel()
    assert large.diagnostics["objective_value"] >= 0.99 * small.diagnostics["objective_value"]
    # the switch counts the width: the same picks x candidates go stochastic sooner on wider embeddings
    limit = 500 * n * 1.5  # between picks x candidates x 16/128 and x 256/128
    assert GIP(exact_limit=limit).select(inputs).diagnostics["stochastic_greedy"] == 0.0
    wide = SignalStore(n, max_embedding_dim=None)
    wide.update(torch.arange(n), ExampleSignals(loss=torch.rand(n), grad_norm=torch.rand(n), embedding=torch.randn(n, 256, generator=g)), step=0)
    wide_ref = ExampleSignals(loss=torch.rand(32), grad_norm=torch.rand(32), embedding=torch.randn(32, 256, generator=g))
    wide_inputs = SelectionInput(pool_size=n, budget=500, store=wide, generator=torch.Generator().manual_seed(1), reference=wide_ref)
    assert GIP(exact_limit=limit).select(wide_inputs).diagnostics["stochastic_greedy"] == 1.0
    with pytest.raises(ValueError, match="`greedy` must be"):
        GIP(greedy="lazy")
    with pytest.raises(ValueError, match="`epsilon` must be"):
        GIP(epsilon=0.0)
