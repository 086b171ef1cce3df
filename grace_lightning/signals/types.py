"""The per-example signals a model gives: the common currency between capture, store and strategies.

Each signal is declared once, as a field of :class:`ExampleSignals` whose metadata says how it is held (dtype
in a batch, dtype and fill in the :class:`~grace_lightning.signals.SignalStore`, one value or one row per
example, whether a batch must carry it). The store's arrays and checkpoints, the rows gathered across ranks
and the strategies' ``needs`` all follow from that table, so a new signal is one field here (plus the code
that computes it, in ``closed_form.py``).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["ExampleSignals", "SignalSpec", "SIGNALS", "signal_names"]


@dataclass(frozen=True)
class SignalSpec:
    """How one per-example signal is held.

    Attributes:
        name: the field name (``ExampleSignals.<name>``, ``SignalStore.<name>``, ``Strategy.needs``).
        dtype: its dtype in a batch of signals (``ExampleSignals``), after ``detach_cpu``.
        store_dtype: its dtype in the store (embeddings are kept in float16).
        fill: the store's value before an example is measured.
        per_row: ``(B, d)`` (a vector per example) rather than ``(B,)``.
        required: every batch of signals carries it (else it may be ``None``, and the store allocates it
            the first time one arrives).
        default: a batch that leaves it out gets this value per example (``None``: it stays missing).
        checked: non-finite values reject the example's whole row (integers are always finite).
    """

    name: str
    dtype: torch.dtype
    store_dtype: type
    fill: float
    per_row: bool = False
    required: bool = False
    default: Optional[int] = None
    checked: bool = True

    @property
    def always_present(self) -> bool:
        """Every batch of signals carries it (required, or filled with ``default``): the store allocates it at once."""
        return self.required or self.default is not None


def _signal(doc: str, **spec: Any) -> Any:
    required = spec.get("required", False)
    return field(default=MISSING if required else None, metadata={"spec": spec, "doc": doc})


@dataclass
class ExampleSignals:
    """Per-example signals for one batch (or any set) of examples, all on the CPU or all on one device.

    Attributes:
        loss: ``(B,)`` float32 per-example training loss (mean over supervised tokens for sequences).
        grad_norm: ``(B,)`` float32 Frobenius norm of the per-example gradient of the loss with respect
            to the head's weight (and bias, if it has one), in closed form: no backward pass.
        embedding: ``(B, d)`` float32 head input (penultimate features; mean over supervised tokens for
            sequences), not normalised. ``None`` when the capture cannot provide it.
        length: ``(B,)`` int64 supervised tokens per example (1 for fixed-size inputs).
        error_norm: ``(B,)`` float32 EL2N score ``‖softmax(z) − onehot(y)‖₂`` (Paul et al. 2021; mean over
            supervised tokens of the per-token norm for sequences). ``None`` when the capture cannot provide
            it (a custom ``coreset_signals`` may leave it out; only strategies that read it need it).
        label: ``(B,)`` int64 class label of a classification example (-1 where the target is ignored). ``None``
            for sequences, and when a custom ``coreset_signals`` leaves it out; GRACE's ``outvoted_weight`` reads
            it, to compare an example's label with its graph neighbours'.

    Example:
        >>> s = ExampleSignals(loss=torch.tensor([0.5, 2.0]), grad_norm=torch.tensor([0.1, 0.9]))
        >>> s.length.tolist(), len(s)
        ([1, 1], 2)
    """

    loss: Tensor = _signal("per-example loss", dtype=torch.float32, store_dtype=np.float32, fill=0, required=True)
    grad_norm: Tensor = _signal("head-gradient norm", dtype=torch.float32, store_dtype=np.float32, fill=0, required=True)
    embedding: Optional[Tensor] = _signal("head input", dtype=torch.float32, store_dtype=np.float16, fill=0, per_row=True)
    length: Optional[Tensor] = _signal(
        "supervised tokens", dtype=torch.int64, store_dtype=np.int32, fill=1, default=1, checked=False
    )
    error_norm: Optional[Tensor] = _signal("EL2N", dtype=torch.float32, store_dtype=np.float32, fill=0)
    label: Optional[Tensor] = _signal("class label", dtype=torch.int64, store_dtype=np.int32, fill=-1, checked=False)

    def __post_init__(self) -> None:
        n = self.loss.shape[0] if isinstance(self.loss, Tensor) and self.loss.ndim == 1 else None
        for spec in SIGNALS:
            value = getattr(self, spec.name)
            if value is None:
                if spec.default is not None and n is not None:
                    setattr(self, spec.name, torch.full((n,), spec.default, dtype=spec.dtype, device=self.loss.device))
                continue
            shape_ok = n is not None and value.shape[0] == n and value.ndim == (2 if spec.per_row else 1)
            if not shape_ok:
                want = "(B, d)" if spec.per_row else "(B,)"
                got = {s.name: tuple(getattr(self, s.name).shape) for s in SIGNALS if getattr(self, s.name) is not None}
                raise ValueError(
                    f"ExampleSignals: `{spec.name}` must have shape {want} with B = len(loss); got shapes {got}."
                )

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def detach_cpu(self) -> "ExampleSignals":
        """A CPU copy in each signal's declared dtype (float32, lengths int64), detached from any graph."""
        return self.to(torch.device("cpu"))

    def to(self, device: torch.device, non_blocking: bool = False) -> "ExampleSignals":
        """A copy on ``device`` in each signal's declared dtype, detached from any graph.

        ``non_blocking=True`` from a GPU to the CPU copies into pinned memory without waiting for the device: the
        copy's values are only valid after a synchronisation of the source device.
        """
        return ExampleSignals(
            **{
                s.name: None
                if getattr(self, s.name) is None
                else getattr(self, s.name).detach().to(device, s.dtype, non_blocking=non_blocking)
                for s in SIGNALS
            }
        )

    def keeping(self, names: frozenset[str]) -> "ExampleSignals":
        """The same signals with the optional ones not in ``names`` left out (every batch carries the others).

        Example:
            >>> s = ExampleSignals(loss=torch.ones(2), grad_norm=torch.ones(2), embedding=torch.ones(2, 3))
            >>> s.keeping(frozenset({"loss"})).embedding is None
            True
        """
        return ExampleSignals(
            **{
                s.name: getattr(self, s.name) if s.always_present or s.name in names else None
                for s in SIGNALS
            }
        )

    def select(self, rows: Tensor) -> "ExampleSignals":
        """The signals of ``rows`` (an index tensor or a bool mask), in that order."""
        return ExampleSignals(**{s.name: None if getattr(self, s.name) is None else getattr(self, s.name)[rows] for s in SIGNALS})

    @staticmethod
    def cat(parts: list["ExampleSignals"]) -> "ExampleSignals":
        """One set of signals from several batches; a signal missing from any part is missing from the result."""
        if not parts:
            return ExampleSignals.empty()
        values = {}
        for s in SIGNALS:
            columns = [getattr(p, s.name) for p in parts]
            values[s.name] = None if any(c is None for c in columns) else torch.cat(columns)
        return ExampleSignals(**values)

    @staticmethod
    def empty() -> "ExampleSignals":
        """Zero examples: the required signals as empty tensors, the optional ones missing."""
        return ExampleSignals(**{s.name: torch.zeros(0, dtype=s.dtype) for s in SIGNALS if s.required})

    def as_rows(self) -> dict[str, Optional[Tensor]]:
        """``{name: tensor or None}``, the form :func:`~grace_lightning.distributed.gather_rows` moves across ranks."""
        return {s.name: getattr(self, s.name) for s in SIGNALS}

    @staticmethod
    def from_rows(rows: dict[str, Optional[Tensor]]) -> "ExampleSignals":
        """The inverse of :meth:`as_rows` (other keys, such as dataset indices, are ignored)."""
        return ExampleSignals(**{s.name: None if rows.get(s.name) is None else rows[s.name].to(s.dtype) for s in SIGNALS})


SIGNALS: tuple[SignalSpec, ...] = tuple(SignalSpec(name=f.name, **f.metadata["spec"]) for f in fields(ExampleSignals))


def signal_names() -> frozenset[str]:
    """The names a strategy may list in ``needs``."""
    return frozenset(s.name for s in SIGNALS)
