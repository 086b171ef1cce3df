"""Probes: a few optimizer steps on a snapshot of the live model and optimizer, restored exactly afterwards.

GRIP's Rapid Adaptation Probe and Group-MATES's oracle trajectories both ask "how does the loss on some
examples change if the model trains a few steps on these others?". A strategy describes the probes it wants
as a :class:`ProbeRequest` (pure data: pool indices); the callback runs them with :class:`ProbeRunner` and
hands the measured losses back as :class:`ProbeResults`, so strategies stay pure functions of signals.

What a probe task does, given ``ProbeTask(steps, eval_indices, eval_every_step)``:

1. measure ``L_0`` = mean per-example loss over ``eval_indices`` (pool examples) or, with
   ``eval_indices=None``, over the callback's reference set;
2. for each ``steps[t]`` (pool indices trained together): one optimizer step on their mean loss with the
   live optimizer (its current state and learning rate), then, with ``eval_every_step``, measure ``L_{t+1}``;
3. restore the model and optimizer to the snapshot taken before the task.

Evaluations are forward-only (``no_grad``, eval mode, every module's mode restored); training steps run in
train mode. Losses are the per-example losses the signal capture computes (cross-entropy of the head's
logits; token-mean cross-entropy for causal LMs), so probes work on every module the signals work on.

Safety: the snapshot covers parameters and buffers (``state_dict``), ``.grad`` of every parameter, the
optimizer state and hyperparameters (``optimizer.state_dict``), and the global RNG streams (the CPU
generator and the current CUDA device's, through :func:`torch.random.fork_rng`); the live run continues
bit-identically to a run without the probe. The AMP grad scaler is not touched (probe steps do not scale
their loss), so there is nothing of it to restore. Under DDP the tasks are sharded over ranks (task ``i``
on rank ``i % world``), run on the unwrapped module (no DDP forward, and gradients come from
``torch.autograd.grad``, so DDP's reducer hooks never fire), and the results are gathered: every rank gets
all of them.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from grace_lightning.seeding import derive_seed
from grace_lightning.signals.capture import inference_forward

__all__ = ["ModelSnapshot", "ProbeRequest", "ProbeResults", "ProbeRunner", "ProbeTask"]


@dataclass(frozen=True)
class ProbeTask:
    """One probe: train on ``steps`` in order from the snapshot, measuring the loss on ``eval_indices``.

    Attributes:
        steps: one 1-D int64 tensor of pool indices per optimizer step (a single index for single-example
            steps, as Group-MATES's oracle uses; the same slice repeated for GRIP's K adaptation steps).
        eval_indices: 1-D int64 pool indices whose mean loss is measured, or ``None`` for the reference set.
        eval_every_step: measure after every step (``len(steps) + 1`` losses) rather than only before the
            first and after the last (2 losses).
    """

    steps: tuple[Tensor, ...]
    eval_indices: Optional[Tensor] = None
    eval_every_step: bool = False

    @property
    def num_losses(self) -> int:
        return len(self.steps) + 1 if self.eval_every_step else 2


@dataclass(frozen=True)
class ProbeRequest:
    """The probes a strategy asks for before its selection.

    Attributes:
        tasks: the probe tasks; each starts from the same snapshot of the live model and optimizer.
        trainable: ``"all"`` (every parameter the optimizer holds) or ``"head"`` (only the output layer the
            signal capture found; the others keep their values, as with a frozen backbone).
        reset_head: re-initialise the head (``reset_parameters()``) at the start of every task, as GRIP's
            Partial Reset Protocol does; restored with the snapshot afterwards.
        seed: task ``i`` runs with the global generators seeded from ``(seed, i)`` (inside a forked RNG state,
            so the live run's streams are untouched): its dropout noise and head re-initialisation do not
            depend on which rank runs it or what ran before.
        keys: what each task stands for, for the strategy that reads the results (a cluster id per task, say);
            it comes back in :attr:`ProbeResults.request`, so no strategy keeps its request in hidden state.
    """

    tasks: tuple[ProbeTask, ...]
    trainable: str = "all"
    reset_head: bool = False
    seed: int = 0
    keys: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "head"):
            raise ValueError(f"ProbeRequest: `trainable` must be 'all' or 'head', got {self.trainable!r}.")
        if self.keys is not None and len(self.keys) != len(self.tasks):
            raise ValueError(f"ProbeRequest: `keys` must have one entry per task ({len(self.tasks)}), got {len(self.keys)}.")


@dataclass(frozen=True)
class ProbeResults:
    """What the probes measured, aligned with ``ProbeRequest.tasks``.

    Attributes:
        losses: one float64 tensor per task, of length ``task.num_losses`` (``L_0`` first).
        request: the request these results answer (its tasks and ``keys``).
        seconds: wall clock of all probes (max over ranks).
        optimizer_steps: probe optimizer steps taken, summed over ranks.
    """

    losses: tuple[Tensor, ...]
    request: Optional[ProbeRequest] = None
    seconds: float = 0.0
    optimizer_steps: int = 0
    diagnostics: dict[str, float] = field(default_factory=dict)


class ModelSnapshot:
    """An exact copy of a module's parameters, buffers and gradients and of optimizers' states, to restore later.

    ``restore()`` writes the values back into the *same* tensors (``copy_`` for parameters and buffers; the
    optimizer through ``load_state_dict``), so references the trainer holds stay valid. It may be called
    several times (once per probe task).

    Example::

        snapshot = ModelSnapshot(model, [optimizer])
        ...  # train a few steps
        snapshot.restore()  # bit-identical to before
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.module = module
        self.optimizers = list(optimizers)
        self._tensors = [(t, t.detach().clone()) for t in self._live_tensors()]
        self._grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
        self._optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]

    def _live_tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self._tensors:
                live.copy_(saved)
        for p, grad in self._grads:
            p.grad = None if grad is None else grad.clone()
        for opt, state in zip(self.optimizers, self._optimizer_states):
            # load_state_dict keeps the param groups' hyperparameters (the learning rate included) as saved,
            # and drops state created by the probe for parameters that had none.
            opt.load_state_dict(copy.deepcopy(state))


