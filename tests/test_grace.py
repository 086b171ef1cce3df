"""GRACE as a pure function of the store, its graph state, a budget and a generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grace_lightning import ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.propagation import edge_weights, outvoted_labels
from grace_lightning.strategies.base import uniform_sample
from grace_lightning.strategies.grace import Grace, GraceState


def _clustered_store(per_cluster=(60, 60, 60, 60, 60), important=(0, 1), dim=16, seed=0):
    """Tight clusters on the sphere; importance is high in `important` clusters, low elsewhere."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(len(per_cluster), dim, generator=g), dim=1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_cluster)])
    emb = centers[labels] + 0.05 * torch.randn(len(labels), dim, generator=g)
    grad = torch.where(torch.isin(labels, torch.tensor(important)), 1.0, 0.1) * (1 + 0.1 * torch.rand(len(labels), generator=g))
    store = SignalStore(len(labels))
    store.update(torch.arange(len(labels)), ExampleSignals(loss=grad.clone(), grad_norm=grad, embedding=emb), step=0)
    return store, labels


def _inputs(store, budget, state=None, seed=0, now=1):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        now_batch=now, state=state if state is not None else GraceState(store.pool_size),
    )


def test_grace_covers_every_cluster_and_favours_important_ones_over_random():
    store, labels = _clustered_store()
    grace = Grace(k=8, weighting="coverage")
    budget = 40
    selection = grace.select(_inputs(store, budget))
    picked = labels[selection.indices]
    counts = torch.bincount(picked, minlength=5)
    assert bool((counts > 0).all()), f"a cluster is not covered: {counts.tolist()}"
    grace_mass = float(torch.isin(picked, torch.tensor([0, 1])).float().mean())
    random_mass = np.mean([
        float(torch.isin(labels[uniform_sample(len(labels), budget, torch.Generator().manual_seed(s))], torch.tensor([0, 1])).float().mean())
        for s in range(50)
    ])
    assert grace_mass > random_mass + 0.1, (grace_mass, random_mass)
    assert selection.indices.dtype == torch.int64 and selection.indices.unique().numel() == budget
    assert selection.weights is not None and abs(float(selection.weights.mean()) - 1.0) < 1e-5


def test_same_inputs_same_selection():
    store, _ = _clustered_store()
    a = Grace(weighting="coverage").select(_inputs(store, 30, seed=1))
    b = Grace(weighting="coverage").select(_inputs(store, 30, seed=1))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)


def test_anchors_are_budgeted_exclude_fresh_examples_and_prefer_stale_ones():
    store, _ = _clustered_store()
    grace = Grace(k=8, anchor_fraction=0.1, disagreement_weight=0.0)
    state = GraceState(store.pool_size)
    grace.select(_inputs(store, 30, state=state, now=0))  # builds the graph
    # Later: the first 100 examples were re-measured at step 50 (fresh); everything else is stale at step 0,
    # except 20..39... all fresh ones must be excluded from the scoring slice.
    n = store.pool_size
    fresh = torch.arange(100)
    store.update(fresh, ExampleSignals(loss=torch.ones(100), grad_norm=torch.ones(100), embedding=store.embedding[fresh].float()), step=50)
    to_score = grace.to_score(_inputs(store, 30, state=state, now=60))
    assert to_score.numel() == round(0.1 * n)
    assert not torch.isin(to_score, fresh).any()


