"""The per-example signals a model gives: the common currency between capture, store and strategies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


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
    """

    loss: Tensor
    grad_norm: Tensor
    embedding: Optional[Tensor] = None
    length: Optional[Tensor] = None
    error_norm: Optional[Tensor] = None

    def __post_init__(self) -> None:
        n = self.loss.shape[0]
        if self.loss.ndim != 1 or self.grad_norm.shape != (n,):
            raise ValueError(
                f"ExampleSignals: `loss` and `grad_norm` must both have shape (B,), got {tuple(self.loss.shape)} "
                f"and {tuple(self.grad_norm.shape)}."
            )
        if self.embedding is not None and (self.embedding.ndim != 2 or self.embedding.shape[0] != n):
            raise ValueError(f"ExampleSignals: `embedding` must have shape (B, d) with B={n}, got {tuple(self.embedding.shape)}.")
        if self.length is None:
            self.length = torch.ones(n, dtype=torch.long, device=self.loss.device)
        elif self.length.shape != (n,):
            raise ValueError(f"ExampleSignals: `length` must have shape (B,) with B={n}, got {tuple(self.length.shape)}.")
        if self.error_norm is not None and self.error_norm.shape != (n,):
            raise ValueError(
                f"ExampleSignals: `error_norm` must have shape (B,) with B={n}, got {tuple(self.error_norm.shape)}."
            )

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def detach_cpu(self) -> "ExampleSignals":
        """A float32 CPU copy, detached from any graph."""
        return ExampleSignals(
            loss=self.loss.detach().float().cpu(),
            grad_norm=self.grad_norm.detach().float().cpu(),
            embedding=None if self.embedding is None else self.embedding.detach().float().cpu(),
            length=self.length.detach().long().cpu(),
            error_norm=None if self.error_norm is None else self.error_norm.detach().float().cpu(),
        )
