"""The cost levers of issue 13 as behaviour: what a refresh rescores, and GRACE's low-dimensional graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grace_lightning import ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.strategies.base import stalest_first
from grace_lightning.strategies.grace import Grace, GraceState


def _store(n=100, dim=16, measured_at=None, seed=0):
    """A store whose example i was last measured at step ``measured_at[i]`` (-1: never)."""
    g = torch.Generator().manual_seed(seed)
    store = SignalStore(n)
    measured_at = np.arange(n) % 5 if measured_at is None else np.asarray(measured_at)
    for step in sorted(set(measured_at.tolist()) - {-1}):
        idx = torch.from_numpy(np.flatnonzero(measured_at == step))
        emb = torch.nn.functional.normalize(torch.randn(idx.numel(), dim, generator=g), dim=1)
        loss = torch.rand(idx.numel(), generator=g)
        store.update(idx, ExampleSignals(loss=loss, grad_norm=loss.clone(), embedding=emb), step=int(step))
    return store


def _inputs(store, seed=0, fidelity=1.0, state=None, budget=10, now=10):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        now_batch=now, fidelity=fidelity, state=state,
    )


def test_a_refresh_rescores_the_never_measured_and_the_stalest_share_of_the_budget():
    steps = np.array([-1] * 10 + [0] * 30 + [3] * 30 + [7] * 30)  # 10 never, then three ages
    store = _store(measured_at=steps)
    chosen = stalest_first(_inputs(store, budget=40), share=0.5)
    ids = chosen.numpy()
    assert set(range(10)) <= set(ids.tolist())  # every never-measured example
    assert ids.size == 10 + 20 and set(ids.tolist()) - set(range(10)) <= set(range(10, 40))  # 20 of the oldest
    assert np.all(np.diff(ids) > 0)
    assert torch.equal(chosen, stalest_first(_inputs(store, budget=40), share=0.5))  # same generator, same slice
    assert not torch.equal(chosen, stalest_first(_inputs(store, seed=1, budget=40), share=0.5))  # ties by the generator
    assert stalest_first(_inputs(store, fidelity=0.5, budget=40), share=0.5).numel() == 10 + 10  # fidelity scales it
    assert stalest_first(_inputs(store, budget=20), share=0.5).numel() == 10 + 10  # so does the budget, not the pool
    assert stalest_first(_inputs(store, budget=40), share=3.0).numel() == 100  # more than the pool holds: all of it
    assert torch.equal(stalest_first(_inputs(store), share=None), torch.arange(100))
    assert stalest_first(_inputs(store, fidelity=0.5), share=None).numel() == 10 + 50  # the whole pool, scaled
    fresh = _store(measured_at=np.full(100, 4))
    assert stalest_first(_inputs(fresh), share=0.0) is None


@pytest.mark.parametrize("name", ["grip", "gip", "group_mates"])
def test_pool_scoring_strategies_rescore_a_quarter_of_the_budget_by_default_and_the_whole_pool_on_request(name):
    store = _store(measured_at=np.arange(100) % 5)
    assert build_strategy(name).to_score(_inputs(store, budget=40)).numel() == 10  # rescore_share=0.25 of 40
    assert build_strategy(name).to_score(_inputs(store, budget=80)).numel() == 20
    assert torch.equal(build_strategy(name, rescore_share=None).to_score(_inputs(store)), torch.arange(100))
    with pytest.raises(ValueError, match="rescore_share"):
        build_strategy(name, rescore_share=-0.5)
    with pytest.raises(ValueError, match="replaced by `rescore_share`, a share of the budget"):
        build_strategy(name, rescore_fraction=0.25)


def test_grace_builds_its_graph_in_a_fixed_low_dimensional_basis_that_survives_a_checkpoint():
    store = _store(n=300, dim=16, measured_at=np.zeros(300, dtype=int))
    grace = Grace(k=5, graph_dim=4, weighting="coverage", repair_share=0.1)  # the repair path projects too
    state = GraceState(300)
    first = grace.select(_inputs(store, state=state, budget=30, now=1))
    assert state.projection.shape == (16, 4) and state.node_embedding.shape == (300, 4)
    assert state.graph.neighbors.shape == (300, 5)
    # The basis spans the embeddings' top singular directions: projecting loses less than a random basis would.
    x = store.embedding.numpy().astype(np.float64)
    kept = np.linalg.norm(x @ state.projection) ** 2 / np.linalg.norm(x) ** 2
    assert kept >= 4 / 16
    # A checkpointed state selects exactly as the live one at the next refresh.
    resumed = GraceState(300)
    resumed.load_state_dict(state.state_dict())
    assert np.array_equal(resumed.projection, state.projection)
    moved = torch.arange(0, 300, 3)
    store.update(moved, ExampleSignals(loss=torch.rand(100), grad_norm=torch.rand(100),
                                       embedding=torch.nn.functional.normalize(torch.randn(100, 16), dim=1)), step=5)
    a = grace.select(_inputs(store, state=state, budget=30, now=6))
    b = grace.select(_inputs(store, state=resumed, budget=30, now=6))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert first.indices.numel() == 30
    # graph_dim at or above the store's dimension keeps the embeddings as they are.
    same = GraceState(300)
    Grace(k=5, graph_dim=16).select(_inputs(store, state=same, budget=30, now=7))
    assert same.projection is None and same.node_embedding.shape == (300, 16)
    with pytest.raises(ValueError, match="graph_dim"):
        Grace(graph_dim=0)


def test_scoring_a_tensor_dataset_fetches_whole_batches_with_the_same_result():
    """A TensorDataset pool is scored a batch at a time (no per-example Python); the store is the same bit for bit."""
    from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

    from grace_lightning import CoresetCallback, CoresetSampler
    from grace_lightning.scoring import TensorRows, rows_of
    from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

    blobs = IndexedBlobs(n=256)
    tensors = TensorDataset(blobs.x, blobs.y, torch.arange(256))
    idx = torch.tensor([9, 3, 200, 0, 41])
    assert isinstance(rows_of(tensors, idx, default_collate), TensorRows)
    assert isinstance(rows_of(tensors, idx, lambda batch: batch), Subset)  # a custom collate sees examples
    assert isinstance(rows_of(blobs, idx, default_collate), Subset)
    fast = next(iter(DataLoader(rows_of(tensors, idx, default_collate), batch_size=5, collate_fn=lambda b: b)))
    slow = next(iter(DataLoader(Subset(tensors, idx.tolist()), batch_size=5)))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow))

    stores = []
    for dataset in (tensors, blobs):
        sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
        callback = CoresetCallback(sampler, strategy="grace", seed=11)
        quiet_trainer(max_epochs=3, callbacks=[callback]).fit(
            TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler)
        )
        assert callback.history[1]["scored"] > 0  # the first informed refresh scored the unmeasured pool
        stores.append(callback.store)
    for name in ("loss", "grad_norm", "embedding", "last_step"):
        assert torch.equal(getattr(stores[0], name), getattr(stores[1], name)), name


@pytest.mark.parametrize(
    "kwargs, expected",
    [({}, round(0.1 * 64)), ({"anchor_share": 0.5}, round(0.5 * 64)), ({"anchor_fraction": 0.05}, round(0.05 * 256)),
     ({"anchor_share": 0.0}, 0)],
)
def test_grace_later_refreshes_score_a_share_of_the_budget_through_the_callback(kwargs, expected):
    """End to end: after the first informed refresh, each refresh's scoring pass covers exactly the priority anchors
    (a tenth of the budget by default; a pool share with anchor_fraction; none at 0), not the pool."""
    from torch.utils.data import DataLoader

    from grace_lightning import CoresetCallback, CoresetSampler
    from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

    data = IndexedBlobs(n=256)
    sampler = CoresetSampler(data, fraction=0.25, seed=7)  # 64 a refresh
    callback = CoresetCallback(sampler, strategy="grace", strategy_kwargs=kwargs, seed=11)
    quiet_trainer(max_epochs=4, callbacks=[callback]).fit(TinyClassifier(), DataLoader(data, batch_size=8, sampler=sampler))
    assert callback.history[1]["scored"] > 100  # the first informed refresh reads the unmeasured pool
    assert [r["scored"] for r in callback.history[2:]] == [expected] * (len(callback.history) - 2)
