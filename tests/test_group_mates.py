"""Group-MATES as pure functions: the relational fit, the in-cluster greedy, the budgets, and the strategy end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import grace_lightning.strategies.group_mates as group_mates_module
from grace_lightning import ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.probes import ProbeResults
from grace_lightning.strategies.base import uniform_sample
from grace_lightning.strategies.group_mates import (
    GroupMates,
    GroupMatesState,
    cluster_budgets,
    fit_relational_model,
    greedy_group_selection,
    relational_predictions,
)


# ---------------------------------------------------------------------- relational model
def _clustered_trajectories(n=200, length=4, dim=16, seed=0):
    """Unit embeddings around a few centres, so prefix similarities vary enough to identify `temp`."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(6, dim, generator=g, dtype=torch.float64), dim=1)
    which = torch.randint(0, 6, (n, length), generator=g)
    h = F.normalize(centres[which] + 0.4 * torch.randn(n, length, dim, generator=g, dtype=torch.float64), dim=-1)
    return h, g


@pytest.mark.parametrize("alpha, temp", [(1.5, 0.6), (0.4, 2.5)])
def test_relational_fit_recovers_the_planted_w_alpha_and_temp(alpha, temp):
    # The pure fit works on raw labels (the strategy z-scores before calling it), so the truth is comparable as is.
    h, g = _clustered_trajectories()
    w = torch.randn(16, generator=g, dtype=torch.float64)
    labels = relational_predictions(h, w, alpha, temp)
    labels = labels + 0.01 * labels.std() * torch.randn(labels.shape, generator=g, dtype=torch.float64)
    fit = fit_relational_model(h, labels, l2=0.0)
    assert abs(fit.alpha - alpha) / alpha < 0.02, fit
    assert abs(fit.temp - temp) / temp < 0.03, fit
    assert float(F.cosine_similarity(fit.w, w, dim=0)) > 0.999
    assert abs(float(fit.w.norm() / w.norm()) - 1.0) < 0.02
    assert fit.mse < 1e-3 * float(labels.var())


@pytest.mark.parametrize("alpha_init, temp_init", [(0.1, 20.0), (1.5, 0.01), (50.0, 100.0)])
def test_relational_fit_warm_started_far_away_still_finds_the_truth_and_is_deterministic(alpha_init, temp_init):
    h, g = _clustered_trajectories(seed=3)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    labels = relational_predictions(h, w, 2.0, 0.8)
    a = fit_relational_model(h, labels, l2=0.0, alpha_init=alpha_init, temp_init=temp_init)
    b = fit_relational_model(h, labels, l2=0.0, alpha_init=alpha_init, temp_init=temp_init)
    assert abs(a.alpha - 2.0) < 0.02 and abs(a.temp - 0.8) < 0.02, a
    assert a.alpha == b.alpha and a.temp == b.temp and torch.equal(a.w, b.w)


def test_relational_predictions_follow_the_official_form():
    h, g = _clustered_trajectories(n=3, length=3, dim=5)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    pred = relational_predictions(h, w, 0.7, 1.3)
    for i in range(3):
        s = [float(h[i, t] @ w) for t in range(3)]
        assert pred[i, 0].item() == pytest.approx(s[0])
        for t in (1, 2):
            bracket = np.mean([1 - float(h[i, t] @ h[i, j]) / 1.3 for j in range(t)])
            assert pred[i, t].item() == pytest.approx(0.7 * s[t] * bracket)


# ---------------------------------------------------------------------- in-cluster greedy and budgets
def _slow_greedy(h, s, count, alpha, temp):
    """The rule spelled out: the next pick minimises s_j · mean over picks p of alpha·(1 − h_j·h_p/temp)."""
    picks = []
    for _ in range(count):
        best, best_value = None, None
        for j in range(len(s)):
            if j in picks:
                continue
            if not picks:
                value = s[j]
            else:
                value = s[j] * sum(alpha * (1 - float(np.dot(h[j], h[p])) / temp) for p in picks) / len(picks)
            if best_value is None or value < best_value:
                best, best_value = j, value
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matches_a_direct_implementation_of_the_rule(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    h = rng.normal(size=(n, 6))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    s = rng.normal(size=n)
    count = int(rng.integers(1, n + 1))
    alpha, temp = float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 2.0))
    fast = greedy_group_selection(h, s, count, alpha, temp)
    assert fast.tolist() == _slow_greedy(h, s, count, alpha, temp)
    assert len(set(fast.tolist())) == count