class ProbeRunner:
    """Runs probe tasks on a live module and its optimizers, leaving both exactly as it found them.

    Args:
        module: the (unwrapped) LightningModule; never the DDP wrapper.
        optimizers: the live optimizers (``trainer.optimizers``); each probe step steps all of them.
        example_losses: ``batch -> (B,)`` per-example losses with autograd (the signal extractor's).
        head: the output layer, for ``trainable="head"`` and ``reset_head``.
        dataset, collate_fn: the training pool and how its items become a batch.
        to_device: moves a collated batch to the module's device.
        reference: batches of the reference set (already collated), or None.
        eval_batch_size: batch size of loss evaluations on pool examples.
        forward_context: a factory of the precision plugin's forward context (autocast or a no-op).

    Example::

        runner = ProbeRunner(model, trainer.optimizers, extractor.example_losses, extractor.head, train_set,
                             None, lambda b: b, reference=None, eval_batch_size=256)
        losses = runner.run(request, task_ids=range(len(request.tasks)))
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        example_losses: Callable[[Any], Tensor],
        head: Optional[nn.Module],
        dataset: Dataset,
        collate_fn: Optional[Callable[[list], Any]],
        to_device: Callable[[Any], Any],
        reference: Optional[Iterable[Any]] = None,
        eval_batch_size: int = 256,
        forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> None:
        from torch.utils.data.dataloader import default_collate

        self.module = module
        self.optimizers = list(optimizers)
        self.example_losses = example_losses
        self.head = head
        self.dataset = dataset
        self.collate = collate_fn or default_collate
        self.to_device = to_device
        self.reference = None if reference is None else list(reference)
        self.eval_batch_size = int(eval_batch_size)
        self.forward_context = forward_context
        self.steps_taken = 0

    def _batch(self, indices: Tensor) -> Any:
        return self.to_device(self.collate([self.dataset[int(i)] for i in indices.tolist()]))

    def _mean_loss(self, eval_indices: Optional[Tensor]) -> float:
        """Mean per-example loss (float64 accumulation) in eval mode without grad; every module's mode restored."""
        if eval_indices is None:
            if self.reference is None:
                raise ValueError("a probe task evaluates on the reference set, but the callback has none")
            batches = [self.to_device(b) for b in self.reference]
        else:
            batches = [self._batch(eval_indices[s : s + self.eval_batch_size]) for s in range(0, eval_indices.numel(), self.eval_batch_size)]
        total, count = 0.0, 0
        with inference_forward(self.module, self.forward_context):
            for batch in batches:
                losses = self.example_losses(batch).double()
                total += float(losses.sum())
                count += losses.numel()
        return total / max(count, 1)

    def _step(self, indices: Tensor, params: list[nn.Parameter]) -> None:
        with self.forward_context():
            loss = self.example_losses(self._batch(indices)).float().mean()
        # autograd.grad, not backward: nothing accumulates into .grad behind our back and DDP's reducer hooks
        # (registered on the gradient accumulators) never fire.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p in self.module.parameters():
            p.grad = None  # parameters without a gradient are skipped by the optimizers
        for p, g in zip(params, grads):
            p.grad = g
        for opt in self.optimizers:
            opt.step()
        for p in params:
            p.grad = None
        self.steps_taken += 1

    def _trainable(self, request: ProbeRequest) -> list[nn.Parameter]:
        if request.trainable == "head":
            if self.head is None:
                raise ValueError("trainable='head' needs the output layer, and the signal capture found none")
            return [p for p in self.head.parameters() if p.requires_grad]
        return [p for p in self.module.parameters() if p.requires_grad]

    def run(self, request: ProbeRequest, task_ids: Iterable[int]) -> list[Tensor]:
        """Run ``request.tasks[i]`` for each ``i`` in ``task_ids``; return their losses (float64), in that order."""
        params = self._trainable(request)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        snapshot = ModelSnapshot(self.module, self.optimizers)
        out: list[Tensor] = []
        try:
            # fork_rng: dropout and re-initialisation inside probes draw from the global generators, which the
            # live run must find exactly as it left them.
            with torch.random.fork_rng(devices=devices):
                for i in task_ids:
                    task = request.tasks[i]
                    # Seeded per task: a task's dropout noise and head re-initialisation depend on (seed, i) only,
                    # not on which tasks ran before it on this rank.
                    torch.manual_seed(derive_seed(request.seed, i))
                    if request.reset_head and self.head is not None:
                        self.head.reset_parameters()  # type: ignore[operator]
                    losses = [self._mean_loss(task.eval_indices)]
                    for t, step in enumerate(task.steps):
                        self._step(step, params)
                        if task.eval_every_step or t == len(task.steps) - 1:
                            losses.append(self._mean_loss(task.eval_indices))
                    if not task.steps:
                        losses.append(losses[0])
                    out.append(torch.tensor(losses, dtype=torch.float64))
                    snapshot.restore()
        finally:
            snapshot.restore()
        return out