def test_by_default_the_priority_anchors_are_a_tenth_of_the_budget_and_anchor_share_sets_it():
    """A share of the budget, not of the pool: the same share of an epoch's work whatever the budget."""
    counts = {}
    for kwargs, budget in (({}, 30), ({}, 150), ({"anchor_share": 0.5}, 30), ({"anchor_share": 0.0}, 30),
                           ({"anchor_fraction": 0.1}, 30), ({"anchor_fraction": 0.1}, 150)):
        store, _ = _clustered_store()
        grace, state = Grace(k=8, **kwargs), GraceState(store.pool_size)
        grace.select(_inputs(store, budget, state=state, now=0))
        chosen = grace.to_score(_inputs(store, budget, state=state, now=10))
        counts[(tuple(kwargs.items()), budget)] = 0 if chosen is None else chosen.numel()
    assert counts[((), 30)] == 3 and counts[((), 150)] == 15  # 0.1 of the budget
    assert counts[((("anchor_share", 0.5),), 30)] == 15
    assert counts[((("anchor_share", 0.0),), 30)] == 0  # none: the unmeasured are left to propagation
    assert counts[((("anchor_fraction", 0.1),), 30)] == counts[((("anchor_fraction", 0.1),), 150)] == 30  # of the pool
    assert "anchor_share=0.1" in repr(Grace()) and "anchor_fraction=0.05" in repr(Grace(anchor_fraction=0.05))


def test_anchor_priority_follows_disagreement_with_neighbours():
    store, labels = _clustered_store()
    grace = Grace(k=8, anchor_fraction=0.02, staleness_weight=0.0)
    state = GraceState(store.pool_size)
    grace.select(_inputs(store, 30, state=state, now=0))
    odd = torch.tensor([5, 70, 130])  # one example per (low- or high-) importance cluster that disagrees
    state.importance[odd.numpy()] = 50.0
    to_score = grace.to_score(_inputs(store, 30, state=state, now=0))
    assert set(odd.tolist()) <= set(to_score.tolist())


def test_refresh_propagates_anchor_changes_to_their_neighbours():
    store, labels = _clustered_store()
    grace = Grace(k=8)
    state = GraceState(store.pool_size)
    grace.select(_inputs(store, 30, state=state, now=0))
    before = state.importance.copy()
    anchors = torch.tensor([200, 201, 202])  # in a low-importance cluster (label 3)
    emb = store.embedding[anchors].float()
    store.update(anchors, ExampleSignals(loss=torch.full((3,), 5.0), grad_norm=torch.full((3,), 5.0), embedding=emb), step=10)
    selection = grace.select(_inputs(store, 30, state=state, now=10))
    assert np.allclose(state.importance[anchors.numpy()], 5.0)
    # Propagation reaches the nodes whose own neighbour lists contain an anchor.
    listing_an_anchor = np.isin(state.graph.neighbors, anchors.numpy()).any(axis=1)
    listing_an_anchor[anchors.numpy()] = False
    assert listing_an_anchor.sum() > 0
    assert (state.importance[listing_an_anchor] > before[listing_an_anchor]).all()
    far = (labels != 3).numpy()
    assert np.array_equal(state.importance[far], before[far])
    assert selection.diagnostics["anchors"] == 3.0