def test_greedy_avoids_redundant_copies_of_a_helpful_example():
    # Three near-copies of the most helpful example and one distinct, slightly less helpful one.
    h = np.array([[1.0, 0.0], [0.999, 0.045], [0.998, 0.063], [0.0, 1.0]])
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    s = np.array([-1.0, -0.99, -0.98, -0.8])
    assert greedy_group_selection(h, s, 2).tolist() == [0, 3]


def test_cluster_budgets_sum_to_the_budget_and_follow_cluster_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=int(rng.integers(1, 12)))
        if sizes.sum() == 0:
            continue
        budget = int(rng.integers(0, sizes.sum() + 1))
        quotas = cluster_budgets(sizes, budget)
        share = budget * sizes / sizes.sum()
        assert quotas.sum() == budget
        assert (quotas >= np.floor(share) - 1e-9).all() and (quotas <= np.ceil(share) + 1e-9).all()
        assert (quotas <= sizes).all() and (quotas[sizes == 0] == 0).all()
        # The trim keeps the ceiling where it overshoots the exact share least: larger remainders round up.
        rounded_up = quotas > np.floor(share + 1e-12)
        rounded_down = (quotas < np.ceil(share - 1e-12))
        if rounded_up.any() and rounded_down.any():
            remainder = share - np.floor(share)
            assert remainder[rounded_up].min() >= remainder[rounded_down].max() - 1e-12
    assert cluster_budgets(np.array([5, 3, 2]), 5).tolist() == [2, 2, 1]  # tie on overshoot: lowest id trimmed
    with pytest.raises(ValueError, match="budget"):
        cluster_budgets(np.array([2, 2]), 5)


# ---------------------------------------------------------------------- the strategy end to end
N, DIM, UNMEASURED = 300, 8, 20


def _pool(seed=0):
    """Embeddings spread over the sphere; an example's planted influence is ``0.1 − 0.6 h·u`` for a direction u,
    so the helpful region is the cap h·u > 0.35 around u."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(N, DIM, generator=g), dim=1)
    u = F.normalize(torch.randn(DIM, generator=g), dim=0)
    store = SignalStore(N)
    measured = torch.arange(UNMEASURED, N)
    ones = torch.ones(measured.numel())
    store.update(measured, ExampleSignals(loss=ones, grad_norm=ones, embedding=emb[measured]), step=0)
    alignment = store.embedding.float() @ u
    alignment[:UNMEASURED] = 0.0
    return store, alignment


def _inputs(store, state, budget=40, seed=0, probe=None):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        state=state, probe=probe,
    )


def _fabricated_results(request, alignment, seed=0):
    """Reference losses of each trajectory: a step on x changes the loss by ``0.1 − 0.6 h_x·u`` plus noise."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for task in request.tasks:
        values = [3.0]
        for step in task.steps:
            delta = 0.1 - 0.6 * float(alignment[step.item()])
            values.append(values[-1] + delta + 0.02 * float(torch.randn(1, generator=g)))
        losses.append(torch.tensor(values, dtype=torch.float64))
    steps = sum(len(task.steps) for task in request.tasks)
    return ProbeResults(losses=tuple(losses), request=request, optimizer_steps=steps)


def _refresh(strategy, store, alignment, state, seed=0, budget=40):
    inputs = _inputs(store, state, budget=budget, seed=seed)
    request = strategy.to_probe(inputs)
    return request, strategy.select(dataclasses.replace(inputs, probe=_fabricated_results(request, alignment, seed)))


def test_to_probe_asks_for_single_example_trajectories_of_measured_examples_evaluated_on_the_reference():
    store, _ = _pool()
    strategy = GroupMates(trajectories=12, trajectory_length=5)
    state = strategy.create_state(N)
    request = strategy.to_probe(_inputs(store, state))
    assert request.trainable == "all" and len(request.tasks) == 12
    for task in request.tasks:
        assert task.eval_indices is None and task.eval_every_step and task.num_losses == 6
        assert len(task.steps) == 5 and all(step.shape == (1,) and step.dtype == torch.int64 for step in task.steps)
        ids = torch.cat(task.steps)
        assert ids.unique().numel() == 5 and bool(store.measured[ids].all())
    # Fidelity below one probes proportionally fewer trajectories.
    assert len(strategy.to_probe(dataclasses.replace(_inputs(store, state), fidelity=0.5)).tasks) == 6


