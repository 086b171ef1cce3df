"""Probes (optimizer steps on a snapshot, restored exactly), the reference set and quality scores: the callback's
inputs for GRIP, Group-MATES and GIP."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from grace_lightning import CoresetCallback, CoresetSampler, Selection, SelectionInput, Strategy
from grace_lightning.probes import ModelSnapshot, ProbeRequest, ProbeRunner, ProbeTask
from grace_lightning.signals import SignalExtractor
from grace_lightning.strategies.base import uniform_sample
from tests.harness import fit, load_records, load_weights
from tests.toy import IndexedBlobs, TinyClassifier


class _DropoutNet(nn.Module):
    """Dropout and BatchNorm: probes must restore buffers and leave the global RNG where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _runner_setup():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = TensorDataset(x, y)
    torch.manual_seed(1)
    model = _DropoutNet()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for s in range(3):  # real steps first, so the optimizer has state and the parameters have gradients
        opt.zero_grad()
        F.cross_entropy(model(x[s * 16 : (s + 1) * 16]), y[s * 16 : (s + 1) * 16]).backward()
        opt.step()
    extractor = SignalExtractor.for_module(model, (x[:4], y[:4]))
    runner = ProbeRunner(model, [opt], extractor.example_losses, extractor.head, data, None, lambda b: b, eval_batch_size=16)
    return model, opt, runner


@pytest.mark.parametrize("trainable,reset_head", [("all", False), ("head", False), ("head", True)])
def test_probe_runner_restores_model_optimizer_grads_and_rng_exactly(trainable, reset_head):
    model, opt, runner = _runner_setup()
    before = _state(model, opt)
    tasks = (
        ProbeTask(steps=(torch.tensor([3, 8]), torch.tensor([9, 1]), torch.tensor([4, 2])), eval_indices=torch.arange(32, 48), eval_every_step=True),
        ProbeTask(steps=(torch.arange(0, 16),) * 5, eval_indices=torch.arange(0, 16)),
    )
    losses = runner.run(ProbeRequest(tasks, trainable=trainable, reset_head=reset_head, seed=3), task_ids=[0, 1])
    _assert_same(_state(model, opt), before)
    assert [t.shape[0] for t in losses] == [4, 2] and all(t.dtype == torch.float64 for t in losses)
    assert losses[1][1] < losses[1][0]  # five steps on the evaluated examples lower their loss
    if reset_head:  # a re-initialised head starts near chance: log(3)
        assert abs(float(losses[1][0]) - float(torch.log(torch.tensor(3.0)))) < 0.5
    # the same tasks again give the same numbers: every task starts from the same snapshot
    again = runner.run(ProbeRequest(tasks, trainable=trainable, reset_head=reset_head, seed=3), task_ids=[1, 0])
    assert torch.equal(again[0], losses[1]) and torch.equal(again[1], losses[0])


def test_head_only_probe_leaves_the_body_unchanged_during_the_task():
    model, opt, runner = _runner_setup()
    body_before = [p.clone() for p in model.body.parameters()]
    seen = {}

    def spy(batch):
        seen["body_equal"] = all(torch.equal(a, b) for a, b in zip(model.body.parameters(), body_before))
        seen.setdefault("head_moved", False)
        return runner_losses(batch)

    runner_losses = runner.example_losses
    runner.example_losses = spy
    runner.run(ProbeRequest((ProbeTask(steps=(torch.arange(16),) * 3, eval_indices=torch.arange(16)),), trainable="head"), [0])
    assert seen["body_equal"]  # checked at the last evaluation, after three head-only steps


def test_snapshot_restores_after_state_was_created_for_the_first_time():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    snap = ModelSnapshot(model, [opt])
    weight = model.weight.clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.state_dict()["state"]  # Adam created its moments
    snap.restore()
    assert torch.equal(model.weight, weight) and not opt.state_dict()["state"] and model.weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# inside a fit


class _ProbingUniform(Strategy):
    """Uniform subsets from the generator; with ``probe=True`` it first asks for probes (without touching the
    generator), so a run with probes and one without select the same subsets and must end identical."""

    name = "probing_uniform"
    needs = frozenset({"loss"})

    def __init__(self, probe: bool, trainable: str = "all", reference: str = "unused") -> None:
        self.probe, self.trainable = probe, trainable
        self.reference = reference
        self.results: list = []

    def to_score(self, inputs):
        return None

    def to_probe(self, inputs):
        if not self.probe:
            return None
        tasks = (
            ProbeTask(steps=(torch.tensor([5]), torch.tensor([17])), eval_indices=None if self.reference != "unused" else torch.arange(40), eval_every_step=True),
            ProbeTask(steps=(torch.arange(0, 40),) * 4, eval_indices=torch.arange(0, 40)),
            ProbeTask(steps=(torch.arange(100, 108),), eval_indices=torch.arange(200, 230)),
        )
        return ProbeRequest(tasks, trainable=self.trainable)

    def select(self, inputs):
        if inputs.probe is not None:
            self.results.append([t.clone() for t in inputs.probe.losses])
        return Selection(uniform_sample(inputs.pool_size, inputs.budget, inputs.generator))


