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

from grace_lightning import CoresetCallback, CoresetSampler, Selection, Strategy
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


class _PlainNet(nn.Module):
    """No dropout, no BatchNorm: the body gives the same features in train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _runner_setup(net=_DropoutNet):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = TensorDataset(x, y)
    torch.manual_seed(1)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for s in range(3):  # real steps first, so the optimizer has state and the parameters have gradients
        opt.zero_grad()
        F.cross_entropy(model(x[s * 16 : (s + 1) * 16]), y[s * 16 : (s + 1) * 16]).backward()
        opt.step()
    extractor = SignalExtractor.for_module(model, (x[:4], y[:4]))
    runner = ProbeRunner(
        model, [opt], extractor.example_losses, extractor.head, data, None, lambda b: b, eval_batch_size=16,
        head_inputs=extractor.head_inputs, head_losses=extractor.head_losses,
    )
    return model, opt, runner


_TASKS = (
    ProbeTask(steps=(torch.tensor([3, 8]), torch.tensor([9, 1]), torch.tensor([4, 2])), eval_indices=torch.arange(32, 48), eval_every_step=True),
    ProbeTask(steps=(torch.arange(0, 16),) * 5, eval_indices=torch.arange(0, 16)),
)


@pytest.mark.parametrize(
    "trainable,reset_head,features",
    [("all", False, "frozen"), ("head", False, "frozen"), ("head", True, "frozen"), ("head", False, "live"), ("head", True, "live")],
)
def test_probe_runner_restores_model_optimizer_grads_and_rng_exactly(trainable, reset_head, features):
    model, opt, runner = _runner_setup()
    before = _state(model, opt)
    tasks = _TASKS
    request = ProbeRequest(tasks, trainable=trainable, reset_head=reset_head, seed=3, head_features=features)
    losses = runner.run(request, task_ids=[0, 1])
    _assert_same(_state(model, opt), before)
    assert [t.shape[0] for t in losses] == [4, 2] and all(t.dtype == torch.float64 for t in losses)
    assert losses[1][1] < losses[1][0]  # five steps on the evaluated examples lower their loss
    if reset_head:  # a re-initialised head starts near chance: log(3)
        assert abs(float(losses[1][0]) - float(torch.log(torch.tensor(3.0)))) < 0.5
    # the same tasks again give the same numbers: every task starts from the same snapshot
    again = runner.run(request, task_ids=[1, 0])
    assert torch.equal(again[0], losses[1]) and torch.equal(again[1], losses[0])


@pytest.mark.parametrize("features", ["frozen", "live"])
def test_head_only_probe_leaves_the_body_unchanged_during_the_task(features):
    model, opt, runner = _runner_setup()
    body_before = [p.clone() for p in model.body.parameters()]
    head_before = [p.clone() for p in model.head.parameters()]
    seen = {}
    spied = "head_losses" if features == "frozen" else "example_losses"
    original = getattr(runner, spied)

    def spy(*args):
        seen["body_equal"] = all(torch.equal(a, b) for a, b in zip(model.body.parameters(), body_before))
        seen["head_moved"] = not all(torch.equal(a, b) for a, b in zip(model.head.parameters(), head_before))
        return original(*args)

    setattr(runner, spied, spy)
    task = ProbeTask(steps=(torch.arange(16),) * 3, eval_indices=torch.arange(16))
    runner.run(ProbeRequest((task,), trainable="head", head_features=features), [0])
    # checked at the last evaluation, after three head-only steps
    assert seen["body_equal"] and seen["head_moved"]


def test_frozen_head_probes_equal_live_ones_on_a_body_without_dropout_or_batchnorm():
    tasks = (
        *_TASKS,
        ProbeTask(steps=(torch.arange(20, 30),) * 4, eval_indices=torch.arange(40, 64)),
        ProbeTask(steps=(torch.arange(5),), eval_indices=torch.zeros(0, dtype=torch.int64)),  # nothing to evaluate
    )
    results = {}
    for features in ("frozen", "live"):
        _, _, runner = _runner_setup(_PlainNet)
        request = ProbeRequest(tasks, trainable="head", reset_head=True, seed=5, head_features=features)
        results[features] = runner.run(request, [0, 1, 2, 3])
    assert results["frozen"][3].tolist() == [0.0, 0.0]
    for frozen, live in zip(results["frozen"], results["live"]):
        assert torch.allclose(frozen, live, rtol=1e-5, atol=1e-6)


def test_frozen_head_probes_run_the_body_once_per_example_and_start_from_the_live_loss():
    model, _, runner = _runner_setup()  # dropout and BatchNorm: train-mode steps differ, eval losses do not
    calls = []
    model.body.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    # GRIP's shape: one slice for every step, a held-out slice; two tasks share some examples
    tasks = tuple(
        ProbeTask(steps=(torch.arange(a, a + 3),) * 10, eval_indices=torch.arange(a + 3, a + 6)) for a in (0, 3, 30, 40, 50)
    )
    frozen = runner.run(ProbeRequest(tasks, trainable="head", head_features="frozen"), range(5))
    # a group closes at 16 distinct examples (eval_batch_size): tasks 0-3 hold 21 (tasks 0 and 1 share 3), in
    # batches of 16 and 5; task 4 holds 6
    assert calls == [16, 5, 6]
    calls.clear()
    live = runner.run(ProbeRequest(tasks, trainable="head", head_features="live"), range(5))
    assert len(calls) == 5 * (10 + 2)  # ten steps and two evaluations a task
    for f, lv in zip(frozen, live):
        assert torch.allclose(f[0], lv[0], rtol=1e-6)  # the loss before any step: the same eval-mode forward
        assert f[1] != f[0]  # the head did train


def test_frozen_head_probes_on_a_causal_lm_repad_sequences_from_different_batches():
    """Sequences of different lengths meet in one probe step after the body ran them in different batches."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,  # an untied head: a head-only live step leaves the body as is
    )
    lm = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 40, (int(n),), generator=g) for n in torch.randint(3, 12, (24,), generator=g)]

    def collate(items):
        length = max(x.numel() for x in items)
        ids = torch.stack([F.pad(x, (0, length - x.numel())) for x in items])
        mask = torch.stack([F.pad(torch.ones_like(x), (0, length - x.numel())) for x in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    extractor = SignalExtractor.for_module(lm, collate(data[:4]))
    assert extractor.mode == "causal_lm"
    results = {}
    for features in ("frozen", "live"):
        model = copy.deepcopy(lm)
        head = model.get_output_embeddings()
        ex = SignalExtractor(model, "causal_lm", head=head, hf_model=model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        runner = ProbeRunner(
            model, [opt], ex.example_losses, head, data, collate, lambda b: b, eval_batch_size=5,
            head_inputs=ex.head_inputs, head_losses=ex.head_losses,
        )
        tasks = (
            ProbeTask(steps=(torch.tensor([0, 7, 13]),) * 3, eval_indices=torch.tensor([2, 9, 20])),
            ProbeTask(steps=(torch.tensor([21, 4]), torch.tensor([16, 1, 11])), eval_indices=torch.arange(5, 12), eval_every_step=True),
        )
        results[features] = runner.run(ProbeRequest(tasks, trainable="head", head_features=features), [0, 1])
    for frozen, live in zip(results["frozen"], results["live"]):
        assert torch.allclose(frozen, live, rtol=1e-5, atol=1e-6)
        assert bool((frozen[1:] != frozen[0]).all())  # the head did train


@pytest.mark.parametrize("reset_head", [False, True])
def test_tasks_evaluated_on_the_same_examples_measure_their_shared_first_loss_once(reset_head):
    model, _, runner = _runner_setup()
    calls = []
    model.body.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    tasks = tuple(  # Group-MATES' shape (its steps have one example; BatchNorm here needs two), the loss after each
        ProbeTask(steps=(torch.tensor([a, a + 1]), torch.tensor([a + 2, a + 3])), eval_indices=torch.arange(40, 52), eval_every_step=True)
        for a in (0, 10, 20)
    )
    request = ProbeRequest(tasks, trainable="all", reset_head=reset_head, seed=2)
    alone = [runner.run(request, [i])[0] for i in range(3)]
    assert len(calls) == 3 * 5  # a task alone: the first loss, two steps, two losses
    calls.clear()
    together = runner.run(request, [0, 1, 2])
    # the first loss once for the three (a re-initialised head makes each task's first loss its own)
    assert len(calls) == (15 if reset_head else 13)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert len({float(t[0]) for t in together}) == (3 if reset_head else 1)


def test_frozen_head_probes_need_the_split_losses_and_a_known_feature_mode():
    model, opt, runner = _runner_setup()
    runner.head_inputs = None
    task = ProbeTask(steps=(torch.arange(4),), eval_indices=torch.arange(4, 8))
    with pytest.raises(ValueError, match="head_inputs"):
        runner.run(ProbeRequest((task,), trainable="head"), [0])
    with pytest.raises(ValueError, match="`head_features` must be 'frozen' or 'live'"):
        ProbeRequest((task,), trainable="head", head_features="cached")


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

    def __init__(self, probe: bool, trainable: str = "all", reference: str = "unused", features: str = "frozen") -> None:
        self.probe, self.trainable, self.features = probe, trainable, features
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
        return ProbeRequest(tasks, trainable=self.trainable, head_features=self.features)

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


@pytest.mark.parametrize("trainable,features", [("all", "frozen"), ("head", "frozen"), ("head", "live")])
def test_a_run_with_probes_ends_bit_identical_to_one_without(trainable, features):
    probing = _ProbingUniform(probe=True, trainable=trainable, features=features)
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


def test_live_probes_move_every_batch_to_the_device_before_the_first_step():
    """Live tasks (Group-MATES' trajectories) move every step's and evaluation's batch before the first optimizer
    step, so no step waits on a copy, and release them with the run."""
    model, opt, runner = _runner_setup(_PlainNet)
    events: list[str] = []
    runner.to_device = lambda batch: events.append("copy") or batch
    runner.reference = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    step = opt.step
    opt.step = lambda *a, **k: events.append("step") or step(*a, **k)
    tasks = _TASKS + (ProbeTask(steps=(torch.tensor([5]), torch.tensor([6])), eval_indices=None, eval_every_step=True),)
    losses = runner.run(ProbeRequest(tasks=tasks, trainable="all"), range(len(tasks)))
    first_step = events.index("step")
    assert "copy" in events[:first_step] and "copy" not in events[first_step:]
    assert [len(x) for x in losses] == [4, 2, 3] and all(x.dtype == torch.float64 for x in losses)
    assert runner._on_device == {}  # released with the run