def test_selection_favours_the_planted_helpful_region_and_reports_the_oracle_cost():
    store, alignment = _pool()
    helpful = alignment > 0.35
    strategy = GroupMates(trajectories=32, trajectory_length=4)
    state = strategy.create_state(N)
    budget = 40
    _, selection = _refresh(strategy, store, alignment, state, budget=budget)
    picked = selection.indices
    assert picked.dtype == torch.int64 and picked.numel() == budget and picked.unique().numel() == budget
    assert torch.equal(picked, picked.sort().values) and selection.weights is None
    assert bool(store.measured[picked].all()), "unmeasured examples are not candidates when candidates suffice"
    share = float(helpful[picked].float().mean())
    random_share = np.mean([
        float(helpful[uniform_sample(N, budget, torch.Generator().manual_seed(s))].float().mean()) for s in range(50)
    ])
    assert share > random_share + 0.2, (share, random_share)
    d = selection.diagnostics
    assert d["oracle_steps"] == 32 * 4 and d["fitted"] == 1.0 and d["buffer_trajectories"] == 32
    assert d["fit_spearman"] > 0.8 and d["fit_mse"] < 0.2 and d["alpha"] > 0 and d["temp"] > 0
    assert all(isinstance(v, float) for v in d.values())


def test_buffer_keeps_the_newest_trajectories_and_a_refresh_without_probes_refits_on_it():
    store, alignment = _pool()
    strategy = GroupMates(trajectories=16, trajectory_length=3, buffer_size=20)
    state = strategy.create_state(N)
    first, _ = _refresh(strategy, store, alignment, state, seed=1)
    second, _ = _refresh(strategy, store, alignment, state, seed=2)
    assert state.buffer_indices.shape == (20, 3)
    newest = torch.stack([torch.cat(t.steps) for t in second.tasks])
    assert torch.equal(state.buffer_indices[-16:], newest)
    assert torch.equal(state.buffer_refresh, torch.tensor([0] * 4 + [1] * 16))
    selection = strategy.select(_inputs(store, state, seed=3))  # probe=None: fit on the buffer alone
    assert selection.diagnostics["fitted"] == 1.0 and selection.diagnostics["oracle_steps"] == 0.0
    assert selection.indices.numel() == 40


def test_probe_every_probes_every_third_refresh_and_refits_on_the_buffer_in_between(tmp_path):
    store, alignment = _pool()
    strategy = GroupMates(trajectories=8, trajectory_length=3, probe_every=3)
    state = strategy.create_state(N)
    asked = []
    for seed in range(5):
        inputs = _inputs(store, state, seed=seed)
        request = strategy.to_probe(inputs)
        asked.append(request is not None)
        probe = None if request is None else _fabricated_results(request, alignment, seed)
        selection = strategy.select(dataclasses.replace(inputs, probe=probe))
        assert selection.diagnostics["fitted"] == 1.0 and selection.indices.numel() == 40
        assert selection.diagnostics["oracle_steps"] == (8 * 3 if request is not None else 0)
        if seed == 1:  # between probes: the counter survives a checkpoint
            torch.save(state.state_dict(), tmp_path / "gm.pt")
            restored = strategy.create_state(N)
            restored.load_state_dict(torch.load(tmp_path / "gm.pt", weights_only=True))
            assert restored.since_probe == state.since_probe == 1
            assert strategy.to_probe(_inputs(store, restored, seed=2)) is None
    assert asked == [True, False, False, True, False]
    assert state.buffer_indices.shape[0] == 16  # two probed refreshes' trajectories
    assert GroupMates().probe_every == 1  # the default probes at every refresh, as the paper does


def test_refresh_label_scaling_standardises_each_refresh_on_its_own():
    state = GroupMatesState(N, 3)
    g = torch.Generator().manual_seed(0)
    labels = torch.randn(5, 3, generator=g, dtype=torch.float64)
    state.add(torch.zeros(5, 3, dtype=torch.int64), labels, capacity=10)
    state.add(torch.zeros(5, 3, dtype=torch.int64), 10 * labels + 3, capacity=10)  # a later, larger-lr refresh
    per_refresh = GroupMates(label_scaling="refresh")._scaled_labels(state)
    assert torch.allclose(per_refresh[:5], per_refresh[5:])
    pooled = GroupMates(label_scaling="buffer")._scaled_labels(state)
    assert abs(float(pooled.mean())) < 1e-12 and abs(float(pooled.std(unbiased=False)) - 1) < 1e-12
    assert not torch.allclose(pooled[:5], pooled[5:])


def test_no_probe_is_requested_while_too_few_examples_are_measured():
    store = SignalStore(50)
    signals = ExampleSignals(loss=torch.ones(3), grad_norm=torch.ones(3), embedding=torch.randn(3, 4))
    store.update(torch.arange(3), signals, step=0)
    strategy = GroupMates(trajectory_length=4)
    state = strategy.create_state(50)
    assert strategy.to_probe(_inputs(store, state)) is None