def _fit(strategy, epochs=3, **kwargs):
    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=0.25, seed=7)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    model = TinyClassifier()
    callback = CoresetCallback(sampler, strategy=strategy, seed=11, **kwargs)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback],
    )
    trainer.fit(model, loader)
    return model, trainer, callback


@pytest.mark.parametrize("trainable", ["all", "head"])
def test_a_run_with_probes_ends_bit_identical_to_one_without(trainable):
    probing = _ProbingUniform(probe=True, trainable=trainable)
    with_probes, trainer_a, callback_a = _fit(probing)
    without, trainer_b, _ = _fit(_ProbingUniform(probe=False))
    assert with_probes.seen == without.seen  # same batches
    _assert_same(with_probes.state_dict(), without.state_dict())
    _assert_same(trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict())
    # the probes did run, at every informed refresh, and measured something real
    assert len(probing.results) == 2
    for losses in probing.results:
        assert [t.numel() for t in losses] == [3, 2, 2]
        assert all(bool(torch.isfinite(t).all()) for t in losses)
        assert losses[1][1] < losses[1][0]  # four steps on the evaluated examples lower their loss
    assert callback_a.history[-1]["probe_seconds"] > 0


def test_probes_under_two_ranks_are_sharded_gathered_and_leave_the_run_unchanged(tmp_path):
    fit(tmp_path, "probed", devices=2, strategy=_ProbingUniform(probe=True), max_epochs=3)
    fit(tmp_path, "plain", devices=2, strategy=_ProbingUniform(probe=False), max_epochs=3)
    probed, plain = load_records(tmp_path, "probed", 2), load_records(tmp_path, "plain", 2)
    assert probed[0]["batches"] == plain[0]["batches"] and probed[1]["batches"] == plain[1]["batches"]
    _assert_same(load_weights(tmp_path, "probed"), load_weights(tmp_path, "plain"))


class _ReferenceSpy(Strategy):
    """Scores the whole pool every refresh and records the reference signals it is given."""

    name = "reference_spy"
    needs = frozenset({"loss", "embedding"})
    reference = "optional"

    def __init__(self) -> None:
        self.seen: list = []

    def to_score(self, inputs):
        return torch.arange(inputs.pool_size)

    def to_probe(self, inputs):  # evaluated on the reference set (eval_indices=None)
        return ProbeRequest((ProbeTask(steps=(torch.tensor([1]),), eval_indices=None),))

    def select(self, inputs):
        self.seen.append((inputs.reference, inputs.store.loss.clone(), inputs.store.embedding.clone(), inputs.quality, inputs.probe))
        return Selection(uniform_sample(inputs.pool_size, inputs.budget, inputs.generator))


@pytest.mark.parametrize("as_loader", [False, True])
def test_reference_signals_are_the_live_models_in_the_stores_space(as_loader):
    dataset = IndexedBlobs(n=256)
    ids = [3, 50, 77, 120, 199, 250]
    reference = Subset(dataset, ids)
    if as_loader:
        reference = DataLoader(reference, batch_size=4)
    spy = _ReferenceSpy()
    quality = torch.linspace(0, 1, 256)
    _fit(spy, epochs=2, reference=reference, quality=quality)
    assert len(spy.seen) == 1
    ref, loss, embedding, q, probe = spy.seen[0]
    # the pool was scored in the same refresh: reference rows equal the store's rows of the same examples
    assert torch.allclose(ref.loss, loss[ids], atol=1e-6)
    assert torch.allclose(ref.embedding, embedding[ids].float(), atol=2e-3)  # the store keeps fp16
    assert torch.allclose(ref.embedding.norm(dim=1), torch.ones(len(ids)), atol=1e-5)
    assert torch.equal(q, quality)
    assert probe is not None and probe.losses[0].numel() == 2 and bool(torch.isfinite(probe.losses[0]).all())


class _NeedsReference(Strategy):
    name = "needs_reference"
    reference = "required"

    def select(self, inputs):  # pragma: no cover - never reached
        raise AssertionError


def test_missing_reference_and_bad_quality_fail_at_construction():
    sampler = CoresetSampler(IndexedBlobs(n=64), fraction=0.5)
    with pytest.raises(ValueError, match=r"CoresetCallback\(\.\.\., reference="):
        CoresetCallback(sampler, strategy=_NeedsReference())
    with pytest.raises(TypeError, match="`reference` must be a torch Dataset or DataLoader"):
        CoresetCallback(sampler, strategy="random", reference=[1, 2, 3])
    with pytest.raises(ValueError, match=r"`quality` must have one score per pool example, shape \(64,\)"):
        CoresetCallback(sampler, strategy="random", quality=torch.ones(63))
    with pytest.raises(ValueError, match="`quality` contains NaN"):
        CoresetCallback(sampler, strategy="random", quality=torch.full((64,), float("nan")))
    CoresetCallback(sampler, strategy=_NeedsReference(), reference=IndexedBlobs(n=8))  # given: fine
