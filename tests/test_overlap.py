"""Overlapped selection: the strategy's ``select`` runs in a background thread, handed over at the next decision point."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, Selection, SelectionInput
from grace_lightning.schedule import RefreshSchedule
from tests.harness import TopLoss, fit, load_records, load_weights
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer

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


def _fit(strategy, max_epochs=4, accelerator="cpu", **kwargs):
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=FRACTION, seed=7)
    callback = CoresetCallback(sampler, strategy=strategy, seed=11, **kwargs)
    model = TinyClassifier()
    trainer = quiet_trainer(accelerator=accelerator, max_epochs=max_epochs, callbacks=[callback])
    trainer.fit(model, DataLoader(dataset, batch_size=BATCH, sampler=sampler))
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
    # Every second of the slow thread is accounted for, as waited (exposed) or run beside training (hidden).
    handed = [r for r in slow_callback.history if "exposed_seconds" in r]
    assert handed and all(r["exposed_seconds"] + r["hidden_seconds"] >= 0.3 for r in handed)
    assert all(r["selection_seconds"] >= r["exposed_seconds"] for r in handed)
    assert len(fast_callback.history) == len(slow_callback.history)


def test_hidden_seconds_are_not_counted_as_selection_time():
    """A selection that finishes while training goes on costs the training thread (almost) nothing.

    Margins are wide (a 0.5 s selection against 0.8 s epochs) so that a busy machine cannot flip the outcome.
    """
    from lightning.pytorch.callbacks import Callback

    class SlowTraining(Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.1)

    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=FRACTION, seed=7)
    callback = CoresetCallback(sampler, strategy=SpyTopLoss(delay=0.5), seed=11, overlap=True)
    quiet_trainer(max_epochs=4, callbacks=[callback, SlowTraining()]).fit(
        TinyClassifier(), DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    )
    handed = [r for r in callback.history if "hidden_seconds" in r]
    assert len(handed) == 2
    for r in handed:
        assert r["strategy_seconds"] >= 0.5
        assert r["hidden_seconds"] > 0.3 and r["exposed_seconds"] < 0.2
        assert r["selection_seconds"] < r["strategy_seconds"] - 0.2  # only the measuring and the wait count


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


def test_a_refresh_before_the_anneal_runs_synchronously():
    """Its subset would be handed over where the anneal starts, and never train: so it is not put on the thread."""
    strategy = SpyTopLoss()
    callback, _ = _fit(strategy, max_epochs=4, overlap=True, anneal_epochs=1)
    # Refreshes at the ends of epochs 0 and 1; the end of epoch 2 starts the anneal.
    assert [c["thread"].startswith("coreset-selection") for c in strategy.calls] == [True, False]
    assert callback._pending is None and callback._worker._executor is None  # the thread is stopped at fit end


def test_a_fit_stopped_early_drops_the_pending_selection():
    strategy = SpyTopLoss(delay=0.2)
    dataset = IndexedBlobs(n=POOL)
    sampler = CoresetSampler(dataset, fraction=FRACTION, seed=7)
    callback = CoresetCallback(sampler, strategy=strategy, seed=11, overlap=True)
    trainer = quiet_trainer(max_epochs=4, max_steps=PER_EPOCH + 2, callbacks=[callback])
    trainer.fit(TinyClassifier(), DataLoader(dataset, batch_size=BATCH, sampler=sampler))
    assert len(strategy.calls) == 1 and callback._pending is None  # computed on the thread, never handed over
    assert not [r for r in callback.history if "exposed_seconds" in r]


def test_next_action_finds_the_next_decision_point():
    from grace_lightning.schedule import Action

    s = RefreshSchedule(every_n_epochs=1, max_epochs=4)
    assert s.next_action(8, 8) is Action.SELECT and s.next_action(16, 8) is Action.SELECT
    assert s.next_action(24, 8) is None  # the end of epoch 3 is the end of training
    assert s.next_action(5, 8) is Action.SELECT  # mid-epoch: this epoch's end
    assert RefreshSchedule(every_n_epochs=1, anneal_epochs=1, max_epochs=4).next_action(16, 8) is Action.FULL_POOL
    assert RefreshSchedule(every_n_epochs=2, max_epochs=6).next_action(8, 8) is Action.SELECT  # end of epoch 2
    steps = RefreshSchedule(every_n_epochs=None, every_n_steps=3, max_epochs=2)
    assert steps.next_action(12, 8) is Action.SELECT  # batch 15
    assert steps.next_action(15, 8) is None  # 18 lies beyond the last batch (16)
    assert RefreshSchedule(every_n_epochs=1).next_action(800, 8) is Action.SELECT  # unbounded training


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


def test_two_ranks_agree_on_every_subset_with_overlap(tmp_path):
    """Two ranks (ddp_fork) agree on every subset with the selection running on rank 0's thread."""
    fit(tmp_path, "ddp", devices=2, schedule="epoch", strategy="grace", overlap=True, max_epochs=4)
    ranks = load_records(tmp_path, "ddp", 2)
    assert ranks[0]["selections"] == ranks[1]["selections"]
    assert len({tuple(s) for s in ranks[0]["selections"].values()}) >= 3  # the subsets did change
    shards = [set(sum(r["batches"].values(), [])) for r in ranks]
    assert shards[0] and shards[1]
    assert load_weights(tmp_path, "ddp")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a BLAS pool of two threads to see it limited to one")
def test_the_selection_thread_runs_numpys_blas_on_one_thread_and_gives_it_back():
    """numpy's process-wide BLAS pool is limited to one thread from a submission to its hand-over (it spins against
    the training loop's threads otherwise), set and lifted by the submitting thread; torch's and OpenMP-threaded
    pools are left alone; close() lifts a limit whose selection was never handed over."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from grace_lightning.overlap import PendingSelection, SelectionWorker, process_wide_blas

    def numpy_blas() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if "numpy" in lib["filepath"] and lib["user_api"] == "blas"]

    limited = process_wide_blas().info()
    assert any("numpy" in lib["filepath"] for lib in limited)
    assert all(lib.get("threading_layer") != "openmp" and "torch" not in lib["filepath"] for lib in limited)
    seen: list[list[int]] = []

    def select() -> Selection:
        seen.append(numpy_blas())
        return Selection(torch.arange(3), None, {})

    worker = SelectionWorker()
    with threadpool_limits(limits=2, user_api="blas"):  # a pool of more than one thread to begin with
        before = numpy_blas()
        pending = PendingSelection(numbers={}, prepared_seconds=0.0)
        worker.submit(pending, select)
        worker.finish(pending)
        after = numpy_blas()
        worker.submit(PendingSelection(numbers={}, prepared_seconds=0.0), select)  # dropped: never handed over
        worker.close()
        closed = numpy_blas()
    assert before == after == closed == [2] and seen == [[1], [1]]
    assert torch.equal(pending.selection.indices, torch.arange(3))
