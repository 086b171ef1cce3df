"""Misuse that used to train to the end silently, or fail late and cryptically, now fails or warns with the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from grace_lightning import CoresetCallback, CoresetSampler
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

POOL, BATCH = 256, 8


def _setup(strategy="random", **callback_kwargs):
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=3)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    return loader, CoresetCallback(sampler, strategy=strategy, **callback_kwargs)


class IgnoresWeights(TinyClassifier):
    """The README's three-line adoption without `batch_weights`: a plain mean loss."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)


def _weight_warnings(caught):
    return [w for w in caught if "batch_weights" in str(w.message)]


def test_weights_the_training_step_never_reads_are_named_once():
    loader, coreset = _setup("infobatch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=3, callbacks=[coreset]).fit(IgnoresWeights(), loader)
    assert len(_weight_warnings(caught)) == 1
    assert "infobatch" in str(_weight_warnings(caught)[0].message)


def test_weights_the_training_step_reads_draw_no_warning():
    loader, coreset = _setup("infobatch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=3, callbacks=[coreset]).fit(TinyClassifier(), loader)
    assert not _weight_warnings(caught)
    assert any(bool(torch.any(w != 1)) for w in [coreset.sampler.weights]), "infobatch gave no weights: vacuous"


class NanLoss(TinyClassifier):
    """A diverged model: every logit is NaN from the first step on."""

    def forward(self, x):
        return self.head(self.body(x) * float("nan"))


def test_a_store_of_mostly_nan_signals_stops_the_refresh_with_the_cause():
    loader, coreset = _setup("grace")
    with pytest.raises(RuntimeError, match="NaN or infinite.*diverged model"):
        quiet_trainer(max_epochs=3, callbacks=[coreset]).fit(NanLoss(), loader)
    assert coreset.store.invalid_count >= POOL // 4  # the first epoch's signals, all rejected


def test_max_invalid_share_is_checked_at_construction():
    with pytest.raises(ValueError, match="max_invalid_share"):
        _setup(max_invalid_share=1.5)


class WithValidation(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)


def test_the_sampler_in_the_validation_loader_fails_with_the_fix():
    loader, coreset = _setup()
    val = DataLoader(loader.dataset, batch_size=BATCH, sampler=coreset.sampler)
    trainer = quiet_trainer(max_epochs=1, callbacks=[coreset], num_sanity_val_steps=2)
    with pytest.raises(ValueError, match="iterated by a sanity_check DataLoader.*shuffle=False"):
        trainer.fit(WithValidation(), loader, val)


class Unlabelled(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return (self.base[i][0],)


def test_a_reference_set_without_labels_fails_at_setup():
    loader, coreset = _setup("gip", reference=Unlabelled(IndexedBlobs(n=16, seed=1)))
    with pytest.raises(ValueError, match="reference set's items are a tuple of 1 items.*labels included"):
        quiet_trainer(max_epochs=2, callbacks=[coreset]).fit(TinyClassifier(), loader)
    assert coreset.history == []  # nothing was selected, let alone trained


@pytest.mark.parametrize("accumulate", [1, 2])
def test_refresh_every_n_steps_counts_optimizer_steps(accumulate):
    loader, coreset = _setup(refresh_every_n_epochs=None, refresh_every_n_steps=2)
    trainer = quiet_trainer(max_epochs=1, callbacks=[coreset], accumulate_grad_batches=accumulate)
    trainer.fit(TinyClassifier(), loader)
    refreshed_after = [int(r["start_batch"]) for r in coreset.history[1:]]  # [0] is the first selection
    assert refreshed_after == list(range(2 * accumulate, 8, 2 * accumulate))
    assert trainer.global_step == 8 // accumulate


class TwoLoaders(TinyClassifier):
    """Trains on a dict of two loaders: the coreset's blobs and an extra stream of the same format."""

    def training_step(self, batch, batch_idx):
        losses = [F.cross_entropy(self(x), y) for x, y, _ in batch.values()]
        return sum(losses)


def test_a_signal_strategy_trains_beside_a_second_training_loader():
    """A dict of training loaders: grace reads the coreset loader's part only, from scoring passes."""
    loader, coreset = _setup("grace")
    extra = DataLoader(IndexedBlobs(n=64, seed=5), batch_size=BATCH, shuffle=True)
    trainer = quiet_trainer(max_epochs=3, callbacks=[coreset])
    trainer.fit(TwoLoaders(), {"coreset": loader, "extra": extra})
    assert trainer.num_training_batches == 8
    assert len(coreset.history) == 3 and coreset.store.measured.all()
    assert coreset.history[-1]["scored"] > 0
