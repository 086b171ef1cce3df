"""Capture and restore the main process's random streams, in a form a weights-only checkpoint can hold.

Lightning saves no RNG state, so a resumed run's dropout (and anything else drawing from the global
generators in the training process) diverges from the uninterrupted run. :func:`capture` encodes the
streams training draws from (torch CPU, CUDA when initialised, numpy's global ``RandomState``, python's
``random``) as tensors, ints, floats, lists and dicts only, which ``torch.load(weights_only=True)`` accepts;
:func:`restore` puts them back. :func:`to_bytes` / :func:`from_bytes` turn one such state into a
``uint8`` tensor and back, so the ranks can gather theirs with a tensor collective.

Not covered: DataLoader worker processes, which reseed themselves from a base seed drawn when each
iterator is created; generators the user builds (``torch.Generator()``), which are the user's state.
"""

from __future__ import annotations

import io
import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from grace_lightning.loaders import flatten_loaders

__all__ = ["capture", "restore", "to_bytes", "from_bytes", "gather", "for_rank", "fresh_iterator_draws", "replay_iterator_draws", "ResumeStreams"]

_VERSION = 1


def capture() -> dict[str, Any]:
    """This process's RNG streams, encoded with tensors / ints / floats / lists / dicts only."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "version": _VERSION,
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),  # uint32 words, exact in int64
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(list(py_internal), dtype=torch.int64),  # 625 words < 2**32
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def restore(state: dict[str, Any]) -> None:
    """Put back the streams :func:`capture` encoded. CUDA states are restored when CUDA has as many devices."""
    if int(state.get("version", -1)) != _VERSION:
        raise ValueError(f"grace_lightning.rng: unknown RNG state version {state.get('version')!r}.")
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = state["python"]
    internal = tuple(int(v) for v in p["internal"].tolist())
    random.setstate((int(p["version"]), internal, p["gauss_next"]))


def to_bytes(state: dict[str, Any]) -> Tensor:
    """One encoded state as a 1-D ``uint8`` tensor (its ``torch.save`` bytes)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def from_bytes(data: Tensor) -> dict[str, Any]:
    """The inverse of :func:`to_bytes`, loaded weights-only (an encoded state holds nothing else)."""
    raw = data.detach().to(torch.uint8).cpu().numpy().tobytes()
    return torch.load(io.BytesIO(raw), weights_only=True)


def gather(strategy: Any, world_size: int, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's :func:`capture`, in rank order, on every rank (a collective: all ranks must call it).

    Each state travels as one ``uint8`` row, padded to the longest, with its length.
    """
    mine = to_bytes(capture())
    if world_size <= 1:
        return [from_bytes(mine)]
    lengths = strategy.all_gather(torch.tensor([mine.numel()], dtype=torch.int64, device=device)).reshape(-1).cpu()
    padded = torch.zeros(int(lengths.max()), dtype=torch.uint8)
    padded[: mine.numel()] = mine
    rows = strategy.all_gather(padded.to(device)).reshape(world_size, -1).cpu()
    return [from_bytes(rows[r, : int(lengths[r])]) for r in range(world_size)]


def for_rank(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's state out of a checkpoint's ``{"ranks": [...]}``; the world size must be the saving run's."""
    ranks = saved["ranks"]
    if len(ranks) != world_size:
        raise ValueError(
            f"CoresetCallback: the checkpoint holds the RNG states of {len(ranks)} rank(s) but this run has "
            f"{world_size}; each rank restores its own stream, so resume with the same number of ranks, or pass "
            "CoresetCallback(restore_rng=False) to resume without restoring them (dropout then differs from the "
            "uninterrupted run)."
        )
    return ranks[rank]


def _draws_at_iter(loader: Any, reuse_persistent: bool) -> int:
    """Global-generator draws that ``iter(loader)`` makes: a new DataLoader iterator draws its base seed."""
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or loader.generator is not None:
        return 0
    reused = reuse_persistent and loader.persistent_workers and loader.num_workers > 0
    return 0 if reused else 1


def fresh_iterator_draws(loaders: list[Any]) -> tuple[int, int]:
    """``(draws at the next epoch's iter() of a running fit, draws at the first iter() of a resumed fit)``.

    A persistent-worker DataLoader keeps its iterator across epochs (no draw), but a resumed fit builds a new
    one (a draw); every other DataLoader builds a new iterator, drawing a base seed, at each ``iter()``.
    """
    return sum(_draws_at_iter(dl, True) for dl in loaders), sum(_draws_at_iter(dl, False) for dl in loaders)


def replay_iterator_draws(count: int) -> None:
    """Draw from the global torch generator as ``count`` new DataLoader iterators do (their base seed)."""
    for _ in range(count):
        torch.empty((), dtype=torch.int64).random_()


class ResumeStreams:
    """Saves every rank's streams into a checkpoint and restores this rank's where the uninterrupted run stood.

    Timing. A resumed fit creates its training iterator (a global draw per DataLoader, its base seed) in
    ``FitLoop.setup_data``, before ``on_train_start``. Mid-epoch, the running fit had already made it: restore
    after it, at the first training batch. At an epoch boundary the running fit made the next epoch's iterator
    after saving: when it drew exactly as the resumed one will, restore at load (before it; the base seed, hence
    non-persistent workers' seeds, then match too); else restore at the first batch and replay the draws.

    Args:
        enabled: ``False`` neither saves nor restores (``CoresetCallback(restore_rng=False)``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._pending: Optional[tuple[dict[str, Any], int]] = None  # (state, draws to replay), for the next batch

    def state_dict(self, trainer: Any) -> Optional[dict[str, Any]]:
        """Every rank's streams (rank 0 writes the checkpoint) and what tells when to put them back. A collective."""
        if not self.enabled or trainer is None:
            return None
        loaders = flatten_loaders(trainer.train_dataloader) if trainer.train_dataloader is not None else []
        next_epoch_draws, resume_draws = fresh_iterator_draws(loaders)
        return {
            "ranks": gather(trainer.strategy, trainer.world_size, trainer.lightning_module.device),
            # Saved on an epoch's last batch (or at its end): the running fit made the next epoch's iterator after.
            "epoch_boundary": bool(trainer.is_last_batch),
            "next_epoch_draws": next_epoch_draws,
            "resume_draws": resume_draws,
        }

    def load(self, saved: Optional[dict[str, Any]], rank: int, world_size: int) -> None:
        """Restore this rank's streams now, or arm them for :meth:`restore_pending` at the first training batch."""
        self._pending = None
        if not self.enabled:
            return
        if saved is None:
            rank_zero_warn(
                "CoresetCallback: the checkpoint holds no RNG state (saved with restore_rng=False or by an older "
                "version), so dropout and other random draws will differ from the uninterrupted run."
            )
            return
        state = for_rank(saved, rank, world_size)
        boundary = bool(saved["epoch_boundary"])
        if boundary and int(saved["next_epoch_draws"]) == int(saved["resume_draws"]):
            restore(state)
            return
        self._pending = (state, int(saved["next_epoch_draws"]) if boundary else 0)

    def restore_pending(self) -> None:
        """At the first training batch after a resume: put back streams that could not be restored at load."""
        if self._pending is None:
            return
        (state, replay), self._pending = self._pending, None
        restore(state)
        replay_iterator_draws(replay)
