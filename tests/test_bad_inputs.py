"""Bad inputs fail early (construction, ``setup`` or before the first training step) with a message that names
the parameter and says how to fix it. Also: non-finite signals never reach the store."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from grace_lightning import CoresetCallback, CoresetSampler, ExampleSignals, SignalStore, Strategy
from grace_lightning.strategies import Selection
from tests.toy import quiet_trainer as trainer, IndexedBlobs, TinyClassifier


@pytest.fixture
def data():
    return IndexedBlobs(n=32)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(10))


class NoLen(Dataset):
    def __getitem__(self, i):
        return i


class Everything(Strategy):
    def select(self, inputs):
        return Selection(indices=None)


# ---------------------------------------------------------------------- construction: CoresetSampler

SAMPLER_CASES = {
    "fraction-zero": (dict(fraction=0.0), ValueError, r"`fraction` must be in \(0, 1\].*fraction=1\.0"),
    "fraction-above-one": (dict(fraction=1.5), ValueError, r"`fraction` must be in \(0, 1\].*got 1\.5"),
    "fraction-nan": (dict(fraction=float("nan")), ValueError, r"`fraction` must be a number in \(0, 1\]"),
    "fraction-inf": (dict(fraction=float("inf")), ValueError, r"`fraction` must be a number in \(0, 1\]"),
    "fraction-bool": (dict(fraction=True), ValueError, r"`fraction` must be a number in \(0, 1\]"),
    "fraction-and-size": (dict(fraction=0.5, size=4), ValueError, r"exactly one of `fraction`.*or `size`"),
    "neither-fraction-nor-size": (dict(), ValueError, r"exactly one of `fraction`.*or `size`"),
    "size-above-pool": (dict(size=33), ValueError, r"`size` must be in \[1, len\(data_source\)=32\].*Lower `size`"),
    "size-zero": (dict(size=0), ValueError, r"`size` must be in \[1, len\(data_source\)=32\].*got 0"),
    "size-float": (dict(size=2.5), ValueError, r"`size` must be an int"),
    "seed-float": (dict(size=4, seed=1.5), ValueError, r"`seed` must be an int"),
    "seed-str": (dict(size=4, seed="0"), ValueError, r"`seed` must be an int"),
}


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_rejects_bad_budget_or_seed_with_the_fix(case, data):
    kwargs, error, match = SAMPLER_CASES[case]
    with pytest.raises(error, match=match):
        CoresetSampler(data, **kwargs)


def test_sampler_rejects_an_iterable_dataset_and_says_to_use_a_map_style_one():
    with pytest.raises(TypeError, match=r"`data_source` is an IterableDataset.*map-style `torch.utils.data.Dataset`"):
        CoresetSampler(Stream(), fraction=0.5)


def test_sampler_rejects_a_dataset_without_len_and_says_to_use_a_map_style_one():
    with pytest.raises(TypeError, match=r"`data_source` \(NoLen\) has no `__len__`.*map-style dataset"):
        CoresetSampler(NoLen(), fraction=0.5)


def test_sampler_rejects_an_empty_dataset():
    with pytest.raises(ValueError, match=r"`data_source` is empty.*at least one example"):
        CoresetSampler([], fraction=0.5)


def test_bind_rejects_a_rank_outside_the_world(data):
    sampler = CoresetSampler(data, size=4)
    with pytest.raises(ValueError, match=r"0 <= rank < world_size.*rank=2, world_size=2"):
        sampler.bind(2, 2)


# ---------------------------------------------------------------------- construction: CoresetCallback

CALLBACK_CASES = {
    "unknown-strategy": (dict(strategy="nope"), ValueError, r"Unknown `strategy` 'nope'; choose one of \[.*'full'.*'random'.*\]"),
    "strategy-not-a-strategy": (dict(strategy=3), ValueError, r"Unknown `strategy` 3.*Strategy instance"),
    "both-intervals": (
        dict(refresh_every_n_epochs=2, refresh_every_n_steps=5),
        ValueError,
        r"only one of `refresh_every_n_epochs` and `refresh_every_n_steps`.*refresh_every_n_epochs=None",
    ),
    "epochs-interval-zero": (dict(refresh_every_n_epochs=0), ValueError, r"`refresh_every_n_epochs` must be a positive int or None"),
    "steps-interval-zero": (
        dict(refresh_every_n_epochs=None, refresh_every_n_steps=0),
        ValueError,
        r"`refresh_every_n_steps` must be a positive int or None",
    ),
    "epochs-interval-float": (dict(refresh_every_n_epochs=1.5), ValueError, r"`refresh_every_n_epochs` must be a positive int"),
    "negative-warmup": (dict(warmup_epochs=-1), ValueError, r"`warmup_epochs` must be an int >= 0, got -1"),
    "negative-anneal": (dict(anneal_epochs=-2), ValueError, r"`anneal_epochs` must be an int >= 0, got -2"),
    "callback-seed-float": (dict(seed=0.5), ValueError, r"`seed` must be an int, got 0\.5"),
    "scoring-batch-size-zero": (dict(scoring_batch_size=0), ValueError, r"`scoring_batch_size` must be a positive int or None"),
    "scoring-workers-negative": (dict(scoring_num_workers=-1), ValueError, r"`scoring_num_workers` must be an int >= 0"),
    "strategy-kwargs-do-not-fit": (
        dict(strategy="random", strategy_kwargs={"temperature": 2.0}),
        ValueError,
        r"`strategy_kwargs` do not fit strategy 'random'.*(argument|temperature)",
    ),
    "strategy-kwargs-with-an-instance": (
        dict(strategy=Everything(), strategy_kwargs={"k": 1}),
        ValueError,
        r"`strategy_kwargs` only apply when `strategy` is given by name",
    ),
}


@pytest.mark.parametrize("case", list(CALLBACK_CASES))
def test_callback_rejects_bad_arguments_with_the_fix(case, data):
    kwargs, error, match = CALLBACK_CASES[case]
    with pytest.raises(error, match=match):
        CoresetCallback(CoresetSampler(data, size=8), **kwargs)


def test_callback_rejects_a_sampler_that_is_not_a_coreset_sampler(data):
    with pytest.raises(TypeError, match=r"`sampler` must be the CoresetSampler given to the training DataLoader.*RandomSampler"):
        CoresetCallback(RandomSampler(data))


# ---------------------------------------------------------------------- at fit, before the first training step

FIT_CASES = {
    "anneal-without-max-epochs": (
        dict(anneal_epochs=1),
        dict(max_epochs=-1, max_steps=3),
        r"`anneal_epochs` needs Trainer\(max_epochs=\.\.\.\)",
    ),
    "warmup-plus-anneal-above-max-epochs": (
        dict(warmup_epochs=2, anneal_epochs=2),
        dict(max_epochs=3),
        r"warmup_epochs=2 \+ anneal_epochs=2 exceed Trainer\(max_epochs=3\); shorten them",
    ),
    "limit-train-batches-fraction": (
        dict(),
        dict(limit_train_batches=0.5),
        r"Trainer\(limit_train_batches=0\.5\).*Leave limit_train_batches=1\.0.*CoresetSampler\(fraction=",
    ),
    "limit-train-batches-count": (
        dict(),
        dict(limit_train_batches=3),
        r"Trainer\(limit_train_batches=3\).*Leave limit_train_batches=1\.0",
    ),
    "overfit-batches": (
        dict(),
        dict(overfit_batches=2),
        r"Trainer\(overfit_batches=2\).*remove the CoresetCallback",
    ),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_trainer_settings_that_fight_the_budget_fail_before_any_training_step(case, data):
    callback_kwargs, trainer_kwargs, match = FIT_CASES[case]
    sampler = CoresetSampler(data, fraction=0.25)
    model = TinyClassifier()
    with pytest.raises(ValueError, match=match):
        trainer(callbacks=[CoresetCallback(sampler, **callback_kwargs)], **trainer_kwargs).fit(
            model, DataLoader(data, batch_size=4, sampler=sampler)
        )
    assert model.seen == []


def test_a_loader_without_the_callbacks_sampler_fails_before_any_training_step(data):
    sampler = CoresetSampler(data, fraction=0.25)
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"not the sampler of the training DataLoader.*sampler=sampler\)"):
        trainer(callbacks=[CoresetCallback(sampler)]).fit(model, DataLoader(data, batch_size=4, shuffle=True))
    assert model.seen == []


def test_a_budget_too_small_for_one_batch_with_drop_last_fails_before_any_training_step(data):
    sampler = CoresetSampler(data, size=3)
    model = TinyClassifier()
    with pytest.raises(ValueError, match=r"no full batch of 4 with drop_last=True; raise the budget"):
        trainer(callbacks=[CoresetCallback(sampler)]).fit(
            model, DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
        )
    assert model.seen == []


# ---------------------------------------------------------------------- non-finite signals


def test_non_finite_signals_are_excluded_counted_and_duplicates_take_the_last_finite_row():
    store = SignalStore(8)
    store.update(
        torch.arange(5),
        ExampleSignals(loss=torch.arange(5.0), grad_norm=torch.arange(5.0) + 10, embedding=torch.eye(5, 3)),
        step=1,
    )
    old_loss, old_grad, old_emb = store.loss.clone(), store.grad_norm.clone(), store.embedding.clone()
    nan, inf = float("nan"), float("inf")
    idx = torch.tensor([0, 1, 2, 3, 3, 4, 4, 5, 6])
    loss = torch.tensor([nan, 1.5, 2.5, 30.0, 31.0, 40.0, 41.0, 50.0, inf])
    grad = torch.tensor([1.0, inf, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0])
    emb = torch.ones(9, 3)
    emb[2, 1] = nan  # bad embedding only
    emb[6, 0] = -inf  # the last occurrence of index 4 is bad: its earlier finite row wins
    rejected = store.update(idx, ExampleSignals(loss=loss, grad_norm=grad, embedding=emb), step=torch.arange(2, 11))

    assert rejected == 5 and store.invalid_count == 5
    for i in (0, 1, 2):  # rejected rows keep the old finite values and step
        assert store.loss[i] == old_loss[i] and store.grad_norm[i] == old_grad[i]
        assert torch.equal(store.embedding[i], old_emb[i]) and store.last_step[i] == 1
    assert store.loss[3] == 31.0 and store.grad_norm[3] == 2.0 and store.last_step[3] == 6  # last finite duplicate
    assert store.loss[4] == 40.0 and store.grad_norm[4] == 3.0 and store.last_step[4] == 7  # last *finite* one
    assert store.loss[5] == 50.0 and store.last_step[5] == 9  # a new finite example is measured
    assert not bool(store.measured[6]) and store.loss[6] == 0.0  # never written when non-finite
    assert torch.isfinite(store.loss).all() and torch.isfinite(store.grad_norm).all()
    assert torch.isfinite(store.embedding.float()).all()

    assert store.update(torch.tensor([7]), ExampleSignals(loss=torch.tensor([nan]), grad_norm=torch.tensor([0.0])), step=12) == 1
    assert store.invalid_count == 6 and not bool(store.measured[7])