def test_without_probes_or_buffer_the_selection_is_a_uniform_draw():
    store, _ = _pool()
    strategy = GroupMates()
    selection = strategy.select(_inputs(store, strategy.create_state(N), seed=7))
    assert torch.equal(selection.indices, uniform_sample(N, 40, torch.Generator().manual_seed(7)))
    assert selection.diagnostics["fitted"] == 0.0


def test_unmeasured_examples_only_fill_a_budget_the_measured_ones_cannot():
    store, alignment = _pool()
    strategy = GroupMates(trajectories=8)
    state = strategy.create_state(N)
    _refresh(strategy, store, alignment, state)
    budget = N - UNMEASURED + 5
    selection = strategy.select(_inputs(store, state, budget=budget))
    assert selection.indices.unique().numel() == budget
    assert bool(torch.isin(torch.arange(UNMEASURED, N), selection.indices).all())
    assert selection.diagnostics["filled_unmeasured"] == 5.0


def test_state_round_trips_through_a_weights_only_checkpoint_and_selects_identically(tmp_path):
    store, alignment = _pool()
    strategy = GroupMates(trajectories=16)
    state = strategy.create_state(N)
    _refresh(strategy, store, alignment, state)
    torch.save(state.state_dict(), tmp_path / "s.pt")
    restored = strategy.create_state(N)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(restored.buffer_labels, state.buffer_labels) and restored.alpha == state.alpha
    a = strategy.select(_inputs(store, state, seed=5))
    b = strategy.select(_inputs(store, restored, seed=5))
    assert torch.equal(a.indices, b.indices)
    assert a.diagnostics["alpha"] == b.diagnostics["alpha"] and a.diagnostics["temp"] == b.diagnostics["temp"]


def test_same_seeds_give_the_same_selection():
    store, alignment = _pool()
    runs = []
    for _ in range(2):
        strategy = GroupMates(trajectories=16)
        _, selection = _refresh(strategy, store, alignment, strategy.create_state(N), seed=11)
        runs.append(selection.indices)
    assert torch.equal(runs[0], runs[1])


def test_fixed_relational_selects_with_alpha_and_temp_one(monkeypatch):
    store, alignment = _pool()
    seen = []
    real = group_mates_module.greedy_group_selection

    def spy(h, s, count, alpha, temp):
        seen.append((alpha, temp))
        return real(h, s, count, alpha, temp)

    monkeypatch.setattr(group_mates_module, "greedy_group_selection", spy)
    for fixed in (True, False):
        seen.clear()
        strategy = GroupMates(trajectories=16, fixed_relational=fixed)
        _, selection = _refresh(strategy, store, alignment, strategy.create_state(N))
        fitted = (selection.diagnostics["alpha"], selection.diagnostics["temp"])
        assert seen and all(pair == ((1.0, 1.0) if fixed else fitted) for pair in seen)
    assert fitted != (1.0, 1.0)


def test_probe_results_that_do_not_match_the_request_raise():
    store, alignment = _pool()
    strategy = GroupMates(trajectories=4)
    state = strategy.create_state(N)
    inputs = _inputs(store, state)
    request = strategy.to_probe(inputs)
    results = _fabricated_results(request, alignment)
    short = dataclasses.replace(results, losses=results.losses[:3])
    with pytest.raises(ValueError, match="probe results"):
        strategy.select(dataclasses.replace(inputs, probe=short))


def test_group_mates_requires_a_reference_set():
    strategy = build_strategy("group_mates")
    assert isinstance(strategy, GroupMates) and strategy.reference == "required"
    assert strategy.needs == frozenset({"embedding"}), "its labels come from probes, not from per-example losses"
    with pytest.raises(ValueError, match="reference"):
        strategy.check_inputs(has_reference=False, has_quality=False)
    strategy.check_inputs(has_reference=True, has_quality=False)
    assert isinstance(strategy.create_state(10), GroupMatesState)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"trajectories": 0}, "trajectories"),
        ({"trajectory_length": 1}, "trajectory_length"),
        ({"buffer_size": -1}, "buffer_size"),
        ({"clusters": 0}, "clusters"),
        ({"fit_iterations": 2.5}, "fit_iterations"),
        ({"lr": 0.0}, "lr"),
        ({"l2": -1e-3}, "l2"),
        ({"fixed_relational": "yes"}, "fixed_relational"),
        ({"label_scaling": "global"}, "label_scaling"),
        ({"probe_every": 0}, "probe_every"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        GroupMates(**kwargs)
