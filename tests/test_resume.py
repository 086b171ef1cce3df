"""Resume matrix: a run resumed from a checkpoint must equal the uninterrupted run, bit for bit.

Checkpoints are taken mid-epoch, on the last batch of an epoch (a case where Lightning skips
``on_train_epoch_end`` on resume) and at epoch end, with 0 and 2 workers (prefetching workers draw
indices ahead of training), on 1 and 2 ranks, with epoch and step refresh schedules.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from grace_lightning import rng
from tests.toy import IndexedBlobs
from tests.harness import TopLoss, fit, load_records, load_weights

BATCH_SIZE = 8
POOL, FRACTION = 256, 0.25


def _batches_per_epoch(devices: int) -> int:
    return int(POOL * FRACTION) // devices // BATCH_SIZE


def _checkpoints(out_dir, devices):
    nb = _batches_per_epoch(devices)
    return {
        "mid_epoch": out_dir / "steps" / f"step={nb + nb // 2 + 1}.ckpt",
        "last_batch": out_dir / "steps" / f"step={2 * nb}.ckpt",
        "epoch_end": out_dir / "epochs" / "epoch=0.ckpt",
    }


def _assert_resumed_equals_uninterrupted(out_dir, devices, resume_point):
    full = load_records(out_dir, "full", devices)
    resumed = load_records(out_dir, f"resumed_{resume_point}", devices)
    for rank in range(devices):
        positions = sorted(resumed[rank]["batches"])
        assert positions, "the resumed run trained nothing"
        assert positions == [p for p in sorted(full[rank]["batches"]) if p >= positions[0]], (
            f"rank {rank}: resumed run trained batch positions {positions}"
        )
        for p in positions:
            assert resumed[rank]["batches"][p] == full[rank]["batches"][p], f"rank {rank}, batch position {p}"
        assert resumed[rank]["final_selection"] == full[rank]["final_selection"]
        assert resumed[rank]["store_loss"] == full[rank]["store_loss"]
    a, b = load_weights(out_dir, "full"), load_weights(out_dir, f"resumed_{resume_point}")
    for key in a:
        assert torch.equal(a[key], b[key]), f"final weights differ in {key}"


MATRIX = [
    pytest.param(devices, workers, schedule, id=f"{devices}rank-nw{workers}-{schedule}")
    for devices in (1, 2)
    for workers in (0, 2)
    for schedule in ("epoch", "step")
]


@pytest.mark.parametrize("devices,num_workers,schedule", MATRIX)
def test_resume_is_bit_exact(tmp_path, devices, num_workers, schedule):
    fit(tmp_path, "full", devices=devices, num_workers=num_workers, schedule=schedule, save_checkpoints=True)
    for point, ckpt in _checkpoints(tmp_path, devices).items():
        assert ckpt.exists(), f"missing checkpoint {ckpt.name}"
        fit(tmp_path, f"resumed_{point}", devices=devices, num_workers=num_workers, schedule=schedule, ckpt_path=ckpt)
        _assert_resumed_equals_uninterrupted(tmp_path, devices, point)


# el2n scores the pool in epoch 1 and again every second refresh, so every checkpoint holds a frozen selection.
# grace_repair repairs its graph between refreshes (off by default), so the repaired rows must survive too.
# grip estimates every third refresh and redraws from the estimate in between; grip_every_refresh estimates at each.
# grace_noise reads the error norms and the labels (extra signals only its two options need) gathered across ranks.
STRATEGY_KWARGS = {
    "el2n": {"score_epoch": 1, "rescore_every_n_refreshes": 2},
    "grace_repair": {"repair_share": 0.5},
    "grace_noise": {"contradiction_weight": 0.1, "outvoted_weight": 0.1},
    "grip_every_refresh": {"reestimate_every": 1},
}
# Strategies that measure influence on (or build queries from) a reference set get one: 32 held-out examples.
NEEDS_REFERENCE = {"group_mates", "gip"}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize(
    "strategy",
    [
        "top_loss", "grace", "grace_repair", "grace_noise", "infobatch", "el2n", "grip", "grip_every_refresh",
        "group_mates", "gip",
    ],
)
def test_resume_is_bit_exact_with_a_signal_strategy(tmp_path, devices, strategy):
    """Free training signals, the scoring pass, probes, the cross-rank gather and strategy state all survive a resume."""
    built = {"top_loss": TopLoss(), "grace_repair": "grace", "grace_noise": "grace", "grip_every_refresh": "grip"}.get(
        strategy, strategy
    )
    kwargs = dict(
        devices=devices, num_workers=2, schedule="step", strategy=built, strategy_kwargs=STRATEGY_KWARGS.get(strategy),
    )
    if strategy in NEEDS_REFERENCE:
        kwargs["reference"] = IndexedBlobs(n=32, seed=1)
    fit(tmp_path, "full", save_checkpoints=True, **kwargs)
    for point, ckpt in _checkpoints(tmp_path, devices).items():
        fit(tmp_path, f"resumed_{point}", ckpt_path=ckpt, **kwargs)
        _assert_resumed_equals_uninterrupted(tmp_path, devices, point)
    full = load_records(tmp_path, "full", devices)
    if strategy != "infobatch":  # infobatch never scores: it measures only what it trains on
        assert full[0]["store_measured"] == POOL  # scoring and capture together measured the whole pool
    if strategy.startswith("grip"):  # refreshes between estimates happened (or not), and resumed bit-exact
        assert (full[0]["redrawn"] >= 1) == (strategy == "grip")


def test_selection_changes_between_refreshes(tmp_path):
    """Guards the matrix against a vacuous pass: the selections it compares really do change."""
    fit(tmp_path, "full", devices=1, schedule="epoch")
    record = load_records(tmp_path, "full", 1)[0]
    assert len({tuple(s) for s in record["selections"].values()}) == 3


# ---------------------------------------------------------------- RNG streams (the harness's model has dropout)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("point", ["mid_epoch", "last_batch", "epoch_end"])
def test_resume_without_rng_restore_is_caught(tmp_path, point, num_workers):
    """Guards the matrix against a vacuous pass: without the RNG restore, dropout makes the weights differ."""
    fit(tmp_path, "full", num_workers=num_workers, save_checkpoints=True)
    ckpt = _checkpoints(tmp_path, 1)[point]
    fit(tmp_path, f"resumed_{point}", num_workers=num_workers, ckpt_path=ckpt, restore_rng=False)
    with pytest.raises(AssertionError, match="final weights differ"):
        _assert_resumed_equals_uninterrupted(tmp_path, 1, point)


class _RankSeeds(Callback):
    """Gives every rank its own torch stream before the checkpoint is read (a resume then overwrites it)."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


