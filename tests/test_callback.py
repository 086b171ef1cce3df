"""The callback end to end: telemetry, signal capture for classification, causal LMs and custom modules, scoring hygiene."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from grace_lightning import CoresetCallback, CoresetSampler, SignalCaptureError
from grace_lightning.signals import classification_signals
from tests.harness import TopLoss
from tests.toy import quiet_trainer as _trainer, IndexedBlobs, TinyClassifier


def test_telemetry_reaches_the_users_logger(tmp_path):
    data = IndexedBlobs(n=128)
    sampler = CoresetSampler(data, fraction=0.5)
    callback = CoresetCallback(sampler, strategy=TopLoss())
    trainer = _trainer(max_epochs=3, logger=CSVLogger(tmp_path, name="run"), callbacks=[callback])
    trainer.fit(TinyClassifier(), DataLoader(data, batch_size=16, sampler=sampler))
    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("coreset/selection_seconds")]
    assert len(logged) == len(callback.history) == 3  # initial selection + after epochs 0 and 1
    for key in ("selection_seconds", "selection_share", "subset_size", "overlap", "scored", "invalid_signals"):
        assert f"coreset/{key}" in rows[0]
    assert [float(r["coreset/subset_size"]) for r in logged] == [64.0] * 3
    assert float(logged[-1]["coreset/scored"]) == 64  # TopLoss rescored the stalest half of the pool
    assert 0.0 <= float(logged[-1]["coreset/overlap"]) <= 1.0
    assert callback.history[-1]["selection_seconds_total"] >= callback.history[-1]["selection_seconds"] > 0


def test_the_store_keeps_only_the_signals_the_strategy_reads_and_selects_the_same():
    """TopLoss reads losses: the embeddings, EL2N and labels that capture and scoring measure are not kept, and
    its losses and last subset equal those of a run whose strategy also asks for them (and reads the same)."""

    def fit(strategy):
        data = IndexedBlobs(n=128)
        sampler = CoresetSampler(data, fraction=0.5)
        callback = CoresetCallback(sampler, strategy=strategy, seed=3)
        _trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(data, batch_size=16, sampler=sampler))
        return callback

    class _TopLossReadingEverything(TopLoss):
        needs = frozenset({"loss", "embedding", "error_norm", "label"})

    lean, full = fit(TopLoss()), fit(_TopLossReadingEverything())
    assert lean.store.embedding is None and lean.store.error_norm is None and lean.store.label is None
    assert full.store.embedding is not None and full.store.error_norm is not None and full.store.label is not None
    assert bool(lean.store.measured.all()) and torch.equal(lean.store.last_step, full.store.last_step)
    assert torch.equal(lean.store.loss, full.store.loss)
    assert torch.equal(lean.sampler.selection, full.sampler.selection)


class _TokenSequences(Dataset):
    def __init__(self, n=48, length=12, vocab=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.pad = torch.randint(0, length // 2, (n,), generator=g)  # trailing padding per sequence

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = torch.ones_like(self.ids[i])
        if self.pad[i]:
            mask[-int(self.pad[i]) :] = 0
        labels = self.ids[i].masked_fill(mask == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels}


class _TinyGPT(L.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))

    def training_step(self, batch, batch_idx):
        return self.lm(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _TopLossKeepingEmbeddings(TopLoss):
    needs = frozenset({"loss", "embedding"})  # the store keeps only what a strategy reads


def test_causal_lm_signals_flow_with_no_change_to_the_module():
    pytest.importorskip("transformers")
    data = _TokenSequences()
    sampler = CoresetSampler(data, fraction=0.5)
    callback = CoresetCallback(sampler, strategy=_TopLossKeepingEmbeddings())
    _trainer(max_epochs=2, callbacks=[callback]).fit(_TinyGPT(), DataLoader(data, batch_size=8, sampler=sampler))
    store = callback.store
    assert bool(store.measured.all())
    supervised = torch.tensor([12 - int(p) - 1 for p in data.pad])  # shifted labels: one fewer target
    assert torch.equal(store.length.long(), supervised)
    assert store.embedding is not None and store.embedding.shape == (48, 16)
    assert bool((store.grad_norm > 0).all())


class _DictBatchModule(TinyClassifier):
    """Dict batches the automatic capture cannot read; `coreset_signals` says how."""

    def training_step(self, batch, batch_idx):
        self.training_steps = getattr(self, "training_steps", 0) + 1
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def coreset_signals(self, batch):
        h = self.body(batch["x"])
        return classification_signals(self.head(h), h, batch["y"], has_bias=True)


class _DictBlobs(IndexedBlobs):
    def __getitem__(self, i):
        x, y, _ = super().__getitem__(i)
        return {"x": x, "y": y}


def test_custom_coreset_signals_are_used_when_defined():
    data = _DictBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    callback = CoresetCallback(sampler, strategy=TopLoss())
    _trainer(callbacks=[callback]).fit(_DictBatchModule(), DataLoader(data, batch_size=8, sampler=sampler))
    assert int(callback.store.measured.sum()) == 32  # only the scoring pass measures: no free capture


def test_uncapturable_module_fails_before_training_with_the_method_to_write():
    class NoHint(_DictBatchModule):
        coreset_signals = None  # hide the method

    data = _DictBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    model = NoHint()
    with pytest.raises(SignalCaptureError, match="coreset_signals"):
        _trainer(callbacks=[CoresetCallback(sampler, strategy=TopLoss())]).fit(
            model, DataLoader(data, batch_size=8, sampler=sampler)
        )
    assert getattr(model, "training_steps", 0) == 0


class _WithBatchNorm(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.frozen = nn.Linear(2, 2)  # deliberately kept in eval mode by the user

    def on_train_epoch_start(self):
        self.frozen.eval()


class _ModeProbe(Callback):
    """Runs after CoresetCallback in each hook: sees the modes and BatchNorm statistics the refresh left."""

    def __init__(self):
        self.after_refresh = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = pl_module.body[1].running_mean.clone(), pl_module.body[1].num_batches_tracked.clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_last_batch:
            bn = pl_module.body[1]
            self.after_refresh.append(
                (pl_module.training, bn.training, pl_module.frozen.training, bn.num_batches_tracked.item())
            )


def test_scoring_pass_restores_modes_and_leaves_batchnorm_statistics_alone():
    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    probe = _ModeProbe()
    callback = CoresetCallback(sampler, strategy=TopLoss())
    _trainer(max_epochs=3, callbacks=[callback, probe]).fit(_WithBatchNorm(), DataLoader(data, batch_size=8, sampler=sampler))
    # 4 training batches per epoch update BatchNorm; the scoring passes (32 examples each) must not.
    assert [a[3] for a in probe.after_refresh] == [4, 8, 12]
    assert all(a[:3] == (True, True, False) for a in probe.after_refresh)
    assert callback.history[-1]["scored"] == 32


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_scoring_pass_shows_a_nested_progress_bar(capsys, bar):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.5)
    progress = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    tasks = []
    if bar == "rich":  # rich renders live to a terminal; record the task it is asked to add instead
        original = progress._init_progress

        def spy(trainer):
            original(trainer)
            add = progress.progress.add_task
            progress.progress.add_task = lambda description, **kw: tasks.append(description) or add(description, **kw)

        progress._init_progress = spy
    trainer = _trainer(enable_progress_bar=True, callbacks=[CoresetCallback(sampler, strategy=TopLoss()), progress])
    trainer.fit(TinyClassifier(), DataLoader(data, batch_size=8, sampler=sampler))
    if bar == "tqdm":
        assert "Coreset scoring" in capsys.readouterr().out
    else:
        assert "Coreset scoring" in tasks


@pytest.mark.parametrize("given, expected", [(None, 16), (5, 5)], ids=["default-twice-training", "given"])
def test_scoring_pass_batches_at_twice_the_training_batch_unless_told(monkeypatch, given, expected):
    """The scoring pass holds no activations for a backward pass: by default it batches twice the training batch."""
    from grace_lightning.signals.capture import SignalExtractor

    seen: list[int] = []
    score_batch = SignalExtractor.score_batch
    monkeypatch.setattr(SignalExtractor, "score_batch", lambda self, batch: seen.append(len(batch[0])) or score_batch(self, batch))
    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    callback = CoresetCallback(sampler, strategy=TopLoss(), seed=11, scoring_batch_size=given)
    _trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler))
    assert seen and max(seen) == expected  # the last batch of a pass may be smaller
    assert all(size <= expected for size in seen)


def test_an_accelerator_at_the_default_scoring_batch_gets_one_hint_naming_the_setting():
    """On a GPU the default scoring batch (twice the training batch) leaves a small model's passes launch-bound: the
    first pass says so once, naming `scoring_batch_size`; nothing is said on the CPU or when the size was given."""
    from grace_lightning.scoring import Measurements

    default = Measurements(None, None, 0)
    hint = default.scoring_batch_hint(torch.device("cuda", 0), 64)
    assert hint is not None and "scoring_batch_size" in hint and "batch 64" in hint
    assert default.scoring_batch_hint(torch.device("cpu"), 64) is None
    assert Measurements(None, 1024, 0).scoring_batch_hint(torch.device("cuda", 0), 1024) is None


def test_a_cpu_fit_at_the_default_scoring_batch_logs_no_hint(caplog):
    import logging

    dataset = IndexedBlobs(n=128)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    callback = CoresetCallback(sampler, strategy=TopLoss(), seed=11)
    with caplog.at_level(logging.INFO):
        _trainer(max_epochs=2, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler))
    assert callback.history and "scoring_batch_size" not in caplog.text
    assert callback._measure.batch_hint_given is False


@pytest.mark.parametrize("capture", [True, False], ids=["capture", "no-capture"])
def test_each_refresh_records_what_the_free_capture_cost_outside_selection(capture):
    """``capture_seconds``: the training-thread seconds the free capture took since the previous refresh, in every
    refresh's record while it is on (and in none while it is off); it is not part of ``selection_seconds``."""
    from grace_lightning.bench.runner import phase_seconds

    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    callback = CoresetCallback(sampler, strategy=TopLoss(), seed=11, capture_training_signals=capture)
    _trainer(max_epochs=4, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler))
    records = callback.history[1:]  # the first selection comes before any training batch
    assert len(records) == 3
    if capture:
        assert all(r["capture_seconds"] > 0.0 for r in records)
        assert "capture_gpu_seconds" not in records[0]  # device time only on a GPU
        phases = ("scoring_seconds", "probe_seconds", "strategy_seconds")
        assert all(r["selection_seconds"] >= sum(r[p] for p in phases) - 1e-9 for r in records)
        assert phase_seconds(records)["capture_seconds"] == pytest.approx(sum(r["capture_seconds"] for r in records))
    else:
        assert all("capture_seconds" not in r for r in records)


