"""Reproducibility, no global side effects, the refresh calendar, exact step counts, and weights reaching the loss."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Subset

from grace_lightning import (
    CoresetCallback,
    CoresetSampler,
    Selection,
    SelectionInput,
    Strategy,
    batch_weights,
    build_strategy,
)
from grace_lightning.sampler import LoaderPosition
from grace_lightning.schedule import Action, RefreshSchedule
from grace_lightning.strategies.base import uniform_sample
from tests.toy import quiet_trainer as trainer, IndexedBlobs, TinyClassifier

REPO = Path(__file__).resolve().parents[1]


def coreset_fit(seed: int = 3, strategy="random", epochs: int = 3, model=None, bs: int = 4, extra_callbacks=(), **cb_kwargs):
    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.25, seed=0)
    callback = CoresetCallback(sampler, strategy=strategy, seed=seed, **cb_kwargs)
    model = model if model is not None else TinyClassifier()
    t = trainer(max_epochs=epochs, callbacks=[callback, *extra_callbacks])
    t.fit(model, DataLoader(data, batch_size=bs, sampler=sampler))
    return model, callback, t


# ---------------------------------------------------------------------- same seed, same run


def test_same_callback_seed_gives_identical_index_streams_and_weights():
    m1, c1, _ = coreset_fit(seed=3)
    m2, c2, _ = coreset_fit(seed=3)
    assert len(m1.seen) == 3 * 4
    assert m1.seen == m2.seen
    assert torch.equal(c1.sampler.selection, c2.sampler.selection)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_different_callback_seed_gives_a_different_selection():
    m1, c1, _ = coreset_fit(seed=3)
    m2, c2, _ = coreset_fit(seed=4)
    assert set(c1.sampler.selection.tolist()) != set(c2.sampler.selection.tolist())
    assert set(sum(m1.seen[:4], [])) != set(sum(m2.seen[:4], []))  # the first epoch's subset already differs
    assert m1.seen != m2.seen


# ---------------------------------------------------------------------- the global RNGs


def rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def set_rng_states(states) -> None:
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def assert_same_rng_states(a, b) -> None:
    assert torch.equal(a[0], b[0]), "torch global RNG moved"
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:], "numpy global RNG moved"
    assert a[2] == b[2], "python `random` moved"


def test_sampler_callback_and_strategy_leave_the_global_rngs_untouched():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = rng_states()
    data = IndexedBlobs(n=64)
    sampler = CoresetSampler(data, fraction=0.25, seed=5)
    callback = CoresetCallback(sampler, strategy="random", seed=5, warmup_epochs=1)
    nb = sampler.batches_per_epoch(4)
    for epoch in range(3):
        sampler.bind(0, 1, lambda: LoaderPosition(epoch * nb, 4, False))
        list(sampler)
        sampler.batch_indices(epoch * nb + 1, 4)
    selection = build_strategy("random").select(
        SelectionInput(pool_size=64, budget=16, store=None, generator=torch.Generator().manual_seed(0))
    )
    sampler.set_selection(selection.indices, start_batch=nb)
    list(sampler)
    callback.strategy.select(SelectionInput(pool_size=64, budget=16, store=None, generator=torch.Generator()))
    sampler.load_state_dict(sampler.state_dict())
    assert_same_rng_states(before, rng_states())


def test_a_coreset_fit_draws_nothing_from_the_global_rngs_beyond_a_plain_fit():
    data = IndexedBlobs(n=64)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    start = rng_states()

    plain = TinyClassifier()
    trainer(max_epochs=3).fit(plain, DataLoader(Subset(data, range(16)), batch_size=4, shuffle=False))
    after_plain = rng_states()

    set_rng_states(start)
    model = TinyClassifier()
    sampler = CoresetSampler(data, fraction=0.25, seed=5)
    callback = CoresetCallback(sampler, strategy="random", seed=5, warmup_epochs=1)  # full pool, then selections
    trainer(max_epochs=3, callbacks=[callback]).fit(model, DataLoader(data, batch_size=4, sampler=sampler))
    after_coreset = rng_states()

    assert len(model.seen) == len(plain.seen) == 12
    assert callback._refreshes == 2  # selections did run (at the ends of epochs 0 and 1)
    assert_same_rng_states(after_plain, after_coreset)


# ---------------------------------------------------------------------- nothing patched


PATCH_PROBE = textwrap.dedent(
    """
    import inspect, json, sys
    import torch
    import torch.utils.data as tud
    import torch.utils.data.dataloader as tudl
    import lightning.pytorch as pl
    assert "grace_lightning" not in sys.modules

    def grab():
        out = {
            "DataLoader.__iter__": tud.DataLoader.__iter__,
            "DataLoader.__init__": tud.DataLoader.__init__,
            "DistributedSampler.__iter__": tud.DistributedSampler.__iter__,
            "lightning.pytorch.Trainer.fit": pl.Trainer.fit,
        }
        # Resolved attributes, not class dicts: Lightning's own `_replace_dunder_methods` leaves object's
        # `__setattr__`/`__delattr__` slot wrappers in DataLoader/BatchSampler dicts (same objects, resolved).
        for cls in (tud.DataLoader, tud.DistributedSampler, tud.Sampler, tud.BatchSampler, pl.Trainer,
                    tudl._SingleProcessDataLoaderIter, tudl._BaseDataLoaderIter):
            for name in dir(cls):
                out[f"{cls.__name__}.{name}"] = inspect.getattr_static(cls, name)
        for name in ("manual_seed", "randperm", "get_rng_state", "set_rng_state"):
            out[f"torch.{name}"] = getattr(torch, name)
        return out

    before = grab()
    import grace_lightning
    from tests.toy import IndexedBlobs, TinyClassifier
    data = IndexedBlobs(n=32)
    sampler = grace_lightning.CoresetSampler(data, fraction=0.25)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_epochs=2,
                         callbacks=[grace_lightning.CoresetCallback(sampler, strategy="random")])
    model = TinyClassifier()
    trainer.fit(model, tud.DataLoader(data, batch_size=4, sampler=sampler))
    assert len(model.seen) == 4
    after = grab()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) is not after.get(k))
    print("CHANGED=" + json.dumps(changed))
    """
)


def test_importing_and_fitting_patches_no_torch_or_lightning_function():
    proc = subprocess.run(
        [sys.executable, "-c", PATCH_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("CHANGED="))
    assert json.loads(line[len("CHANGED="):]) == []


# ---------------------------------------------------------------------- the refresh calendar


def test_epoch_schedule_warmup_1_every_2_anneal_1_over_6_epochs():
    schedule = RefreshSchedule(every_n_epochs=2, warmup_epochs=1, anneal_epochs=1, max_epochs=6)
    nb = 4
    assert schedule.initial_action() is Action.FULL_POOL
    at_epoch_end = [schedule.decide((e + 1) * nb, e, is_last_batch=True) for e in range(6)]
    assert at_epoch_end == [Action.SELECT, None, Action.SELECT, None, Action.FULL_POOL, None]
    mid_epoch = [schedule.decide(e * nb + b, e, is_last_batch=False) for e in range(6) for b in range(1, nb)]
    assert mid_epoch == [None] * len(mid_epoch)


def test_epoch_schedule_without_warmup_starts_with_a_selection_and_refreshes_every_epoch():
    schedule = RefreshSchedule(every_n_epochs=1, max_epochs=3)
    assert schedule.initial_action() is Action.SELECT
    assert [schedule.decide((e + 1) * 4, e, True) for e in range(3)] == [Action.SELECT, Action.SELECT, None]


def test_step_schedule_every_3_batches_with_4_batches_per_epoch():
    nb = 4

    def actions(schedule):
        return [schedule.decide(b, (b - 1) // nb, is_last_batch=b % nb == 0) for b in range(1, 3 * nb + 1)]

    S = Action.SELECT
    plain = RefreshSchedule(every_n_epochs=None, every_n_steps=3, max_epochs=3)
    assert plain.initial_action() is S
    #                        1     2     3  4     5     6  7     8     9  10    11    12 (end of training)
    assert actions(plain) == [None, None, S, None, None, S, None, None, S, None, None, None]

    warm = RefreshSchedule(every_n_epochs=None, every_n_steps=3, warmup_epochs=1, max_epochs=3)
    assert warm.initial_action() is Action.FULL_POOL
    # no step refresh during warm-up (batch 3); the warm-up ends with a selection (batch 4)
    assert actions(warm) == [None, None, None, S, None, S, None, None, S, None, None, None]


# ---------------------------------------------------------------------- exact step counts


class OneCycle(TinyClassifier):
    def configure_optimizers(self):
        self.planned_steps = self.trainer.estimated_stepping_batches
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=self.planned_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


class EpochRecorder(Callback):
    def __init__(self) -> None:
        self.num_training_batches: list[int] = []
        self.seen_at_start: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.num_training_batches.append(trainer.num_training_batches)
        self.seen_at_start.append(len(pl_module.seen))


def test_estimated_stepping_batches_is_exact_with_warmup_and_anneal():
    recorder = EpochRecorder()
    model, callback, t = coreset_fit(
        model=OneCycle(), bs=5, epochs=4, warmup_epochs=1, anneal_epochs=1, extra_callbacks=[recorder]
    )
    per_epoch = callback.sampler.batches_per_epoch(5)
    assert per_epoch == 4  # budget 16 at batch size 5: a ragged last batch
    assert recorder.num_training_batches == [per_epoch] * 4
    assert [b - a for a, b in zip(recorder.seen_at_start, recorder.seen_at_start[1:] + [len(model.seen)])] == [per_epoch] * 4
    assert model.planned_steps == t.global_step == len(model.seen) == 4 * per_epoch
    assert model.scheduler.last_epoch == model.planned_steps  # OneCycleLR stepped every step and did not overrun


# ---------------------------------------------------------------------- weights reach the loss


class HalfZero(Strategy):
    """A random subset of the budget; a random half of it weighted 0, the rest 1."""

    name = "half_zero_test"

    def __init__(self) -> None:
        self.weight_of: dict[int, float] = {}

    def select(self, inputs: SelectionInput) -> Selection:
        indices = uniform_sample(inputs.pool_size, inputs.budget, inputs.generator)
        weights = torch.ones(indices.numel())
        weights[torch.randperm(indices.numel(), generator=inputs.generator)[: indices.numel() // 2]] = 0.0
        self.weight_of = dict(zip(indices.tolist(), weights.tolist()))
        return Selection(indices, weights)


class AllZero(Strategy):
    name = "all_zero_test"

    def select(self, inputs: SelectionInput) -> Selection:
        indices = uniform_sample(inputs.pool_size, inputs.budget, inputs.generator)
        return Selection(indices, torch.zeros(indices.numel()))


class WeightProbe(TinyClassifier):
    """Records ``batch_weights`` in every step, next to what the strategy says the batch's weights are."""

    def __init__(self, strategy=None, momentum: float = 0.9) -> None:
        super().__init__()
        self.strategy, self.momentum = strategy, momentum
        self.train_weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        w = batch_weights(self)
        if self.strategy is not None:
            expected = torch.tensor([self.strategy.weight_of[i] for i in batch[2].tolist()])
            self.train_weights.append((w.clone(), expected))
        else:
            self.train_weights.append((w.clone(), torch.ones(())))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_weights.append(batch_weights(self).clone())
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=self.momentum)