def test_each_rank_restores_its_own_stream(tmp_path):
    kwargs = dict(devices=2, num_workers=0, schedule="step", extra_callbacks=(_RankSeeds(),))
    fit(tmp_path, "full", save_checkpoints=True, **kwargs)
    for point, ckpt in _checkpoints(tmp_path, 2).items():
        saved = torch.load(ckpt, weights_only=True)["callbacks"]
        (state,) = [v for k, v in saved.items() if k.startswith("CoresetCallback")]
        rows = state["rng"]["ranks"]
        assert len(rows) == 2 and not torch.equal(rows[0]["torch"], rows[1]["torch"])
        fit(tmp_path, f"resumed_{point}", ckpt_path=ckpt, **kwargs)
        _assert_resumed_equals_uninterrupted(tmp_path, 2, point)


def test_checkpoint_without_restore_rng_holds_no_rng_state(tmp_path):
    fit(tmp_path, "full", save_checkpoints=True, restore_rng=False, max_epochs=1)
    saved = torch.load(_checkpoints(tmp_path, 1)["epoch_end"], weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("CoresetCallback")]
    assert state["rng"] is None


def test_resume_on_another_number_of_ranks_names_the_switch(tmp_path):
    fit(tmp_path, "full", save_checkpoints=True, max_epochs=1)
    with pytest.raises(Exception, match=r"the checkpoint holds the RNG states of 1 rank\(s\) but this run has 2.*restore_rng=False"):
        fit(tmp_path, "resumed", devices=2, ckpt_path=_checkpoints(tmp_path, 1)["epoch_end"], max_epochs=2)


def test_rng_round_trip_through_a_weights_only_checkpoint(tmp_path):
    np.random.randn()
    random.gauss(0.0, 1.0)  # cached gaussians are part of the state
    state = rng.capture()
    torch.save({"rng": state, "bytes": rng.to_bytes(state)}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)

    def draw():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), np.random.randn(), random.random(), random.gauss(0, 1)

    first = draw()
    rng.restore(loaded["rng"])
    assert draw() == first
    rng.restore(rng.from_bytes(loaded["bytes"]))
    assert draw() == first
