"""Overlapped selection: the strategy's ``select`` runs in a background thread, handed over at the next decision point."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from grace_lightning import CoresetCallback, CoresetSampler, Selection, SelectionInput
from grace_lightning.schedule import RefreshSchedule
from tests.harness import TopLoss, fit, load_records, load_weights
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer
from torch.utils.data import DataLoader

POOL, FRACTION, BATCH = 256, 0.25, 8
PER_EPOCH = int(POOL * FRACTION) // BATCH


class SpyTopLoss(TopLoss):
    """TopLoss that records every ``select`` call: the step it was asked for, its answer and the thread it ran on."""

    name = "spy_top_loss"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[dict] = []

    def select(self, inputs: SelectionInput) -> Selection:
        time.sleep(self.delay)
        selection = super().select(inputs)
        self.calls.append(
            {"step": inputs.step, "indices": selection.indices.tolist(), "thread": threading.current_thread().name}
        )
        return selection


def _fit(strategy, max_epochs=4, **kwargs):
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=FRACTION, seed=7)
    callback = CoresetCallback(sampler, strategy=strategy, seed=11, **kwargs)
    model = TinyClassifier()
    quiet_trainer(max_epochs=max_epochs, callbacks=[callback]).fit(model, DataLoader(dataset, batch_size=BATCH, sampler=sampler))
    return callback, model


def _trained_per_epoch(model):
    return [sorted(sum(model.seen[e * PER_EPOCH : (e + 1) * PER_EPOCH], [])) for e in range(len(model.seen) // PER_EPOCH)]


def test_overlap_hands_over_the_synchronous_selection_one_refresh_later():
    sync_strategy, overlap_strategy = SpyTopLoss(), SpyTopLoss()
    _, sync_model = _fit(sync_strategy, overlap=False)
    callback, overlap_model = _fit(overlap_strategy, overlap=True)
    sync_epochs, overlap_epochs = _trained_per_epoch(sync_model), _trained_per_epoch(overlap_model)
    # Both runs train epoch 0 on the cold start and reach the first informed refresh with the same model, so
    # they compute the same selection from the same signals; the overlapped run puts it into force one epoch later.
    assert sync_strategy.calls[0]["step"] == overlap_strategy.calls[0]["step"] == PER_EPOCH
    assert sync_strategy.calls[0]["indices"] == overlap_strategy.calls[0]["indices"]
    first = sorted(sync_strategy.calls[0]["indices"])
    assert sync_epochs[1] == first and overlap_epochs[2] == first
    assert overlap_epochs[1] == overlap_epochs[0]  # the previous subset trains while the thread selects
    assert overlap_strategy.calls[0]["thread"].startswith("coreset-selection")
    # The refresh at the end of epoch 2 has no decision point after it (epoch 3 is the last): it runs synchronously.
    assert overlap_strategy.calls[-1]["thread"] == threading.main_thread().name
    assert [c["step"] for c in overlap_strategy.calls] == [c["step"] for c in sync_strategy.calls]
    records = callback.history
    handed = [r for r in records if "exposed_seconds" in r]
    assert [r["submitted_batch"] for r in handed] == [PER_EPOCH, 2 * PER_EPOCH]
    assert [r["start_batch"] for r in handed] == [2 * PER_EPOCH, 3 * PER_EPOCH]


def test_a_slow_thread_changes_nothing_but_the_exposed_seconds():
    """The hand-over step is fixed by the schedule, not by when the thread finishes: same subsets, same weights."""
    fast_callback, fast_model = _fit(SpyTopLoss(), overlap=True)
    slow_callback, slow_model = _fit(SpyTopLoss(delay=0.3), overlap=True)
    assert fast_model.seen == slow_model.seen
    for a, b in zip(fast_model.state_dict().values(), slow_model.state_dict().values()):
        assert torch.equal(a, b)
    slow_exposed = sum(r.get("exposed_seconds", 0.0) for r in slow_callback.history)
    fast_exposed = sum(r.get("exposed_seconds", 0.0) for r in fast_callback.history)
    assert slow_exposed > fast_exposed + 0.2  # the main thread waited for the sleeping selections
    assert all(r["selection_seconds"] >= r.get("exposed_seconds", 0.0) for r in slow_callback.history)


def test_hidden_seconds_are_not_counted_as_selection_time():
    """A selection that finishes while training goes on costs the training thread (almost) nothing."""
    from lightning.pytorch.callbacks import Callback

    class SlowTraining(Callback):  # each epoch takes ~0.16 s, well past the 0.05 s selection
        def on_train_batch_end(self, *args):
            time.sleep(0.02)

    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=FRACTION, seed=7)
    callback = CoresetCallback(sampler, strategy=SpyTopLoss(delay=0.05), seed=11, overlap=True)
    quiet_trainer(max_epochs=4, callbacks=[callback, SlowTraining()]).fit(
        TinyClassifier(), DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    )
    handed = [r for r in callback.history if "hidden_seconds" in r]
    assert len(handed) == 2
    for r in handed:
        assert r["strategy_seconds"] >= 0.05
        assert r["exposed_seconds"] < 0.02 and r["hidden_seconds"] >= 0.04
        assert r["selection_seconds"] < r["strategy_seconds"]  # only the measuring and the wait count


def test_the_threads_error_reaches_the_training_thread():
    class Broken(TopLoss):
        name = "broken"

        def select(self, inputs):
            raise RuntimeError("strategy bug in the background")

    with pytest.raises(RuntimeError, match="strategy bug in the background"):
        _fit(Broken(), overlap=True)


def test_auto_overlaps_only_costly_strategies_on_an_accelerator():
    callback, _ = _fit("grace", max_epochs=1)
    assert callback.overlap is False  # "auto" on the CPU: the thread would compete with training for the cores
    assert CoresetCallback(strategy="grace", fraction=0.5).overlap is False
    from grace_lightning.inputs import overlap_setting
    from grace_lightning.strategies import build_strategy

    assert overlap_setting("auto", build_strategy("grace"), on_accelerator=True) is True
    assert overlap_setting("auto", build_strategy("random"), on_accelerator=True) is False
    assert overlap_setting(True, build_strategy("random")) is True


def test_bad_overlap_names_the_parameter():
    with pytest.raises(ValueError, match=r"`overlap` must be True, False or 'auto'"):
        CoresetCallback(fraction=0.5, overlap="yes")


def test_a_fit_ending_with_a_pending_selection_drops_it_and_stops_the_thread():
    strategy = SpyTopLoss(delay=0.2)
    callback, _ = _fit(strategy, max_epochs=3, overlap=True, anneal_epochs=1)
    # Refresh at the end of epoch 0 (handed over at epoch 1's end, where the anneal starts): dropped, never trained.
    assert callback._pending is None and callback._worker._executor is None
    assert all(r.get("exposed_seconds") is None for r in callback.history)


def test_decides_again_sees_the_next_refresh_or_anneal():
    s = RefreshSchedule(every_n_epochs=1, max_epochs=4)
    assert s.decides_again(8, 0, 8) and s.decides_again(16, 1, 8)
    assert not s.decides_again(24, 2, 8)  # the end of epoch 3 is the end of training
    assert RefreshSchedule(every_n_epochs=1, anneal_epochs=1, max_epochs=4).decides_again(16, 1, 8)
    steps = RefreshSchedule(every_n_epochs=None, every_n_steps=3, max_epochs=2)
    assert steps.decides_again(12, 1, 8)  # batch 15 is a refresh
    assert not steps.decides_again(15, 1, 8)  # 18 lies beyond the last batch (16)
    assert RefreshSchedule(every_n_epochs=1).decides_again(800, 99, 8)  # unbounded training


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("strategy", ["top_loss", "grace"])
def test_resume_is_bit_exact_with_overlap(tmp_path, devices, strategy):
    """A checkpoint taken while a selection is pending holds it; the resumed run hands it over at the same step."""
    from tests.test_resume import _assert_resumed_equals_uninterrupted, _checkpoints

    kwargs = dict(devices=devices, num_workers=2, schedule="step", strategy=TopLoss() if strategy == "top_loss" else strategy, overlap=True)
    fit(tmp_path, "full", save_checkpoints=True, **kwargs)
    for point, ckpt in _checkpoints(tmp_path, devices).items():
        saved = torch.load(ckpt, weights_only=False)["callbacks"]
        (state,) = [v for k, v in saved.items() if k.startswith("CoresetCallback")]
        assert state["pending"] is not None and state["pending"]["selection"] is not None  # a refresh every 3 batches
        fit(tmp_path, f"resumed_{point}", ckpt_path=ckpt, **kwargs)
        _assert_resumed_equals_uninterrupted(tmp_path, devices, point)


def test_overlap_under_ddp_matches_one_rank_per_selection(tmp_path):
    """Two ranks (ddp_fork) agree on every subset with the selection running on rank 0's thread."""
    fit(tmp_path, "ddp", devices=2, schedule="epoch", strategy="grace", overlap=True, max_epochs=4)
    ranks = load_records(tmp_path, "ddp", 2)
    assert ranks[0]["selections"] == ranks[1]["selections"]
    assert len({tuple(s) for s in ranks[0]["selections"].values()}) >= 3  # the subsets did change
    shards = [set(sum(r["batches"].values(), [])) for r in ranks]
    assert shards[0] and shards[1]
    assert load_weights(tmp_path, "ddp")
