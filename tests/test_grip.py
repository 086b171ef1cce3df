"""GRIP as a pure function of the store, its cluster state, probe losses, a budget and a generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grace_lightning import ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.probes import ProbeResults
from grace_lightning.strategies.grip import (
    Grip,
    GripState,
    allocate_budgets,
    cluster_base_weights,
    gumbel_top_k,
    intra_cluster_probabilities,
    local_density,
    neyman_allocation,
    rank01,
    replay_multipliers,
)


def _clustered_store(per_cluster=(100, 100, 100), dim=16, seed=0, measured=None, lengths=None):
    """Tight, well separated clusters on the sphere; returns the store and each example's true cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.linalg.qr(torch.randn(dim, len(per_cluster), generator=g)).Q.T  # orthonormal centres
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_cluster)])
    emb = centers[labels] + 0.05 * torch.randn(len(labels), dim, generator=g)
    store = SignalStore(len(labels))
    ids = torch.arange(len(labels)) if measured is None else measured
    length = torch.full((len(labels),), 16, dtype=torch.long) if lengths is None else lengths
    loss = torch.rand(len(labels), generator=g)
    signals = ExampleSignals(loss=loss[ids], grad_norm=loss[ids], embedding=emb[ids], length=length[ids])
    store.update(ids, signals, step=0)
    return store, labels


def _inputs(store, budget, state, seed=0, probe=None, quality=None):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        epoch=1, step=40, now_batch=40, state=state, probe=probe, quality=quality,
    )


def _fabricated_probe(request, planted_cluster, planted_drop=0.75, other_drop=0.1):
    """Losses [L_init, L_final] per task: the planted cluster's loss drops by `planted_drop` (ratio), others less."""
    drops = [planted_drop if int(c) == planted_cluster else other_drop for c in request.keys]
    losses = tuple(torch.tensor([2.0, 2.0 * (1 - d)], dtype=torch.float64) for d in drops)
    return ProbeResults(losses=losses, request=request)


def _cluster_counts(state, indices):
    """Picks per cluster of the strategy's own clustering (k-means may not recover the generating clusters)."""
    return np.bincount(state.assignment.numpy()[indices.numpy()], minlength=int(state.dispersion.numel()))


def _run(grip, store, budget, planted=None, seed=0, quality=None):
    state = grip.create_state(store.pool_size)
    request = grip.to_probe(_inputs(store, budget, state, seed=seed, quality=quality))
    probe = None if planted is None else _fabricated_probe(request, planted)
    selection = grip.select(_inputs(store, budget, state, seed=seed + 1, probe=probe, quality=quality))
    return selection, state, request


# ---------------------------------------------------------------------- budgets
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_budgets_without_probe_or_quality_follow_cluster_size_to_the_tau(tau):
    sizes = np.array([400, 100, 25, 900])
    weights, gated = cluster_base_weights(sizes, tau=tau)
    budgets = allocate_budgets(weights, sizes, 130)
    expected = 130 * sizes**tau / (sizes**tau).sum()
    assert budgets.sum() == 130 and not gated.any()
    assert np.all(np.abs(budgets - expected) < 1.0), (budgets, expected)
    # Size ratio 4 between clusters 0 and 1: budget ratio 2 under square-root sampling, 4 when proportional.
    assert abs(budgets[0] / budgets[1] - 4**tau) < 0.15 * 4**tau


def test_select_per_cluster_counts_follow_tau_end_to_end():
    store, _ = _clustered_store(per_cluster=(160, 40, 10))
    for tau, budget in ((1.0, 42), (0.5, 70)):
        grip = Grip(clusters=4, probe_fraction=0.0, tau=tau)
        state = grip.create_state(store.pool_size)
        selection = grip.select(_inputs(store, budget, state))
        counts = _cluster_counts(state, selection.indices)
        sizes = np.bincount(state.assignment.numpy(), minlength=counts.size)
        expected = budget * sizes**tau / (sizes**tau).sum()
        assert counts.sum() == budget and np.all(np.abs(counts - expected) < 1.0), (tau, counts, expected)
        assert np.array_equal(counts, state.last_budgets.numpy())