def test_batch_weights_are_the_strategy_weights_of_the_batch_examples():
    strategy = HalfZero()
    model = WeightProbe(strategy)
    _, callback, _ = coreset_fit(strategy=strategy, model=model, epochs=3)
    assert len(model.train_weights) == 12
    for w, expected in model.train_weights:
        assert w.dtype == torch.float32 and w.shape == expected.shape
        assert torch.equal(w, expected)
    all_w = torch.cat([w for w, _ in model.train_weights])
    assert 0.0 in all_w.tolist() and 1.0 in all_w.tolist()  # both halves were trained on
    assert callback.batch_weights is None  # nothing left over outside a training batch


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_all_zero_weights_leave_the_parameters_unchanged():
    model = WeightProbe(momentum=0.0)
    before = snapshot(model)
    coreset_fit(strategy=AllZero(), model=model, epochs=2)
    assert len(model.train_weights) == 8
    assert all(torch.equal(w, torch.zeros(4)) for w, _ in model.train_weights)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))

    control = WeightProbe(momentum=0.0)  # the same run with unit weights does move them
    coreset_fit(strategy="random", model=control, epochs=2)
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(control)))


def is_scalar_one(w: torch.Tensor) -> bool:
    return w.shape == () and float(w) == 1.0


def test_batch_weights_is_scalar_one_in_validation_and_without_the_callback():
    data = IndexedBlobs(n=64)
    model = WeightProbe(HalfZero())
    sampler = CoresetSampler(data, fraction=0.25)
    trainer(max_epochs=2, num_sanity_val_steps=2, callbacks=[CoresetCallback(sampler, strategy=model.strategy)]).fit(
        model, DataLoader(data, batch_size=4, sampler=sampler), DataLoader(Subset(data, range(8)), batch_size=4)
    )
    assert len(model.val_weights) == 2 + 2 * 2  # sanity check + two validation epochs
    assert all(is_scalar_one(w) for w in model.val_weights)
    assert all(w.shape == (4,) for w, _ in model.train_weights)

    plain = WeightProbe()
    trainer(max_epochs=1).fit(plain, DataLoader(Subset(data, range(8)), batch_size=4))
    assert len(plain.train_weights) == 2 and all(is_scalar_one(w) for w, _ in plain.train_weights)

    assert is_scalar_one(batch_weights(TinyClassifier()))  # a module outside any Trainer
