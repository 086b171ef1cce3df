"""Run small fits (1 or 2 ranks) that record what each rank trained, for the DDP and resume tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from grace_lightning import CoresetCallback, CoresetSampler, Selection, SelectionInput, Strategy
from tests.toy import IndexedBlobs, TinyClassifier


class TopLoss(Strategy):
    """A test strategy that reads signals: the highest-loss measured examples (exercises capture, scoring, gather)."""

    name = "top_loss"
    needs = frozenset({"loss"})

    def to_score(self, inputs: SelectionInput):
        # Rescore the stalest half, so both free capture and the scoring pass feed the store.
        order = torch.argsort(inputs.store.last_step.long() * inputs.pool_size + torch.randperm(inputs.pool_size, generator=inputs.generator))
        return order[: inputs.pool_size // 2].sort().values

    def select(self, inputs: SelectionInput) -> Selection:
        loss = torch.where(inputs.store.measured, inputs.store.loss, torch.full_like(inputs.store.loss, -1.0))
        top = torch.topk(loss, inputs.budget).indices.sort().values
        return Selection(top, weights=torch.linspace(0.5, 1.5, inputs.budget))


class Recorder(Callback):
    """Writes, per rank, the dataset indices of every trained batch keyed by global batch position."""

    def __init__(self, out_dir: Union[str, Path], tag: str) -> None:
        self.out_dir, self.tag = Path(out_dir), tag
        self.batches: dict[int, list[int]] = {}
        self.selections: dict[int, list[int]] = {}
        self.num_training_batches: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CoresetCallback))
        self.selections[trainer.current_epoch] = cb.sampler.selection.tolist()
        self.num_training_batches.append(int(trainer.num_training_batches))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        position = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        self.batches[int(position)] = batch[2].tolist()

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CoresetCallback))
        record = {
            "batches": self.batches,
            "selections": self.selections,
            "num_training_batches": self.num_training_batches,
            "final_selection": cb.sampler.selection.tolist(),
            "store_loss": None if cb.store is None else cb.store.loss.tolist(),
            "store_measured": None if cb.store is None else int(cb.store.measured.sum()),
            "redrawn": sum(int(r.get("redrawn", 0.0)) for r in cb.history),  # GRIP's refreshes between estimates
        }
        path = self.out_dir / f"{self.tag}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.out_dir / f"{self.tag}_weights.pt")


def fit(
    out_dir: Path,
    tag: str,
    *,
    devices: int = 1,
    num_workers: int = 0,
    schedule: str = "epoch",
    strategy: Union[str, Strategy] = "random",
    max_epochs: int = 3,
    fraction: float = 0.25,
    batch_size: int = 8,
    ckpt_path: Optional[Path] = None,
    save_checkpoints: bool = False,
    ddp: str = "ddp_fork",
    dropout: float = 0.2,
    extra_callbacks: tuple = (),
    accelerator: str = "cpu",
    precision: str = "32-true",
    **callback_kwargs,
) -> None:
    """One fit; per-rank records land in ``out_dir``. Checkpoints (every step and every epoch end) too, if asked.

    The model has dropout by default, so a resume is bit-exact only if the RNG streams are restored too.
    """
    dataset = IndexedBlobs(n=256)
    sampler = CoresetSampler(dataset, fraction=fraction, seed=7)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    if schedule == "epoch":
        intervals = {"refresh_every_n_epochs": 1}
    else:
        intervals = {"refresh_every_n_epochs": None, "refresh_every_n_steps": 3}
    callbacks = [CoresetCallback(sampler, strategy=strategy, seed=11, **intervals, **callback_kwargs), Recorder(out_dir, tag)]
    callbacks += list(extra_callbacks)
    if save_checkpoints:
        callbacks += [
            ModelCheckpoint(dirpath=out_dir / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1),
            ModelCheckpoint(
                dirpath=out_dir / "epochs", filename="{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
            ),
        ]
    trainer = L.Trainer(
        accelerator=accelerator,
        precision=precision,
        devices=devices,
        strategy=ddp if devices > 1 else "auto",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=save_checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(TinyClassifier(dropout=dropout), loader, ckpt_path=ckpt_path)


def load_records(out_dir: Path, tag: str, devices: int) -> list[dict]:
    records = []
    for rank in range(devices):
        record = json.loads((out_dir / f"{tag}_rank{rank}.json").read_text())
        record["batches"] = {int(k): v for k, v in record["batches"].items()}
        record["selections"] = {int(k): v for k, v in record["selections"].items()}
        records.append(record)
    return records


def load_weights(out_dir: Path, tag: str) -> dict:
    return torch.load(out_dir / f"{tag}_weights.pt", weights_only=True)