def test_larger_probe_drop_earns_more_budget_growing_with_alpha_and_sign_flips_it():
    delta = np.array([0.1, 0.5, 0.1, 0.2])
    sizes = np.full(4, 100)
    w0, _ = cluster_base_weights(sizes)
    planted = [allocate_budgets(w0 * replay_multipliers(delta, alpha), sizes, 80)[1] for alpha in (0.0, 1.0, 3.0)]
    assert planted[0] == 20 and planted[0] < planted[1] < planted[2], planted
    flipped = allocate_budgets(w0 * replay_multipliers(delta, 1.0, sign=-1), sizes, 80)[1]
    assert flipped < planted[0]


def test_planted_probe_drop_grows_that_clusters_picks_end_to_end():
    store, _ = _clustered_store()
    picks = {}
    for alpha, sign in ((0.0, 1), (1.0, 1), (3.0, 1), (1.0, -1)):
        grip = Grip(clusters=3, probe_fraction=0.1, alpha=alpha, replay_sign=sign)
        selection, state, _ = _run(grip, store, 60, planted=1)
        picks[(alpha, sign)] = int(_cluster_counts(state, selection.indices)[1])
        assert selection.diagnostics["probed_clusters"] == 3.0
    assert picks[(0.0, 1)] < picks[(1.0, 1)] < picks[(3.0, 1)], picks
    assert picks[(1.0, -1)] < picks[(0.0, 1)], picks


def test_absolute_replay_signal_ranks_by_the_raw_loss_drop():
    # Cluster 0 drops 1.0 of 10 (ratio 0.1), cluster 1 drops 0.5 of 1 (ratio 0.5): the two signals disagree.
    losses = (torch.tensor([10.0, 9.0]), torch.tensor([1.0, 0.5]))
    from grace_lightning.strategies.grip import adaptation_delta

    assert np.argmax(adaptation_delta(losses, "ratio")) == 1
    assert np.argmax(adaptation_delta(losses, "absolute")) == 0