def _drift_anchors(store, anchors, step, seed=0):
    """Re-measure ``anchors`` at ``step`` with embeddings moved far (new random directions)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(anchors.numel(), store.embedding.shape[1], generator=g), dim=1)
    ones = torch.ones(anchors.numel())
    store.update(anchors, ExampleSignals(loss=ones, grad_norm=ones, embedding=emb), step=step)


def test_by_default_the_graph_stays_as_built_and_repair_share_repairs_the_most_drifted_anchors():
    anchors = torch.arange(0, 300, 3)  # 100 anchors
    built = {}
    for share in (0.0, 0.1, 0.5):
        store, _ = _clustered_store()
        grace = Grace(k=8, repair_share=share)
        state = GraceState(store.pool_size)
        grace.select(_inputs(store, 30, state=state, now=0))
        built[share] = (state.graph.neighbors.copy(), state.node_embedding.copy())
        _drift_anchors(store, anchors, step=10)
        later = grace.select(_inputs(store, 30, state=state, now=10)).diagnostics
        assert later["anchors"] == 100
        if share == 0.0:  # nothing followed, nothing repaired: the build's rows and node positions
            assert later["moved"] == 0 and later["graph_seconds"] == 0
            assert np.array_equal(state.graph.neighbors, built[share][0])
            assert np.array_equal(state.node_embedding, built[share][1])
        else:
            assert later["moved"] == round(share * 100), later["moved"]
            assert not np.array_equal(state.graph.neighbors, built[share][0])
        # The edge weights GRACE keeps between calls are those of the graph as it stands after the refresh.
        np.testing.assert_array_equal(state.edges()[0], edge_weights(state.graph.neighbors, state.graph.similarities))
    assert Grace().repair_share == 0.0
    with pytest.raises(ValueError, match="repair_share"):
        Grace(repair_share=1.5)
    with pytest.raises(ValueError, match="repair_share"):
        Grace(repair_share=-0.1)


def test_no_repair_selects_exactly_as_a_repair_threshold_nothing_reaches():
    """``repair_share=0`` skips following the drift; a threshold no drift exceeds (2: unit vectors) follows it and
    repairs nothing. Only the nodes' positions differ, and GRACE's picks do not read them."""
    picks = []
    for kwargs in ({}, {"drift_threshold": 2.0}):
        store, _ = _clustered_store()
        grace, state = Grace(k=8, **kwargs), GraceState(store.pool_size)
        grace.select(_inputs(store, 30, state=state, now=0))
        runs = []
        for step in (10, 20):
            _drift_anchors(store, torch.arange(step, 300, 7), step=step, seed=step)
            runs.append(grace.select(_inputs(store, 30, state=state, seed=step, now=step)).indices)
        picks.append(runs)
    assert all(torch.equal(a, b) for a, b in zip(*picks))


def test_grace_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    store, _ = _clustered_store()
    grace = Grace(k=8)
    state = GraceState(store.pool_size)
    grace.select(_inputs(store, 30, state=state))
    torch.save(state.state_dict(), tmp_path / "s.pt")
    restored = GraceState(store.pool_size)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert np.array_equal(restored.graph.neighbors, state.graph.neighbors)
    a = grace.select(_inputs(store, 30, state=state, now=5))
    b = grace.select(_inputs(store, 30, state=restored, now=5))
    assert torch.equal(a.indices, b.indices)


def test_grace_is_registered_and_validates_parameters():
    assert isinstance(build_strategy("grace"), Grace)
    with pytest.raises(ValueError, match="propagation"):
        Grace(propagation="half")
    with pytest.raises(ValueError, match="anchor_fraction"):
        Grace(anchor_fraction=1.5)
    with pytest.raises(ValueError, match="anchor_share"):
        Grace(anchor_share=-0.1)
    with pytest.raises(ValueError, match="not both"):
        Grace(anchor_share=0.1, anchor_fraction=0.05)
    with pytest.raises(ValueError, match="importance"):
        Grace(importance="entropy")


def test_defaults_smooth_importance_and_give_no_weights():
    store, _ = _clustered_store()
    grace = Grace()
    assert (grace.smoothing, grace.weighting, grace.selector) == (1.0, "none", "sample")
    assert grace.select(_inputs(store, 30)).weights is None


def test_smoothing_stops_the_selection_chasing_isolated_spikes():
    """Spikes (one large gradient among easy neighbours, as a flipped label gives) draw picks without smoothing
    and lose them with it, while a uniformly important cluster keeps its share."""
    store, labels = _clustered_store(important=(0,))
    g = store.grad_norm.clone()
    spikes = torch.tensor([60 * c + i for c in (2, 3, 4) for i in range(0, 60, 6)])  # 30 spikes in easy clusters
    g[spikes] = 2.0
    store.update(torch.arange(store.pool_size), ExampleSignals(loss=g.clone(), grad_norm=g, embedding=store.embedding.float()), step=0)
    budget = 40
    plain = Grace(k=8, smoothing=0.0, selector="facility_location").select(_inputs(store, budget)).indices
    smoothed = Grace(k=8, smoothing=1.0, selector="facility_location").select(_inputs(store, budget)).indices
    share = lambda picked: float(torch.isin(picked, spikes).float().mean())  # noqa: E731
    assert share(plain) > 0.3 and share(smoothed) < share(plain) / 2, (share(plain), share(smoothed))
    in_cluster_0 = lambda picked: int((labels[picked] == 0).sum())  # noqa: E731
    assert in_cluster_0(smoothed) >= in_cluster_0(plain)
    with pytest.raises(ValueError, match="smoothing"):
        Grace(smoothing=1.5)


def test_sample_selector_draws_the_budget_in_proportion_to_importance():
    """`selector="sample"`: exactly `budget` distinct picks, the important clusters drawn about as often as their
    share of the importance says (not all of the budget, as a top-k would), and the same draw for the same seed."""
    store, labels = _clustered_store(important=(0, 1))  # importance 1.0 in 2 clusters, 0.1 in 3
    budget = 100
    grace = Grace(k=8, selector="sample", smoothing=0.0)
    picked = grace.select(_inputs(store, budget, seed=3)).indices
    assert picked.dtype == torch.int64 and picked.unique().numel() == budget and bool((picked.diff() > 0).all())
    important = float(torch.isin(labels[picked], torch.tensor([0, 1])).float().mean())
    # Pool: 120 examples of weight ~1, 180 of ~0.1; proportional sampling without replacement gives about 0.8 here,
    # random 0.4, a top-k 1.0.
    assert 0.6 < important < 0.95, important
    again = grace.select(_inputs(store, budget, seed=3)).indices
    other = grace.select(_inputs(store, budget, seed=4)).indices
    assert torch.equal(picked, again) and not torch.equal(picked, other)
    assert grace.select(_inputs(store, store.pool_size)).indices.tolist() == list(range(store.pool_size))
    with pytest.raises(ValueError, match="selector"):
        Grace(selector="topk")


def test_sample_selector_gives_coverage_weights_on_request():
    store, _ = _clustered_store()
    selection = Grace(k=8, selector="sample", weighting="coverage").select(_inputs(store, 40))
    assert selection.weights is not None and selection.weights.shape == (40,)
    assert abs(float(selection.weights.mean()) - 1.0) < 1e-5


def test_outlier_damping_draws_spikes_less_than_their_neighbours_and_keeps_hard_regions():
    """With smoothing a spike (a flipped label's large gradient among easy neighbours) is drawn as often as its
    neighbours; `outlier_damping` draws it less, while a uniformly important cluster (no outliers) keeps its share."""
    store, labels = _clustered_store(important=(0,))
    g = store.grad_norm.clone()
    spikes = torch.tensor([60 * c + i for c in (2, 3, 4) for i in range(0, 60, 6)])  # 30 of the 180 easy examples
    g[spikes] = 2.0
    store.update(torch.arange(store.pool_size), ExampleSignals(loss=g.clone(), grad_norm=g, embedding=store.embedding.float()), step=0)
    easy = torch.isin(labels, torch.tensor([2, 3, 4]))
    budget = 120

    def draws(damping: float) -> tuple[float, float]:
        spike_share = cluster_0 = 0.0
        for seed in range(20):
            picked = Grace(k=8, outlier_damping=damping).select(_inputs(store, budget, seed=seed)).indices
            spike_share += float(torch.isin(picked, spikes).sum()) / float(easy[picked].sum()) / 20
            cluster_0 += float((labels[picked] == 0).float().mean()) / 20
        return spike_share, cluster_0

    plain_spikes, plain_0 = draws(0.0)
    damped_spikes, damped_0 = draws(1.0)
    # Spikes are 1/6 of the easy clusters: smoothing alone draws them at about that rate, damping well below it.
    assert plain_spikes > 0.12 and damped_spikes < plain_spikes / 2, (plain_spikes, damped_spikes)
    assert damped_0 >= plain_0 - 0.02, (plain_0, damped_0)
    same = Grace(k=8, outlier_damping=0.0).select(_inputs(store, budget, seed=1)).indices
    assert torch.equal(same, Grace(k=8).select(_inputs(store, budget, seed=1)).indices)
    with pytest.raises(ValueError, match="outlier_damping"):
        Grace(outlier_damping=-1.0)


def test_hnsw_settings_reach_the_graph_and_are_validated():
    store, _ = _clustered_store()
    state = GraceState(store.pool_size)
    Grace(k=8, graph_method="hnsw", hnsw_m=8, ef_construction=12, ef_search=24).select(_inputs(store, 40, state=state))
    graph = state.graph
    assert (graph.method, graph.hnsw_m, graph.ef_construction, graph.ef_search) == ("hnsw", 8, 12, 24)
    assert graph._index.hnsw.efConstruction == 12
    saved = graph.state_dict()  # a resumed run rebuilds its index with the same settings
    assert (saved["hnsw_m"], saved["ef_construction"], saved["ef_search"]) == (8, 12, 24)
    with pytest.raises(ValueError, match="hnsw_m"):
        Grace(hnsw_m=0)
    with pytest.raises(ValueError, match="ef_search"):
        Grace(ef_search=0)
    with pytest.raises(ValueError, match="ef_construction"):
        Grace(ef_construction=0)


def test_ivf_is_the_graph_above_the_exact_threshold_and_its_settings_reach_it():
    store, _ = _clustered_store()
    auto, tuned = GraceState(store.pool_size), GraceState(store.pool_size)
    Grace(k=8, exact_threshold=100).select(_inputs(store, 40, state=auto))
    assert auto.graph.method == "ivf" and type(auto.graph._index).__name__ == "IndexIVFFlat"
    assert auto.graph.ivf_lists == round(store.pool_size**0.5) and auto.graph._index.nprobe == 8
    Grace(k=8, graph_method="ivf", ivf_lists=7, ivf_probes=3).select(_inputs(store, 40, state=tuned))
    assert (tuned.graph.ivf_lists, tuned.graph._index.nprobe) == (7, 3)
    for bad in ({"ivf_lists": 0}, {"ivf_probes": 0}, {"graph_method": "lsh"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Grace(**bad)


def test_graph_device_picks_where_exact_search_runs(monkeypatch):
    """"cpu" searches with faiss; "auto" stays on the CPU in a process that has not used CUDA; on a GPU device the
    "auto" method searches exactly up to gpu_exact_threshold, and the picks are those of the faiss graph."""
    import grace_lightning.knn as knn
    import grace_lightning.strategies.grace as grace_module

    store, _ = _clustered_store()
    on_cpu, auto = GraceState(store.pool_size), GraceState(store.pool_size)
    picked = Grace(k=8).select(_inputs(store, 40, state=on_cpu)).indices
    Grace(k=8, graph_device="auto").select(_inputs(store, 40, state=auto))
    assert on_cpu.graph.device == auto.graph.device == "cpu"
    assert type(on_cpu.graph._index).__name__ == "IndexFlatIP"
    # A "GPU" that is this CPU through the torch index: what graph_device="cuda" does on a machine with one.
    monkeypatch.setattr(knn, "resolve_device", lambda device: device)
    monkeypatch.setattr(grace_module.Grace, "_graph_device", lambda self: "cpu:0")
    on_torch = GraceState(store.pool_size)
    # The pool is above exact_threshold=100 but within gpu_exact_threshold: exact, on the torch index.
    again = Grace(k=8, exact_threshold=100).select(_inputs(store, 40, state=on_torch)).indices
    assert on_torch.graph.method == "flat" and type(on_torch.graph._index).__name__ == "TorchFlatIndex"
    assert torch.equal(again, Grace(k=8).select(_inputs(store, 40, state=GraceState(store.pool_size))).indices)
    assert torch.equal(picked, again)
    approximate = GraceState(store.pool_size)
    Grace(k=8, gpu_exact_threshold=100).select(_inputs(store, 40, state=approximate))
    assert approximate.graph.method == "ivf" and approximate.graph.device == "cpu"


def test_a_graph_that_does_not_fit_on_the_gpu_is_built_on_the_cpu_under_auto_and_named_otherwise(monkeypatch):
    """graph_device="auto": a GPU out of memory (a model that fills it) builds the graph with faiss on the CPU and
    warns; an explicit "cuda" raises, naming graph_device and the fix."""
    import grace_lightning.strategies.grace as grace_module

    build = grace_module.KnnGraph.build

    def no_room_on_gpu(vectors, **kwargs):
        if kwargs["device"] != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
        return build(vectors, **kwargs)

    monkeypatch.setattr(grace_module.KnnGraph, "build", staticmethod(no_room_on_gpu))
    monkeypatch.setattr(grace_module.Grace, "_graph_device", lambda self: "cuda:0")
    monkeypatch.setattr(grace_module, "resolve_device", lambda device: device)
    store, _ = _clustered_store()
    fell_back = GraceState(store.pool_size)
    with pytest.warns(UserWarning, match="built on the CPU"):
        picked = Grace(k=8).select(_inputs(store, 40, state=fell_back)).indices
    assert fell_back.graph.device == "cpu"
    monkeypatch.setattr(grace_module.Grace, "_graph_device", lambda self: "cpu")
    assert torch.equal(picked, Grace(k=8).select(_inputs(store, 40, state=GraceState(store.pool_size))).indices)
    monkeypatch.setattr(grace_module.Grace, "_graph_device", lambda self: "cuda:0")
    with pytest.raises(RuntimeError, match="graph_device='cpu'"):
        Grace(k=8, graph_device="cuda").select(_inputs(store, 40, state=GraceState(store.pool_size)))


def test_bad_graph_device_names_the_parameter():
    with pytest.raises(ValueError, match="graph_device"):
        Grace(graph_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="graph_device.*no CUDA device is visible"):
            Grace(graph_device="cuda")
    with pytest.raises(ValueError, match="gpu_exact_threshold"):
        Grace(gpu_exact_threshold=0)


def test_median_smoothing_ranks_a_hard_region_above_an_easy_one_with_a_few_huge_outliers():
    """Cluster 0 is easy (importance 0.1) with a fifth of its examples at 5.0 (mislabeled); cluster 1 is uniformly
    hard (1.0). The neighbours' mean lifts cluster 0 to about 1.1; their median keeps it at 0.1."""
    store, labels = _clustered_store(per_cluster=(100, 100), important=(1,))
    outliers = torch.arange(0, 100, 5)
    grad = store.grad_norm.clone()
    grad[outliers] = 5.0
    store.update(outliers, ExampleSignals(loss=grad[outliers], grad_norm=grad[outliers], embedding=store.embedding[outliers].float()), step=0)
    shares = {}
    for statistic in ("mean", "median"):
        grace = Grace(k=10, smoothing_statistic=statistic)
        picks = torch.cat([grace.select(_inputs(store, 40, seed=s)).indices for s in range(20)])
        shares[statistic] = float((labels[picks] == 1).float().mean())
    assert shares["median"] > 0.75 > shares["mean"]
    with pytest.raises(ValueError, match="smoothing_statistic"):
        Grace(smoothing_statistic="mode")


def test_contradiction_weight_draws_examples_the_model_contradicts_less_and_needs_their_error_norm():
    store, labels = _clustered_store(per_cluster=(100, 100), important=(0, 1))
    contradicted = torch.arange(0, 200, 4)  # a quarter of the pool: error norm 1.3, the rest 0.2
    errors = torch.full((200,), 0.2)
    errors[contradicted] = 1.3
    store.update(torch.arange(200), ExampleSignals(loss=store.loss.clone(), grad_norm=store.grad_norm.clone(),
                                                   embedding=store.embedding.float(), error_norm=errors), step=0)
    shares = {}
    for weight in (1.0, 0.1):
        grace = Grace(k=10, contradiction_weight=weight)
        picks = torch.cat([grace.select(_inputs(store, 40, seed=s)).indices for s in range(20)])
        shares[weight] = float(torch.isin(picks, contradicted).float().mean())
    assert 0.18 < shares[1.0] < 0.32 and shares[0.1] < 0.06
    assert "error_norm" in Grace(contradiction_weight=0.5).needs and "error_norm" not in Grace().needs
    bare, _ = _clustered_store()
    with pytest.raises(ValueError, match="error norm"):
        Grace(contradiction_weight=0.1).select(_inputs(bare, 30))
    with pytest.raises(ValueError, match="contradiction_weight"):
        Grace(contradiction_weight=1.5)


def test_outvoted_weight_draws_labels_their_neighbours_outvote_less_and_needs_labels(monkeypatch):
    store, clusters = _clustered_store(per_cluster=(100, 100), important=(0, 1))
    labels = clusters.clone()
    flipped = torch.arange(0, 200, 5)  # a fifth of each cluster carries the other cluster's label
    labels[flipped] = 1 - labels[flipped]
    store.update(torch.arange(200), ExampleSignals(loss=store.loss.clone(), grad_norm=store.grad_norm.clone(),
                                                   embedding=store.embedding.float(), label=labels), step=0)
    shares, outvoted = {}, {}
    for weight in (1.0, 0.1):
        grace = Grace(k=10, outvoted_weight=weight)
        selections = [grace.select(_inputs(store, 40, seed=s)) for s in range(20)]
        picks = torch.cat([sel.indices for sel in selections])
        shares[weight] = float(torch.isin(picks, flipped).float().mean())
        outvoted[weight] = selections[0].diagnostics.get("outvoted")
    assert 0.12 < shares[1.0] < 0.28 and shares[0.1] < 0.05
    assert outvoted[1.0] is None and outvoted[0.1] == pytest.approx(0.2, abs=0.03)  # the flipped fifth, logged
    # An example never measured neither is outvoted nor votes: with only cluster 0 measured, nothing in cluster 1
    # is held back, and cluster 0's flipped examples still are.
    half = SignalStore(200)
    half.update(torch.arange(100), ExampleSignals(loss=store.loss[:100].clone(), grad_norm=store.grad_norm[:100].clone(),
                                                  embedding=store.embedding[:100].float(), label=labels[:100]), step=0)
    half.fix_embedding(store.embedding.float())
    picks = torch.cat([Grace(k=10, outvoted_weight=0.0, score_unmeasured=False).select(_inputs(half, 60, seed=s)).indices
                       for s in range(10)])
    held, free = torch.isin(picks, flipped[flipped < 100]).sum(), torch.isin(picks, flipped[flipped >= 100]).sum()
    assert held <= 10 and free >= 40, (held, free)  # weight 0 leaves them only the draw's floor (1e-3)
    assert "label" in Grace(outvoted_weight=0.5).needs and "label" not in Grace().needs
    # The vote is taken again only when more examples have a label: refreshes on a fully labelled pool reuse it.
    import grace_lightning.strategies.grace as grace_module

    votes = []
    monkeypatch.setattr(grace_module, "outvoted_labels", lambda *a: votes.append(1) or outvoted_labels(*a))
    state, grace = GraceState(200), Grace(k=10, outvoted_weight=0.1, score_unmeasured=False)
    for now in (1, 2):
        grace.select(_inputs(half, 40, state=state, now=now))
    assert len(votes) == 1
    half.update(torch.arange(100, 110), ExampleSignals(loss=store.loss[100:110].clone(), grad_norm=store.grad_norm[100:110].clone(),
                                                       embedding=store.embedding[100:110].float(), label=labels[100:110]), step=2)
    grace.select(_inputs(half, 40, state=state, now=3))
    assert len(votes) == 2
    assert Grace(outvoted_weight=0.5, contradiction_weight=0.5).needs >= {"label", "error_norm"}
    bare, _ = _clustered_store()
    with pytest.raises(ValueError, match=r"label=targets"):
        Grace(outvoted_weight=0.1).select(_inputs(bare, 30))
    with pytest.raises(ValueError, match="outvoted_weight"):
        Grace(outvoted_weight=-0.1)
