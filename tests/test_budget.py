"""The overhead budget (``max_selection_share``): a slow strategy is refreshed only as often as the fit can pay
for, every rank takes the same decision, and the budget's clock survives a checkpoint."""

from __future__ import annotations


import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, Selection, SelectionInput, Strategy
from grace_lightning.budget import OverheadBudget
from tests.harness import fit, load_records
from tests.toy import IndexedBlobs, TinyClassifier

SELECT_SECONDS = 1.0  # on the fake clock below
STEP_SECONDS = 0.1


class FakeClock:
    """``time.perf_counter`` for the plugin's modules: it moves only when the test says, so the test is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


CLOCK = FakeClock()


class SlowRandom(Strategy):
    """A uniform subset that takes SELECT_SECONDS to choose: a stand-in for an expensive strategy."""

    name = "slow_random"

    def select(self, inputs: SelectionInput) -> Selection:
        CLOCK.now += SELECT_SECONDS
        return Selection(torch.randperm(inputs.pool_size, generator=inputs.generator)[: inputs.budget].sort().values)


class SlowSteps(L.Callback):
    """Every training step takes STEP_SECONDS of the fake clock."""

    def on_train_batch_end(self, *args) -> None:
        CLOCK.now += STEP_SECONDS


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    import grace_lightning.budget
    import grace_lightning.callback
    import grace_lightning.telemetry

    CLOCK.now = 0.0
    for module in (grace_lightning.budget, grace_lightning.callback, grace_lightning.telemetry):
        monkeypatch.setattr(module, "time", CLOCK)
    return CLOCK


def _fit(share):
    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    callback = CoresetCallback(sampler, strategy=SlowRandom(), seed=3, max_selection_share=share)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=14, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback, SlowSteps()],
    )
    began = CLOCK.now
    trainer.fit(TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler))
    return callback, CLOCK.now - began


def test_a_slow_strategy_is_refreshed_only_as_often_as_the_budget_allows():
    # 14 epochs of 8 steps: 11.2 s of training; 14 selections of 1 s each without a budget (55% of the fit).
    unbudgeted, wall = _fit(None)
    assert unbudgeted.skipped_refreshes == 0 and len(unbudgeted.history) == 14  # the first one + 13 epoch ends
    assert unbudgeted.history[-1]["selection_seconds_total"] == pytest.approx(14.0)

    budgeted, wall = _fit(0.2)
    history = budgeted.history
    assert budgeted.skipped_refreshes >= 8 and len(history) + budgeted.skipped_refreshes == 14
    assert history[-1]["skipped_refreshes"] <= budgeted.skipped_refreshes
    spent = history[-1]["selection_seconds_total"]
    assert spent <= 0.2 * wall + 1e-9  # inside the share at the end ...
    for record in history[2:]:  # ... and after every refresh the budget allowed (the first two had no cost known)
        assert record["selection_seconds_total"] <= 0.2 * (record["selection_seconds_total"] / record["selection_share"]) + 1e-9
    # It spent what it could: one more refresh would have broken the share.
    assert spent + SELECT_SECONDS > 0.2 * (wall + SELECT_SECONDS) - 8 * STEP_SECONDS * 0.2


def test_every_rank_takes_rank_zeros_decision(tmp_path):
    fit(tmp_path, "ddp", devices=2, strategy=SlowRandom(), max_epochs=8, max_selection_share=0.05,
        extra_callbacks=(SlowSteps(),))
    rank0, rank1 = load_records(tmp_path, "ddp", devices=2)
    assert rank0["selections"] == rank1["selections"]  # same subset in force on both ranks, every epoch
    epochs = list(rank0["selections"].values())
    assert any(a == b for a, b in zip(epochs, epochs[1:]))  # some refresh was skipped: the subset stayed


def test_the_budget_clock_and_skips_survive_a_checkpoint(fake_clock):
    budget = OverheadBudget(0.1)
    budget.start(now=100.0)
    assert not budget.allows(selection_seconds=5.0, last_cost=1.0, now=110.0)
    fake_clock.now = 112.0
    assert budget.state_dict() == {"elapsed": 12.0, "skipped": 1}
    resumed = OverheadBudget(0.1)
    resumed.load_state_dict({"elapsed": 50.0, "skipped": 1})
    resumed.start(now=0.0)
    assert resumed.elapsed(now=10.0) == pytest.approx(60.0)  # the fit's wall clock before the checkpoint counts
    assert resumed.allows(selection_seconds=5.0, last_cost=1.0, now=10.0)  # 6 <= 0.1 * 61
    assert resumed.skipped == 1


def test_a_budget_outside_zero_one_names_the_parameter():
    with pytest.raises(ValueError, match="max_selection_share"):
        CoresetCallback(fraction=0.3, max_selection_share=1.5)
