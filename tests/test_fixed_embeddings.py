"""Embeddings from the user's own encoder (``CoresetCallback(embeddings=..., reference_embeddings=...)``).

They replace the live model's head input for every strategy that reads embeddings, are never overwritten by a
measurement, survive resume bit for bit (1 and 2 ranks), and let GIP find a target the model's own embeddings
cannot see, with no scoring pass at all.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from grace_lightning import CoresetCallback, CoresetSampler
from grace_lightning.signals import ExampleSignals, SignalStore
from tests.harness import fit, load_records, load_weights
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

POOL, WIDTH = 256, 12


def _encoder_view(n: int, seed: int, target: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
    """Embeddings an outside encoder might give: ``target`` rows in a 3-dimensional subspace (plus ``noise``),
    the others in the remaining directions."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, WIDTH, generator=g)
    rows[target, 3:] *= noise
    rows[~target, :3] = 0.0
    return rows


def test_store_keeps_fixed_embeddings_projected_and_known_for_every_example():
    store = SignalStore(10, max_embedding_dim=4, seed=3)
    given = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    store.fix_embedding(given)
    assert store.fixed == {"embedding"} and store.embedding.shape == (10, 4)
    assert torch.allclose(store.embedding.float(), store.to_store_space(given), atol=1e-3)
    assert torch.allclose(store.embedding.float().norm(dim=1), torch.ones(10), atol=1e-3)
    assert bool(store.has("embedding").all()) and not bool(store.has("loss").any())
    before = store.embedding.clone()
    store.update(torch.arange(5), ExampleSignals(loss=torch.ones(5), grad_norm=torch.ones(5), embedding=torch.randn(5, 6)), step=4)
    assert torch.equal(store.embedding, before), "a measurement overwrote the fixed embeddings"
    assert store.measured.sum() == 5 and bool((store.loss[:5] == 1).all()), "the other signals are still measured"
    with pytest.raises(ValueError, match=r"\(10, D\)"):
        store.fix_embedding(torch.randn(9, 6))


def _gip_fit(**callback_kwargs):
    dataset = IndexedBlobs(n=POOL)
    target = torch.arange(POOL) % 4 == 0  # 64 examples, whatever their class: invisible to the model's features
    sampler = CoresetSampler(dataset, fraction=0.25, seed=0)
    reference = Subset(dataset, torch.nonzero(target).squeeze(1)[:16].tolist())
    callback = CoresetCallback(sampler, strategy="gip", reference=reference, seed=0, **callback_kwargs)
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=16, sampler=sampler))
    return callback, sampler, target


def test_gip_with_an_encoders_embeddings_scores_nothing_and_finds_the_target():
    target = torch.arange(POOL) % 4 == 0
    callback, sampler, _ = _gip_fit(
        embeddings=_encoder_view(POOL, 0, target),
        reference_embeddings=_encoder_view(16, 1, torch.ones(16, dtype=torch.bool), noise=0.0),
    )
    assert callback.history and all(r["scored"] == 0 for r in callback.history), "GIP reads nothing else: no scoring"
    assert not bool(callback.store.measured.any()), "nothing was captured from the training batches either"
    first, *informed = callback.history  # the first subset is uniform, as for every strategy that reads signals
    assert "candidates" not in first and informed
    assert all(r["candidates"] == POOL for r in informed), "every example is a candidate from the first refresh"
    share = float(target[sampler.selection].float().mean())
    assert share >= 0.9, f"{share:.2f} of the subset is on target (pool: 0.25)"
    own, own_sampler, _ = _gip_fit()  # the model's own embeddings: the target is not in them
    assert own.history[1]["scored"] > 0
    assert float(target[own_sampler.selection].float().mean()) < 0.6


def _grace_fit(max_epochs=4, **strategy_kwargs):
    dataset = IndexedBlobs(n=POOL)
    given = _encoder_view(POOL, 0, torch.arange(POOL) % 2 == 0)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=0)
    callback = CoresetCallback(sampler, strategy="grace", seed=0, embeddings=given, strategy_kwargs=strategy_kwargs)
    quiet_trainer(max_epochs=max_epochs, callbacks=[callback]).fit(
        TinyClassifier(), DataLoader(dataset, batch_size=16, sampler=sampler)
    )
    return callback, sampler, given


def test_grace_on_fixed_embeddings_can_skip_the_scoring_pass_and_fill_the_unmeasured_from_the_graph():
    callback, sampler, given = _grace_fit(score_unmeasured=False)
    first, built, *later = callback.history  # a uniform start, the graph's build, then refreshes
    trained = POOL // 4  # the first epoch's uniform subset, measured for free while it trained
    assert first["scored"] == 0 and built["scored"] == 0, "no scoring pass: the graph is built on the given embeddings"
    assert built["anchors"] == trained and later
    anchors = round(0.1 * POOL // 4)  # priority anchors: a tenth of the budget, the never-measured first
    assert all(r["scored"] == anchors and r["moved"] == 0 and r["graph_seconds"] == 0 for r in later)
    assert torch.allclose(callback.store.embedding.float(), callback.store.to_store_space(given), atol=1e-3)
    measured = callback.store.measured
    assert not bool(measured.all()), "examples never drawn nor anchored stay unmeasured"
    importance = callback._strategy_state.importance
    assert (importance[~measured.numpy()] > 0).all(), "the unmeasured carry their neighbours' importance, not 0"


def test_grace_on_fixed_embeddings_scores_the_pool_by_default_and_never_repairs_its_graph():
    callback, _, _ = _grace_fit()
    _, built, *repaired = callback.history
    assert built["anchors"] == POOL and built["scored"] == POOL - POOL // 4 and repaired
    assert all(r["moved"] == 0 and r["graph_seconds"] == 0 and r["anchors"] > 0 for r in repaired)
    assert bool(callback.store.measured.all()), "loss and gradient norm still come from the live model"


def test_group_mates_on_an_encoders_embeddings_runs_no_scoring_pass_but_still_probes():
    """Group-MATES reads only embeddings (its labels come from probes): given them, the live model measures
    nothing, while every informed refresh still probes the whole pool's candidates."""
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=0)
    callback = CoresetCallback(
        sampler, strategy="group_mates", reference=IndexedBlobs(n=16, seed=1), seed=0,
        embeddings=_encoder_view(POOL, 0, torch.arange(POOL) % 2 == 0),
        strategy_kwargs={"trajectories": 4, "trajectory_length": 2, "clusters": 2},
    )
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=16, sampler=sampler))
    first, *informed = callback.history
    assert informed and all(r["scored"] == 0 for r in callback.history), "no scoring pass on given embeddings"
    assert not bool(callback.store.measured.any()), "nothing was captured from the training batches either"
    assert "oracle_steps" not in first, "the first subset is uniform: an untrained model's probes tell nothing"
    assert all(r["oracle_steps"] == 8 and r["fitted"] == 1 for r in informed)
    assert all(r["filled_unmeasured"] == 0 for r in informed), "every example is a candidate"


