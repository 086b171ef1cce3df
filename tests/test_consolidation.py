"""What the consolidation of the callback and the signals promises: one signal table, strategy-owned cold start,
diagnostics that cannot overwrite the refresh's own numbers, and a callback that stands aside under fast_dev_run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, ExampleSignals, Selection, SelectionInput, SignalStore, Strategy
from grace_lightning.signals.types import SIGNALS, signal_names
from tests.harness import TopLoss
from tests.toy import IndexedBlobs, TinyClassifier, quiet_trainer


def _full_signals(n: int, d: int = 4) -> ExampleSignals:
    values = {}
    for spec in SIGNALS:
        shape = (n, d) if spec.per_row else (n,)
        values[spec.name] = (torch.arange(n * (d if spec.per_row else 1)).reshape(shape) + 2).to(spec.dtype)
    return ExampleSignals(**values)


def test_every_declared_signal_has_a_store_array_a_checkpoint_entry_and_a_gather_row():
    store = SignalStore(10, max_embedding_dim=None)
    signals = _full_signals(3)
    store.update(torch.tensor([1, 4, 7]), signals, step=5)
    state = store.state_dict()
    rows = signals.as_rows()
    for spec in SIGNALS:
        column = getattr(store, spec.name)
        assert column is not None and column.dtype == getattr(torch, np.dtype(spec.store_dtype).name), spec.name
        assert state[spec.name] is column, spec.name
        assert rows[spec.name] is getattr(signals, spec.name), spec.name
        untouched = column[0]
        assert bool((untouched == spec.fill).all()), f"{spec.name}: unmeasured rows keep the declared fill"
    restored = SignalStore(10, max_embedding_dim=None)
    restored.load_state_dict(state)
    for spec in SIGNALS:
        assert torch.equal(getattr(restored, spec.name), getattr(store, spec.name)), spec.name
    back = ExampleSignals.from_rows(rows)
    for spec in SIGNALS:
        assert torch.equal(getattr(back, spec.name), getattr(signals, spec.name)), spec.name


def test_concatenated_signals_keep_every_field_and_drop_one_a_part_lacks():
    a, b = _full_signals(2), _full_signals(3)
    both = ExampleSignals.cat([a, b])
    assert len(both) == 5 and both.embedding.shape == (5, 4)
    b.error_norm = None
    assert ExampleSignals.cat([a, b]).error_norm is None
    empty = ExampleSignals.cat([])
    assert len(empty) == 0 and empty.length.dtype == torch.int64 and empty.embedding is None


def test_a_strategy_that_needs_an_undeclared_signal_fails_when_defined():
    assert {"loss", "grad_norm", "embedding", "length", "error_norm"} <= signal_names()
    with pytest.raises(TypeError, match="not signals.*declared on grace_lightning.ExampleSignals"):

        class _Bogus(Strategy):  # noqa: F841
            needs = frozenset({"loss", "gradient_norm"})


class _ClashingDiagnostics(TopLoss):
    """Reports a phase under the name of one of the refresh's own numbers."""

    def select(self, inputs: SelectionInput) -> Selection:
        chosen = super().select(inputs)
        return Selection(chosen.indices, chosen.weights, diagnostics={"selection_seconds": 1234.5, "my_phase": 1.0})


def test_a_strategy_diagnostic_cannot_overwrite_the_refresh_seconds():
    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    callback = CoresetCallback(sampler, strategy=_ClashingDiagnostics())
    quiet_trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(data, batch_size=8, sampler=sampler))
    informed = [r for r in callback.history if "strategy/selection_seconds" in r]
    assert informed, "the strategy's select ran after the cold start"
    for record in informed:
        assert record["strategy/selection_seconds"] == 1234.5
        assert record["selection_seconds"] < 1000, "the refresh's own time, not the strategy's diagnostic"
        assert record["my_phase"] == 1.0


def test_the_cold_start_is_the_strategys_answer():
    class _Cold(TopLoss):
        def cold_start(self, inputs: SelectionInput) -> Selection:
            return Selection(torch.arange(inputs.budget, dtype=torch.int64))

    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.25)
    callback = CoresetCallback(sampler, strategy=_Cold())
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(TinyClassifier(), DataLoader(data, batch_size=8, sampler=sampler))
    assert sampler.state_dict()["versions"][0]["indices"].tolist() == list(range(16))


@pytest.mark.parametrize("form", ["explicit", "one_line"])
def test_fast_dev_run_is_left_alone_and_says_so(form, caplog):
    data = IndexedBlobs(n=64)
    if form == "explicit":
        sampler = CoresetSampler(data, fraction=0.25)
        loader, callback = DataLoader(data, batch_size=8, sampler=sampler), CoresetCallback(sampler, strategy="grace")
    else:
        loader, callback = DataLoader(data, batch_size=8, shuffle=True), CoresetCallback(fraction=0.25)
    model = TinyClassifier()
    with caplog.at_level(logging.INFO):
        quiet_trainer(fast_dev_run=2, callbacks=[callback]).fit(model, loader)  # failed on limit_train_batches before
    assert "fast_dev_run=2" in caplog.text and "stands aside" in caplog.text
    assert callback.history == [], "no refresh under fast_dev_run"
    assert len(model.seen) == 2 and all(len(b) == 8 for b in model.seen)


def test_the_scoring_signal_and_the_probe_loss_are_one_definition():
    from grace_lightning.signals import SignalExtractor
    from grace_lightning.signals.capture import inference_forward

    data = IndexedBlobs(n=16)
    batch = next(iter(DataLoader(data, batch_size=16)))
    model = TinyClassifier(dropout=0.2)
    extractor = SignalExtractor.for_module(model, batch)
    with inference_forward(model):
        scored = extractor.score_batch(batch).loss
        probed = extractor.example_losses(batch)
    assert torch.equal(scored, probed)
    assert model.training, "the forward context put the module's mode back"