def test_a_fit_ends_with_one_line_on_what_selection_cost_against_its_wall_clock(caplog):
    """The numbers a comparison with random needs, without a logger: refreshes, selection seconds and their share of
    the fit's wall clock, by phase, and the capture's seconds inside the steps; they add up to ``history``'s."""
    import logging
    import re

    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    callback = CoresetCallback(sampler, strategy="grace", seed=11)
    with caplog.at_level(logging.INFO):
        _trainer(max_epochs=3, callbacks=[callback]).fit(TinyClassifier(), DataLoader(dataset, batch_size=8, sampler=sampler))
    lines = [m for m in caplog.messages if m.startswith("CoresetCallback:") and "of selection" in m]
    assert len(lines) == 1, lines
    found = re.fullmatch(
        r"CoresetCallback: (\d+) refreshes took ([\d.]+) s of selection, ([\d.]+)% of this fit's ([\d.]+) s wall clock "
        r"\(scoring ([\d.]+) s, strategy ([\d.]+) s\); capturing the trained batches' signals took ([\d.]+) s more, "
        r"inside the steps\.",
        lines[0],
    )
    assert found, lines[0]
    history = callback.history
    assert int(found[1]) == len(history) == 3
    assert float(found[2]) == pytest.approx(sum(r["selection_seconds"] for r in history), abs=0.006)
    assert float(found[5]) == pytest.approx(sum(r["scoring_seconds"] for r in history), abs=0.006)
    assert 0 < float(found[3]) < 100 and float(found[4]) > 0
    assert float(found[7]) == pytest.approx(sum(r.get("capture_seconds", 0.0) for r in history), abs=0.006)


def test_the_logged_overlap_is_the_share_of_the_subset_kept_from_the_previous_one():
    from grace_lightning.callback import _overlap

    g = torch.Generator().manual_seed(0)
    for size in (0, 1, 50, 400):
        current, previous = torch.randperm(1000, generator=g)[:size], torch.randperm(1000, generator=g)[:300]
        expected = torch.isin(current, previous).float().mean()
        assert _overlap(current, previous, 1000) == pytest.approx(float(expected), nan_ok=True)
    assert _overlap(torch.tensor([3, 4]), torch.tensor([4, 9]), 10) == 0.5
