"""Hand a fit's results back to the process that built the callback, when the fit ran in other processes.

Under ``ddp_spawn`` and ``ddp_fork`` Lightning trains in worker processes: the callback object the user holds
in the launching process never sees a hook, so its ``history`` would stay empty. Lightning hands the model's
weights back the same way: rank 0 writes a file, the launching process reads it. Here the file is keyed by a
token made when the callback was built (the workers' copies carry it), written at the end of the fit and read
(then deleted) the first time the launching process asks.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["Origin"]


class Origin:
    """The process that built an object, and where results for it are handed back.

    Example::

        origin = Origin()                     # in the launching process
        ...                                   # a worker process, with a pickled or forked copy:
        if not origin.is_here():
            origin.hand_back({"history": [...]})
        ...                                   # back in the launching process:
        payload = origin.take()               # the dict, or None when nothing was handed back
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = secrets.token_hex(8)
        # A payload nobody reads (a DDP fit whose `history` is never asked for) is removed when this object
        # goes, or at exit, by the launching process only (forked or spawned copies never register or delete).
        weakref.finalize(self, _remove_unread, self.path, self.pid)

    def is_here(self) -> bool:
        """Whether this is the process that built the object."""
        return os.getpid() == self.pid

    @property
    def path(self) -> Path:
        return Path(tempfile.gettempdir()) / f"grace-lightning-handback-{self.pid}-{self.token}.pt"

    def hand_back(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` (tensors, numbers, strings, lists and dicts of them) for the launching process."""
        partial = self.path.with_suffix(".part")
        torch.save(payload, partial)
        os.replace(partial, self.path)  # atomic: a reader never sees half a file

    def take(self) -> Optional[dict[str, Any]]:
        """The payload handed back since the last call, or None; only in the launching process."""
        if not self.is_here() or not self.path.exists():
            return None
        payload = torch.load(self.path, weights_only=True)
        self.path.unlink(missing_ok=True)
        return payload


def _remove_unread(path: Path, pid: int) -> None:
    if os.getpid() == pid:
        path.unlink(missing_ok=True)
