"""The baseline strategies ``infobatch`` and ``el2n`` as pure functions of the store, a budget and a generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, ExampleSignals, SelectionInput, SignalStore, build_strategy
from grace_lightning.signals import classification_signals
from grace_lightning.strategies.el2n import EL2N, EL2NState
from grace_lightning.strategies.infobatch import InfoBatch
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer


def _loss_store(loss: torch.Tensor, measured: torch.Tensor) -> SignalStore:
    store = SignalStore(loss.numel())
    idx = measured.nonzero().squeeze(1)
    store.update(idx, ExampleSignals(loss=loss[idx], grad_norm=torch.ones(idx.numel())), step=0)
    return store


def _inputs(store, budget, seed=0, progress=None, epoch=0, state=None, now=0):
    return SelectionInput(
        pool_size=store.pool_size, budget=budget, store=store, generator=torch.Generator().manual_seed(seed),
        progress=progress, epoch=epoch, state=state, now_batch=now,
    )


def _pool(n=200, unmeasured=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(n, generator=g) * 2
    measured = torch.ones(n, dtype=torch.bool)
    measured[torch.randperm(n, generator=g)[:unmeasured]] = False
    return _loss_store(loss, measured), loss, measured


# ---------------------------------------------------------------------- infobatch


def _weighted_gradient_sums(strategy, store, budget, grads, draws, unit_weights=False):
    sums = []
    for seed in range(draws):
        selection = strategy.select(_inputs(store, budget, seed=seed))
        weights = torch.ones(selection.indices.numel()) if unit_weights else selection.weights
        sums.append((weights[:, None].double() * grads[selection.indices]).sum(0))
    return torch.stack(sums).mean(0)


@pytest.mark.parametrize("prune_ratio", [0.5, None], ids=["fixed_r", "budget_r"])
def test_infobatch_rescaling_keeps_the_expected_gradient_unbiased(prune_ratio):
    store, loss, measured = _pool()
    easy = int((measured & (loss < loss[measured].double().mean())).sum())
    strategy, budget = InfoBatch(prune_ratio=prune_ratio), 200 - easy + easy // 2  # derived r is about 0.5 too
    assert 0.4 < strategy.select(_inputs(store, budget)).diagnostics["prune_ratio"] < 0.6
    # Per-example gradients with a common direction, so dropping easy examples without rescaling shows as bias.
    grads = 1.0 + torch.randn(200, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = grads.sum(0)
    estimate = _weighted_gradient_sums(strategy, store, budget, grads, draws=2000)
    assert torch.allclose(estimate, full, atol=1.0), (estimate, full)  # ~5 standard errors
    unweighted = _weighted_gradient_sums(strategy, store, budget, grads, draws=200, unit_weights=True)
    assert float((unweighted - full).abs().min()) > 10.0, "weights of 1 would be biased; the test must see that"


def test_infobatch_never_drops_high_loss_or_unmeasured_examples_and_weights_the_kept_easy_ones():
    store, loss, measured = _pool()
    mean = float(loss[measured].double().mean())
    must_keep = (~measured | (loss >= mean)).nonzero().squeeze(1)
    easy = measured & (loss < mean)
    for strategy in (InfoBatch(prune_ratio=0.5), InfoBatch()):
        for seed in range(5):
            selection = strategy.select(_inputs(store, 130, seed=seed))
            assert selection.indices.dtype == torch.int64 and bool((selection.indices.diff() > 0).all())
            assert bool(torch.isin(must_keep, selection.indices).all())
            kept_easy = easy[selection.indices]
            assert bool((selection.weights[~kept_easy] == 1.0).all())
            k, total = int(kept_easy.sum()), int(easy.sum())
            assert 0 < k < total
            assert torch.allclose(selection.weights[kept_easy], torch.full((k,), total / k))
    fixed = InfoBatch(prune_ratio=0.5).select(_inputs(store, 130))
    assert int(easy[fixed.indices].sum()) == math.ceil(0.5 * int(easy.sum()))  # r = 0.5 of the easy ones dropped
    draws = [InfoBatch().select(_inputs(store, 130, seed=s)).indices for s in range(2)]
    assert not torch.equal(draws[0], draws[1])  # which easy examples go is random, drawn from the generator


def test_infobatch_kept_set_matches_the_budget_when_it_can_and_caps_the_ratio_otherwise():
    store, loss, measured = _pool()
    easy = int((measured & (loss < loss[measured].double().mean())).sum())
    always = 200 - easy
    for budget in (always + 10, always + easy // 2, 200):
        assert InfoBatch().select(_inputs(store, budget)).indices.numel() == budget
    # Budget below the examples that must stay: drop the capped share r = max_prune_ratio, stream the rest.
    capped = InfoBatch(max_prune_ratio=0.9).select(_inputs(store, always - 5))
    assert capped.indices.numel() == always + math.ceil(0.1 * easy)
    assert float(capped.weights.max()) <= 10.0 + 1e-6
    assert capped.diagnostics["prune_ratio"] <= 0.9


def test_infobatch_anneals_to_the_whole_pool_for_the_last_share_of_training():
    store, _, _ = _pool()
    strategy = InfoBatch(prune_ratio=0.5)  # anneal_share=0.125: the paper's delta = 0.875
    assert strategy.select(_inputs(store, 50, progress=0.875)).indices is None
    assert strategy.select(_inputs(store, 50, progress=0.95)).weights is None
    assert strategy.select(_inputs(store, 50, progress=0.8)).indices is not None
    assert strategy.select(_inputs(store, 50, progress=None)).indices is not None  # unknown length: never
    assert InfoBatch(anneal_share=0.0).select(_inputs(store, 50, progress=0.999)).indices is not None
    assert strategy.to_score(_inputs(store, 50)) is None  # no scoring pass: losses come from trained batches


# ---------------------------------------------------------------------- el2n


def _by_hand(logits: list[float], label: int) -> float:
    exps = [math.exp(z) for z in logits]
    p = [e / sum(exps) for e in exps]
    return math.sqrt(sum((p_c - (1.0 if c == label else 0.0)) ** 2 for c, p_c in enumerate(p)))


def test_error_norm_is_the_el2n_definition_on_hand_computed_logits():
    logits = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]
    labels = [0, 1, 1, 2, 0]
    s = classification_signals(torch.tensor(logits), torch.randn(5, 4), torch.tensor(labels), has_bias=True)
    expected = [_by_hand(z, y) for z, y in zip(logits, labels, strict=True)]
    assert abs(expected[0] - math.sqrt(6) / (math.exp(2) + 2)) < 1e-12  # p - onehot = (-2, 1, 1) / (e² + 2)
    assert s.error_norm.tolist() == pytest.approx(expected, abs=1e-6)
    store = SignalStore(5)
    store.update(torch.arange(5), s, step=0)
    assert store.error_norm.tolist() == pytest.approx(expected, abs=1e-6)
    strategy = EL2N(score_epoch=0)
    selection = strategy.select(_inputs(store, 2, state=strategy.create_state(5)))
    top2 = sorted(range(5), key=lambda i: -expected[i])[:2]
    assert selection.indices.tolist() == sorted(top2)


def _el2n_store(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(n, generator=g)
    store = SignalStore(n)
    store.update(torch.arange(n), ExampleSignals(torch.rand(n, generator=g), torch.rand(n, generator=g), error_norm=score), step=0)
    return store, score


def test_el2n_trains_on_uniform_subsets_before_its_scoring_epoch():
    store, _ = _el2n_store()
    strategy = EL2N(score_epoch=2)
    state = strategy.create_state(100)
    picks = []
    for seed, epoch in enumerate((0, 1)):
        inputs = _inputs(store, 20, seed=seed, epoch=epoch, state=state)
        assert strategy.to_score(inputs) is None
        picks.append(strategy.select(inputs).indices)
        assert picks[-1].numel() == 20 and picks[-1].unique().numel() == 20
    assert not torch.equal(picks[0], picks[1]) and state.selection is None


def test_el2n_keeps_the_top_budget_frozen_between_refreshes_and_rescores_when_asked():
    for every in (None, 2):
        store, score = _el2n_store()
        strategy = EL2N(score_epoch=1, rescore_every_n_refreshes=every)
        state = strategy.create_state(100)
        first_inputs = _inputs(store, 20, epoch=1, state=state, now=10)
        assert torch.equal(strategy.to_score(first_inputs), torch.arange(100))  # the whole pool
        first = strategy.select(first_inputs)
        assert first.indices.tolist() == sorted(torch.topk(score, 20).indices.tolist())
        assert first.weights is None
        # Free training signals update the selected examples only: their new scores must not re-rank.
        store.update(first.indices, ExampleSignals(torch.ones(20), torch.ones(20), error_norm=torch.zeros(20)), step=20)
        second_inputs = _inputs(store, 20, seed=1, epoch=2, state=state, now=20)
        assert strategy.to_score(second_inputs) is None
        assert torch.equal(strategy.select(second_inputs).indices, first.indices)
        third_inputs = _inputs(store, 20, seed=2, epoch=3, state=state, now=30)
        third = strategy.select(third_inputs)
        if every is None:
            assert strategy.to_score(third_inputs) is None and torch.equal(third.indices, first.indices)
        else:  # the second refresh after the scoring one rescans the pool and re-selects
            assert third.diagnostics["rescored"] == 1.0
            assert not bool(torch.isin(third.indices, first.indices).any())  # their scores dropped to 0


def test_el2n_breaks_ties_with_its_generator_and_ranks_unmeasured_examples_last():
    store = SignalStore(10)
    store.update(torch.arange(6), ExampleSignals(torch.ones(6), torch.ones(6), error_norm=torch.ones(6)), step=0)
    strategy = EL2N(score_epoch=0)
    picks = {tuple(strategy.select(_inputs(store, 3, seed=s, state=strategy.create_state(10))).indices.tolist()) for s in range(10)}
    assert len(picks) > 1 and all(max(p) < 6 for p in picks)


def test_el2n_without_error_norm_fails_with_what_to_return():
    store = _loss_store(torch.rand(10), torch.ones(10, dtype=torch.bool))  # a custom capture without EL2N
    strategy = EL2N(score_epoch=0)
    with pytest.raises(ValueError, match=r"error_norm.*coreset_signals|coreset_signals.*error_norm"):
        strategy.select(_inputs(store, 3, state=strategy.create_state(10)))


def test_el2n_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    store, _ = _el2n_store()
    strategy = EL2N(score_epoch=0, rescore_every_n_refreshes=3)
    state = strategy.create_state(100)
    strategy.select(_inputs(store, 20, state=state))
    strategy.select(_inputs(store, 20, state=state))
    torch.save(state.state_dict(), tmp_path / "s.pt")
    restored = EL2NState()
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(restored.selection, state.selection) and restored.waited == state.waited == 1
    assert strategy.to_score(_inputs(store, 20, state=restored)) is None  # 2 of 3: not yet due


def test_baselines_are_registered_and_validate_parameters():
    assert isinstance(build_strategy("infobatch", prune_ratio=0.5), InfoBatch)
    assert isinstance(build_strategy("el2n", score_epoch=1), EL2N)
    for kwargs, name in [({"prune_ratio": 1.0}, "prune_ratio"), ({"prune_ratio": -0.1}, "prune_ratio"),
                         ({"anneal_share": 1.0}, "anneal_share"), ({"max_prune_ratio": "0.9"}, "max_prune_ratio")]:
        with pytest.raises(ValueError, match=f"`{name}` must be a number in \\[0, 1\\)"):
            InfoBatch(**kwargs)
    with pytest.raises(ValueError, match="`score_epoch` must be an int >= 0"):
        EL2N(score_epoch=-1)
    with pytest.raises(ValueError, match="`rescore_every_n_refreshes` must be a positive int, or None"):
        EL2N(rescore_every_n_refreshes=0)


class _CustomWithoutEL2N(TinyClassifier):
    def coreset_signals(self, batch):
        x, y, _ = batch
        s = classification_signals(self(x), self.body(x), y, has_bias=True)
        return ExampleSignals(loss=s.loss, grad_norm=s.grad_norm)  # leaves error_norm out


def test_el2n_in_a_fit_with_a_custom_capture_missing_error_norm_says_what_to_return():
    dataset = IndexedBlobs(n=64)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=0)
    callback = CoresetCallback(sampler, strategy="el2n", strategy_kwargs={"score_epoch": 1})
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    with pytest.raises(ValueError, match="custom `coreset_signals` must return it"):
        trainer.fit(_CustomWithoutEL2N(), DataLoader(dataset, batch_size=8, sampler=sampler))