def test_budgets_cap_at_cluster_size_redistribute_and_sum_exactly():
    budgets = allocate_budgets(np.array([1.0, 10.0, 1.0]), np.array([50, 5, 50]), 40)
    assert budgets[1] == 5 and budgets.sum() == 40 and abs(int(budgets[0]) - int(budgets[2])) <= 1
    assert allocate_budgets(np.array([1.0, 2.0, 3.0]), np.array([3, 4, 5]), 12).tolist() == [3, 4, 5]
    # Gated (zero-weight) clusters only take what the others cannot hold.
    assert allocate_budgets(np.array([0.0, 1.0]), np.array([10, 5]), 8).tolist() == [3, 5]
    assert allocate_budgets(np.array([0.0, 1.0]), np.array([10, 5]), 4).tolist() == [0, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        caps = rng.integers(0, 30, size=7)
        budget = int(rng.integers(0, caps.sum() + 1))
        out = allocate_budgets(rng.random(7), caps, budget)
        assert out.sum() == budget and np.all(out >= 0) and np.all(out <= caps)
    with pytest.raises(ValueError, match="budget"):
        allocate_budgets(np.ones(2), np.array([3, 3]), 7)


def test_quality_softmax_favours_good_clusters_and_the_gate_drops_the_worst():
    store, labels = _clustered_store()
    quality = torch.tensor([0.0, 1.0, 3.0])[labels].float()
    for gate in (0.1, 0.0):
        grip = Grip(clusters=3, probe_fraction=0.0, quality_gate=gate)
        state = grip.create_state(store.pool_size)
        selection = grip.select(_inputs(store, 60, state, quality=quality))
        counts = _cluster_counts(state, selection.indices)
        sizes = np.bincount(state.assignment.numpy(), minlength=3)
        q = np.bincount(state.assignment.numpy(), weights=quality.numpy(), minlength=3) / sizes
        order = np.argsort(q)  # worst cluster first
        per_size = counts[order] / np.sqrt(sizes[order])
        if gate > 0:
            assert counts[order[0]] == 0 and 0 < per_size[1] < per_size[2], (counts, q)
            assert selection.diagnostics["gated_clusters"] == 1.0
        else:
            assert 0 < per_size[0] < per_size[1] < per_size[2], (counts, q)


def test_rank01_and_replay_multipliers():
    assert rank01(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert rank01(np.array([1.0, 1.0, 2.0])).tolist() == [0.25, 0.25, 1.0]
    r = replay_multipliers(np.array([0.1, np.nan, 0.3]), alpha=2.0)
    assert r.tolist() == [1.0, 2.0, 3.0]  # the unprobed cluster sits at the middle rank
    assert replay_multipliers(np.full(3, np.nan), alpha=2.0).tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------- Neyman allocation
def test_neyman_allocation_is_proportional_to_size_times_dispersion():
    sizes = np.array([200, 100, 50, 300])
    dispersion = np.array([0.1, 0.4, 0.2, 0.05])
    counts = neyman_allocation(sizes, dispersion, 60, minimum=4)
    expected = 60 * sizes * dispersion / (sizes * dispersion).sum()
    assert counts.sum() == 60 and np.all(np.abs(counts - expected) < 1.0), (counts, expected)


def test_neyman_allocation_respects_the_minimum_and_the_caps():
    # The small cluster's share (0.2) is raised to the minimum; the rest stays proportional.
    assert neyman_allocation(np.array([1000, 10]), np.array([0.3, 0.3]), 20, minimum=4).tolist() == [16, 4]
    # A dispersed but tiny cluster is capped at its size and the excess goes to the other.
    assert neyman_allocation(np.array([2, 100]), np.array([1.0, 0.001]), 10, minimum=4).tolist() == [2, 8]
    # The total is raised to cover every cluster's minimum.
    counts = neyman_allocation(np.array([50, 50, 50]), np.array([0.1, 0.2, 0.3]), 3, minimum=4)
    assert counts.tolist() == [4, 4, 4]


# ---------------------------------------------------------------------- length-rectified prior
def _dense_long_cluster(seed=0, dim=16):
    """One cluster: a tight core of 100 long examples and a loose halo of 100 short ones."""
    g = torch.Generator().manual_seed(seed)
    center = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    core = center + 0.02 * torch.randn(100, dim, generator=g)
    halo = center + 0.3 * torch.randn(100, dim, generator=g)
    emb = torch.nn.functional.normalize(torch.cat([core, halo]), dim=1).numpy()
    lengths = np.concatenate([np.full(100, 512), np.full(100, 32)])
    return emb, lengths, lengths == 512


def test_length_prior_shifts_picks_towards_long_examples_in_dense_regions_as_beta_grows():
    emb, lengths, long = _dense_long_cluster()
    betas = (0.0, 0.3, 1.0, 3.0)
    expected = [float(intra_cluster_probabilities(emb, lengths, beta)[long].sum()) for beta in betas]
    assert all(a < b for a, b in zip(expected, expected[1:])), expected
    # The density prior alone avoids the dense core; a strong length prior overturns that.
    assert expected[0] < 0.4 and expected[-1] > 0.6, expected
    # Monte-Carlo share of 40 picks without replacement, same generator seeds for every beta.
    shares = []
    for beta in betas:
        pi = intra_cluster_probabilities(emb, lengths, beta)
        picks = [gumbel_top_k(pi, 40, torch.Generator().manual_seed(s)) for s in range(30)]
        shares.append(float(np.mean([long[p].mean() for p in picks])))
    assert all(a <= b for a, b in zip(shares, shares[1:])), shares
    assert shares[-1] > shares[0] + 0.3, shares


def test_select_applies_the_length_prior_inside_clusters():
    emb, lengths, long = _dense_long_cluster()
    store = SignalStore(200)
    loss = torch.ones(200)
    signals = ExampleSignals(loss, loss, torch.from_numpy(emb), torch.from_numpy(lengths))
    store.update(torch.arange(200), signals, step=0)
    shares = {}
    for beta in (0.0, 3.0):
        grip = Grip(clusters=1, probe_fraction=0.0, beta=beta)
        picks = [grip.select(_inputs(store, 40, grip.create_state(200), seed=s)).indices for s in range(10)]
        shares[beta] = float(np.mean([long[p.numpy()].mean() for p in picks]))
    assert shares[0.0] < 0.4 and shares[3.0] > shares[0.0] + 0.3, shares


def test_equal_lengths_give_no_length_effect():
    emb, _, _ = _dense_long_cluster()
    same = np.full(200, 64)
    assert np.allclose(intra_cluster_probabilities(emb, same, 0.0), intra_cluster_probabilities(emb, same, 3.0))


def test_density_against_every_row_as_reference_is_the_exact_density():
    emb, _, _ = _dense_long_cluster()
    emb = np.concatenate([emb, emb[:5]])  # exact duplicates: their self-match may come second
    exact = local_density(emb, knn=10)
    # equal up to float32 rounding of the self-match's distance, which the exact search computes (~1e-7)
    assert np.allclose(local_density(emb, knn=10, reference=np.arange(len(emb))), exact, rtol=1e-4, atol=0)


def test_density_against_a_sample_keeps_the_order_of_dense_and_sparse_rows():
    emb, _, long = _dense_long_cluster()  # a tight core (long) and a loose halo
    exact = local_density(emb, knn=10)
    reference = np.sort(torch.randperm(len(emb), generator=torch.Generator().manual_seed(1))[:60].numpy())
    sampled = local_density(emb, knn=10, reference=reference)
    assert sampled.shape == exact.shape and np.isfinite(sampled).all()
    assert sampled.min() >= 1 / 11 - 1e-12 and sampled.max() <= 1 + 1e-12  # itself counted, as the exact one
    assert sampled[long].mean() > 2 * sampled[~long].mean()  # the core stays the dense part
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(ranks(sampled), ranks(exact))[0, 1] > 0.8


def test_a_cluster_larger_than_density_sample_is_drawn_from_a_sampled_density():
    store, _ = _clustered_store(per_cluster=(150, 100, 50))
    small = Grip(clusters=3, probe_fraction=0.0, density_sample=40)
    a = small.select(_inputs(store, 90, small.create_state(store.pool_size), seed=5))
    b = small.select(_inputs(store, 90, small.create_state(store.pool_size), seed=5))
    assert torch.equal(a.indices, b.indices) and a.indices.unique().numel() == 90
    # above every cluster's size the sample is the whole cluster: the exact density, the same draw as None
    exact = Grip(clusters=3, probe_fraction=0.0, density_sample=None)
    large = Grip(clusters=3, probe_fraction=0.0, density_sample=150)
    picks = [g.select(_inputs(store, 90, g.create_state(store.pool_size), seed=5)).indices for g in (exact, large)]
    assert torch.equal(*picks)


def test_gumbel_top_k_never_repeats_and_follows_the_probabilities():
    pi = np.array([0.7, 0.1, 0.1, 0.1, 0.0])
    firsts = [int(gumbel_top_k(pi, 2, torch.Generator().manual_seed(s))[0]) for s in range(200)]
    assert 0.55 < firsts.count(0) / 200 < 0.85
    picks = gumbel_top_k(pi, 4, torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) == 4 and 4 not in picks


@pytest.mark.parametrize("kind", ["continuous", "half zero", "all zero"])
def test_gumbel_top_k_is_the_head_of_the_stable_descending_sort_of_its_keys(kind):
    """It partitions instead of sorting all keys; the picks and their order must be the full sort's, ties (zero
    probabilities, whose keys are all -inf) in index order."""
    rng = np.random.default_rng(3)
    pi = {"continuous": rng.random(500), "half zero": np.where(rng.random(500) < 0.5, 0.0, rng.random(500)),
          "all zero": np.zeros(500)}[kind]
    for count in (1, 7, 250, 499, 500):
        noise = torch.rand(500, generator=torch.Generator().manual_seed(count), dtype=torch.float64)
        with np.errstate(divide="ignore"):
            keys = np.log(pi) - np.log(-np.log(noise.clamp(1e-12, 1 - 1e-12).numpy()))
        expected = np.argsort(-keys, kind="stable")[:count]
        np.testing.assert_array_equal(gumbel_top_k(pi, count, torch.Generator().manual_seed(count)), expected)


# ---------------------------------------------------------------------- end to end, without the callback
def test_to_probe_asks_one_probe_per_cluster_with_disjoint_halves_of_one_cluster():
    store, _ = _clustered_store(per_cluster=(150, 100, 50))
    grip = Grip(clusters=3, probe_fraction=0.1, rap_steps=10)
    state = grip.create_state(store.pool_size)
    request = grip.to_probe(_inputs(store, 60, state))
    assert len(request.tasks) == 3 and request.trainable == "head" and request.reset_head is False
    assert request.head_features == "frozen"
    total = 0
    for task, cluster in zip(request.tasks, request.keys):
        assert len(task.steps) == 10 and all(torch.equal(s, task.steps[0]) for s in task.steps)
        assert task.eval_every_step is False and task.num_losses == 2
        train, heldout = task.steps[0], task.eval_indices
        assert train.dtype == torch.int64 and heldout.dtype == torch.int64
        assert train.numel() >= 2 and heldout.numel() >= 2 and abs(train.numel() - heldout.numel()) <= 1
        assert not torch.isin(train, heldout).any()
        assert state.assignment[torch.cat([train, heldout])].unique().tolist() == [int(cluster)]
        total += train.numel() + heldout.numel()
    assert total == 30  # 10% of 300
    assert sorted(request.keys.tolist()) == [0, 1, 2]
    assert Grip(clusters=3, probe_fraction=0.1, rap_features="live").to_probe(_inputs(store, 60, grip.create_state(store.pool_size))).head_features == "live"


def test_select_returns_budget_distinct_sorted_indices_and_is_deterministic():
    store, _ = _clustered_store()
    grip = Grip(clusters=3, probe_fraction=0.1)
    a, _, _ = _run(grip, store, 50, planted=2, seed=3)
    b, _, _ = _run(grip, store, 50, planted=2, seed=3)
    assert a.indices.dtype == torch.int64 and a.indices.numel() == 50 and a.indices.unique().numel() == 50
    assert torch.equal(a.indices, a.indices.sort().values) and a.weights is None
    assert torch.equal(a.indices, b.indices)
    c, _, _ = _run(grip, store, 50, planted=2, seed=4)
    assert not torch.equal(a.indices, c.indices)
    for key in ("clusters", "probe_examples", "delta_mean", "delta_min", "delta_max", "budget_entropy"):
        assert isinstance(a.diagnostics[key], float)
    assert a.diagnostics["delta_max"] == pytest.approx(0.75)


def test_select_without_probes_reclusters_and_uses_no_replay():
    store, _ = _clustered_store()
    grip = Grip(clusters=3)
    selection = grip.select(_inputs(store, 30, grip.create_state(store.pool_size)))
    assert selection.indices.unique().numel() == 30 and selection.diagnostics["probed_clusters"] == 0.0
    with pytest.raises(ValueError, match="to_probe"):
        grip.select(_inputs(store, 30, grip.create_state(store.pool_size), probe=ProbeResults(losses=())))


def test_unmeasured_examples_only_fill_what_the_measured_cannot():
    measured = torch.arange(0, 300, 2)  # half the pool has embeddings
    store, _ = _clustered_store(measured=measured)
    grip = Grip(clusters=3)
    small = grip.select(_inputs(store, 100, grip.create_state(300)))
    assert bool(torch.isin(small.indices, measured).all())
    large = grip.select(_inputs(store, 200, grip.create_state(300)))
    assert large.indices.unique().numel() == 200 and bool(torch.isin(measured, large.indices).all())
    assert large.diagnostics["filled_unmeasured"] == 50.0


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    store, _ = _clustered_store()
    grip = Grip(clusters=3, probe_fraction=0.1)
    state = grip.create_state(store.pool_size)
    probe = _fabricated_probe(grip.to_probe(_inputs(store, 50, state)), planted_cluster=0)
    torch.save(state.state_dict(), tmp_path / "grip.pt")
    restored = GripState(store.pool_size)
    restored.load_state_dict(torch.load(tmp_path / "grip.pt", weights_only=True))
    assert torch.equal(restored.assignment, state.assignment)
    a = grip.select(_inputs(store, 50, state, seed=9, probe=probe))
    b = grip.select(_inputs(store, 50, restored, seed=9, probe=probe))
    assert torch.equal(a.indices, b.indices)
    torch.save(state.state_dict(), tmp_path / "after.pt")  # with last_delta / last_budgets filled
    torch.load(tmp_path / "after.pt", weights_only=True)


def test_reestimate_every_redraws_from_the_last_estimate_between_estimates(monkeypatch):
    """With reestimate_every=3 the refreshes go estimate, redraw, redraw, estimate: a redraw scores, clusters, probes
    and measures densities nothing, keeps the estimate's per-cluster budgets, and draws a fresh subset."""
    import grace_lightning.strategies.grip as grip_module

    store, _ = _clustered_store(per_cluster=(120, 90, 60))
    grip = Grip(clusters=3, probe_fraction=0.1, reestimate_every=3)
    state = grip.create_state(store.pool_size)

    def refresh(seed):
        inputs = _inputs(store, 60, state, seed=seed)
        scored, request = grip.to_score(inputs), grip.to_probe(inputs)
        probe = None if request is None else _fabricated_probe(request, planted_cluster=0)
        selection = grip.select(_inputs(store, 60, state, seed=seed + 100, probe=probe))
        return scored, request, selection

    scored, request, first = refresh(0)
    assert request is not None and scored is not None and first.diagnostics["redrawn"] == 0.0
    budgets = state.last_budgets.clone()
    assignment = state.assignment.clone()
    monkeypatch.setattr(grip_module, "intra_cluster_probabilities", lambda *a, **k: pytest.fail("density measured"))
    monkeypatch.setattr(grip_module, "spherical_kmeans", lambda *a, **k: pytest.fail("clustered"))
    redraws = []
    for seed in (1, 2):
        scored, request, selection = refresh(seed)
        assert scored is None and request is None and selection.diagnostics["redrawn"] == 1.0
        assert selection.indices.numel() == 60 and selection.indices.unique().numel() == 60
        counts = np.bincount(assignment.numpy()[selection.indices.numpy()], minlength=budgets.numel())
        np.testing.assert_array_equal(counts, budgets.numpy())  # the estimate's budgets, drawn again
        redraws.append(selection.indices)
    assert not torch.equal(redraws[0], redraws[1]) and not torch.equal(redraws[0], first.indices)
    monkeypatch.undo()
    scored, request, again = refresh(3)  # the third refresh after the estimate estimates again
    assert request is not None and again.diagnostics["redrawn"] == 0.0 and state.since_estimate == 0


def test_a_redraw_after_a_checkpoint_equals_the_redraw_without_one(tmp_path):
    store, _ = _clustered_store(per_cluster=(120, 90, 60))
    grip = Grip(clusters=3, probe_fraction=0.1, reestimate_every=2)
    state = grip.create_state(store.pool_size)
    probe = _fabricated_probe(grip.to_probe(_inputs(store, 60, state)), planted_cluster=1)
    grip.select(_inputs(store, 60, state, seed=5, probe=probe))
    torch.save(state.state_dict(), tmp_path / "grip.pt")
    restored = GripState(store.pool_size)
    restored.load_state_dict(torch.load(tmp_path / "grip.pt", weights_only=True))
    a = grip.select(_inputs(store, 60, state, seed=6))
    b = grip.select(_inputs(store, 60, restored, seed=6))
    assert a.diagnostics["redrawn"] == b.diagnostics["redrawn"] == 1.0 and torch.equal(a.indices, b.indices)
    assert Grip(clusters=3).reestimate_every == 3  # the default: an estimate every third refresh


@pytest.mark.parametrize(
    "name, value",
    [
        ("clusters", 0), ("kmeans_iters", 0), ("probe_fraction", 1.5), ("probe_min_per_cluster", 1),
        ("rap_steps", 0), ("rap_trainable", "trunk"), ("rap_reset_head", "yes"), ("rap_features", "cached"), ("alpha", -1.0),
        ("replay_sign", 0), ("replay_signal", "log"), ("tau", -0.5), ("temperature", 0.0),
        ("quality_gate", 1.0), ("beta", float("nan")), ("knn", 0), ("length_clip", 0.5), ("density_sample", 1),
        ("reestimate_every", 0),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        Grip(**{name: value})


def test_grip_is_registered():
    grip = build_strategy("grip", beta=1.0)
    assert isinstance(grip, Grip) and grip.beta == 1.0 and "embedding" in grip.needs
