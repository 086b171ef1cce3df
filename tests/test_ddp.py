"""Two CPU ranks (``ddp_fork``, gloo) with a default Trainer: same subset everywhere, disjoint equal shards."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from grace_lightning.distributed import gather_rows
from tests.harness import TopLoss, fit, load_records
from tests.toy import IndexedBlobs

pytestmark = pytest.mark.timeout(180)  # a rank mismatch shows up as a hang; fail instead


def _epochs(record):
    per_epoch: dict[int, list[int]] = {}
    nb = record["num_training_batches"][0]
    for position, indices in record["batches"].items():
        per_epoch.setdefault(position // nb, []).extend(indices)
    return per_epoch


# el2n scores the pool at the refresh before epoch 1, so epochs 1 and 2 train on its frozen top-budget.
STRATEGY_KWARGS = {"el2n": {"score_epoch": 1}}
NEEDS_REFERENCE = {"group_mates", "gip"}


@pytest.mark.parametrize(
    "strategy",
    ["random", "full", "grace", "infobatch", "el2n", "grip", "group_mates", "gip", TopLoss()],
    ids=["random", "full", "grace", "infobatch", "el2n", "grip", "group_mates", "gip", "top_loss"],
)
def test_two_ranks_share_the_subset_and_split_it_disjointly(tmp_path, strategy):
    kwargs = STRATEGY_KWARGS.get(strategy) if isinstance(strategy, str) else None
    extra = {"reference": IndexedBlobs(n=32, seed=1)} if strategy in NEEDS_REFERENCE else {}
    fit(tmp_path, "run", devices=2, strategy=strategy, max_epochs=3, strategy_kwargs=kwargs, **extra)
    rank0, rank1 = load_records(tmp_path, "run", 2)
    assert rank0["selections"] == rank1["selections"], "ranks hold different subsets"
    assert rank0["num_training_batches"] == rank1["num_training_batches"] == [4, 4, 4]
    epochs0, epochs1 = _epochs(rank0), _epochs(rank1)
    assert sorted(epochs0) == sorted(epochs1) == [0, 1, 2]
    for epoch in epochs0:
        shard0, shard1 = epochs0[epoch], epochs1[epoch]
        assert len(shard0) == len(shard1) == 32
        assert not set(shard0) & set(shard1), f"epoch {epoch}: shards overlap"
        selection = rank0["selections"][epoch]
        if len(selection) > 64:  # larger than the budget (`full`, infobatch's kept set): streamed, a budget per epoch
            assert set(shard0 + shard1) <= set(selection), f"epoch {epoch}: trained outside the subset"
        else:
            assert sorted(shard0 + shard1) == sorted(selection), f"epoch {epoch}: union != subset"
    if strategy == "full":  # four epochs' worth of stream would cover the pool; three cover 3/4 of it, no repeats
        seen = [i for e in epochs0 for i in epochs0[e] + epochs1[e]]
        assert len(seen) == len(set(seen)) == 192
    if strategy == "infobatch":  # after the cold start, unmeasured and high-loss examples are all kept
        assert len(rank0["selections"][1]) > 64
    if strategy == "el2n":  # scored once before epoch 1, then frozen
        assert rank0["selections"][1] == rank0["selections"][2] != rank0["selections"][0]


def test_ddp_spawn_pickles_sampler_and_callback(tmp_path):
    """Spawned ranks get pickled copies: the sampler must re-bind in each process and still shard correctly."""
    # Until the callback made the ranks leave together (a barrier at fit end), a spawned rank sometimes aborted
    # at interpreter exit, after its fit; no tolerance here, so that a return of it fails.
    fit(tmp_path, "run", devices=2, ddp="ddp_spawn", max_epochs=2)
    rank0, rank1 = load_records(tmp_path, "run", 2)
    assert rank0["selections"] == rank1["selections"]
    for epoch, shard0 in _epochs(rank0).items():
        shard1 = _epochs(rank1)[epoch]
        assert sorted(shard0 + shard1) == sorted(rank0["selections"][epoch])


def test_signal_store_is_identical_on_both_ranks(tmp_path):
    fit(tmp_path, "run", devices=2, strategy=TopLoss(), schedule="step", max_epochs=2)
    rank0, rank1 = load_records(tmp_path, "run", 2)
    assert rank0["store_loss"] == rank1["store_loss"]
    assert rank0["store_measured"] == rank1["store_measured"] == 256


class _GatherHugeIndices(Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_start(self, trainer, pl_module):
        rank = trainer.global_rank
        # Values float32 cannot hold exactly; uneven row counts per rank (padding path).
        index = torch.tensor([2**24 + 1 + rank, 2**40 + 3 + rank, 2**53 + 1][: 2 + rank], dtype=torch.int64)
        rows = {"index": index, "value": torch.arange(index.numel(), dtype=torch.float32)}
        got = gather_rows(trainer.strategy, rows, pl_module.device)
        (self.out / f"gather{rank}.json").write_text(json.dumps({"index": got["index"].tolist(), "dtype": str(got["index"].dtype)}))


class _Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_int64_indices_beyond_2_pow_24_survive_the_gather(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[_GatherHugeIndices(tmp_path)],
    )
    trainer.fit(_Model(), torch.utils.data.DataLoader(torch.zeros(4, 1)))
    expected = [2**24 + 1, 2**40 + 3, 2**24 + 2, 2**40 + 4, 2**53 + 1]
    for rank in range(2):
        got = json.loads((tmp_path / f"gather{rank}.json").read_text())
        assert got == {"index": expected, "dtype": "torch.int64"}


@pytest.mark.parametrize("launch", ["ddp_spawn", "ddp_fork"])
@pytest.mark.parametrize("form", ["explicit", "one_line"])
def test_worker_processes_hand_history_and_selection_back(launch, form):
    """Lightning trains in worker processes under ddp_spawn/ddp_fork; the callback the user holds still reports."""
    from torch.utils.data import DataLoader

    from grace_lightning import CoresetCallback, CoresetSampler
    from tests.toy import TinyClassifier

    dataset = IndexedBlobs(n=128)
    if form == "explicit":
        sampler = CoresetSampler(dataset, fraction=0.25, seed=3)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        callback = CoresetCallback(sampler, strategy="random", seed=5)
    else:
        loader = DataLoader(dataset, batch_size=8, shuffle=True)
        callback = CoresetCallback(fraction=0.25, strategy="random", seed=5)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=launch, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback],
    )
    trainer.fit(TinyClassifier(), loader)
    history = callback.history
    # The first selection (before epoch 0) and one refresh at the end of epochs 0 and 1 (none after the last).
    assert [r["refresh"] for r in history] == [1.0, 2.0, 3.0]
    assert all(r["subset_size"] == 32 for r in history)
    assert callback.history is history, "handed back once, then kept"
    if form == "explicit":
        # Rank 0's last selection came back: it took effect at the start of epoch 2 (2 batches per rank and epoch).
        assert sampler.state_dict()["versions"][-1]["start"] == 4
        assert sampler.selection.numel() == 32
    assert not callback._origin.path.exists(), "the hand-back file is removed once read"


def test_an_unread_hand_back_is_removed_when_the_callback_goes(tmp_path):
    """A DDP fit whose history is never read must not leave files behind in the temporary directory."""
    import gc

    from grace_lightning.handback import Origin

    origin = Origin()
    path = origin.path
    path.write_bytes(b"payload")  # as rank 0 of a forked or spawned fit would have written it
    del origin
    gc.collect()
    assert not path.exists()