def _fixed_kwargs(strategy):
    kwargs = {"embeddings": _encoder_view(POOL, 0, torch.arange(POOL) % 2 == 0)}
    if strategy == "grace-unscored":
        kwargs["strategy_kwargs"] = {"score_unmeasured": False}
    if strategy == "gip":
        kwargs["reference"] = IndexedBlobs(n=32, seed=1)
        kwargs["reference_embeddings"] = _encoder_view(32, 1, torch.ones(32, dtype=torch.bool))
    return kwargs


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("strategy", ["grace", "grace-unscored", "gip"])
def test_resume_with_fixed_embeddings_is_bit_exact(tmp_path, devices, strategy):
    kwargs = dict(devices=devices, schedule="step", strategy=strategy.split("-")[0], **_fixed_kwargs(strategy))
    fit(tmp_path, "full", save_checkpoints=True, **kwargs)
    nb = int(POOL * 0.25) // devices // 8
    ckpt = tmp_path / "steps" / f"step={nb + nb // 2 + 1}.ckpt"
    fit(tmp_path, "resumed", ckpt_path=ckpt, **kwargs)
    full, resumed = load_records(tmp_path, "full", devices), load_records(tmp_path, "resumed", devices)
    for rank in range(devices):
        assert resumed[rank]["batches"], "the resumed run trained nothing"
        for position, batch in resumed[rank]["batches"].items():
            assert batch == full[rank]["batches"][position], f"rank {rank}, batch position {position}"
        assert resumed[rank]["final_selection"] == full[rank]["final_selection"]
    a, b = load_weights(tmp_path, "full"), load_weights(tmp_path, "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["selections"] == full[0]["selections"] for r in full), "the ranks disagree on the subsets"


def _callback(**kwargs):
    sampler = CoresetSampler(IndexedBlobs(n=POOL), fraction=0.25)
    return CoresetCallback(sampler, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embeddings": torch.randn(POOL - 1, 4)}, r"`embeddings` must have one row per pool example, shape \(256, D\)"),
        ({"embeddings": torch.full((POOL, 4), float("nan"))}, r"`embeddings` contains NaN"),
        ({"embeddings": torch.zeros(POOL, 4)}, r"`embeddings` has 256 all-zero rows"),
        ({"embeddings": "not numbers"}, r"`embeddings` must be a \(256, D\) array"),
        ({"reference_embeddings": torch.randn(8, 4)}, r"`reference_embeddings` needs `embeddings`"),
        (
            {"embeddings": torch.randn(POOL, 4), "reference_embeddings": torch.randn(8, 4)},
            r"there is no `reference`",
        ),
        (
            {"strategy": "gip", "embeddings": torch.randn(POOL, 4), "reference": IndexedBlobs(n=8)},
            r"pass the reference set's from the same encoder as `reference_embeddings`",
        ),
        (
            {
                "strategy": "gip", "embeddings": torch.randn(POOL, 4), "reference": IndexedBlobs(n=8),
                "reference_embeddings": torch.randn(7, 4),
            },
            r"`reference_embeddings` must have one row per reference example, shape \(8, D\)",
        ),
        (
            {
                "strategy": "gip", "embeddings": torch.randn(POOL, 4), "reference": IndexedBlobs(n=8),
                "reference_embeddings": torch.randn(8, 5),
            },
            r"width 5 and `embeddings` 4",
        ),
        ({"strategy_kwargs": {"score_unmeasured": False}}, r"score_unmeasured=False .*CoresetCallback\(embeddings=\.\.\.\)"),
        ({"strategy_kwargs": {"score_unmeasured": "no"}}, r"`score_unmeasured` must be True or False"),
    ],
    ids=[
        "rows", "nan", "zero-rows", "not-numbers", "no-pool", "no-reference", "gip-needs-reference", "ref-rows", "width",
        "grace-unscored-needs-embeddings", "grace-unscored-not-bool",
    ],
)
def test_bad_embeddings_are_refused_at_construction_naming_the_parameter(kwargs, match):
    kwargs = {"strategy": "grace", **kwargs}
    with pytest.raises(ValueError, match=match):
        _callback(**kwargs)


def test_embeddings_for_a_strategy_that_reads_none_warn():
    with pytest.warns(UserWarning, match=r"'random' reads no embeddings, so `embeddings` is ignored"):
        _callback(strategy="random", embeddings=torch.randn(POOL, 4))
