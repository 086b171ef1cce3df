"""Collectives the callback needs, written once: variable-length row gathers that keep dtypes (int64 too)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def gather_rows(strategy, rows: dict[str, Optional[Tensor]], device: torch.device) -> dict[str, Optional[Tensor]]:
    """All-gather per-rank tensors whose first dimension differs between ranks; concatenate in rank order.

    Every rank must call this with the same keys. A value may be ``None`` on every rank. Dtypes are kept
    exactly (dataset indices stay int64 end to end: no float promotion, unlike InfoBatch's gather).
    Works on a single device, where Lightning's ``all_gather`` returns its input unchanged.
    Returns CPU tensors.
    """
    keys = sorted(rows)
    # Row counts and trailing shapes first, so ranks with no rows can build correctly shaped padding.
    meta = []
    for key in keys:
        t = rows[key]
        meta.append(-1 if t is None else t.shape[0])
        meta.append(-1 if t is None or t.ndim < 2 else t.shape[1])
    all_meta = strategy.all_gather(torch.tensor(meta, dtype=torch.int64, device=device)).reshape(-1, len(meta)).cpu()
    world = all_meta.shape[0]
    out: dict[str, Optional[Tensor]] = {}
    for k, key in enumerate(keys):
        counts = all_meta[:, 2 * k].clamp(min=0)
        width = int(all_meta[:, 2 * k + 1].max())
        if int(all_meta[:, 2 * k].max()) < 0:
            out[key] = None
            continue
        t = rows[key]
        longest = int(counts.max())
        if t is None:  # this rank has no rows (e.g. an empty shard); signals are float32 throughout
            t = torch.zeros((0,) if width < 0 else (0, width), dtype=torch.float32)
        shape = (longest,) if width < 0 else (longest, width)
        padded = torch.zeros(shape, dtype=t.dtype, device=device)
        padded[: t.shape[0]] = t.to(device)
        gathered = strategy.all_gather(padded).reshape(world, *shape).cpu()
        out[key] = torch.cat([gathered[r, : int(counts[r])] for r in range(world)])
    return out


def max_over_ranks(strategy, seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds``: a phase takes as long as its slowest rank (one collective)."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    return float(strategy.all_gather(t).max())
