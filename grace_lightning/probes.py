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

Head-only probes (``trainable="head"``) run on frozen features by default (``head_features="frozen"``): the body
runs once, in eval mode, over the distinct examples of a group of tasks (in batches of ``eval_batch_size``), and
the head's steps and evaluations reuse its output, so GRIP's probes of ``K`` steps on a few dozen examples each
share a few large forwards of the body instead of ``K + 2`` small ones each; only the head (with its optimizer
state) is restored between tasks.

Evaluations are forward-only (``no_grad``, eval mode, every module's mode restored); training steps run in
train mode. On a GPU the loop does not wait for the device: the losses stay on the device until every task has
been queued (and live tasks' batches are moved before the first step), so the Python loop launches the next step
while the device runs the last one (Group-MATES' single-example steps are a few small kernels each). Losses are
the per-example losses the signal capture computes (cross-entropy of the head's logits; token-mean cross-entropy
for causal LMs), so probes work on every module the signals work on.

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
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from grace_lightning.seeding import derive_seed
from grace_lightning.signals.capture import inference_forward
from grace_lightning.signals.closed_form import IGNORE_INDEX

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
        head_features: with ``trainable="head"``, where the head's inputs come from. ``"frozen"``: the body
            runs once per example, in eval mode (as a frozen backbone is used for a linear probe), and the
            head's steps and evaluations reuse its output; ``"live"``: every step runs the whole module in train
            mode (dropout and BatchNorm batch statistics in the body, restored afterwards). The two agree on a
            body without dropout or BatchNorm whose head does not share its weight with the body (GPT-2 ties
            its output layer to the input embedding: there a live step moves both).
    """

    tasks: tuple[ProbeTask, ...]
    trainable: str = "all"
    reset_head: bool = False
    seed: int = 0
    keys: Optional[Tensor] = None
    head_features: str = "frozen"

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "head"):
            raise ValueError(f"ProbeRequest: `trainable` must be 'all' or 'head', got {self.trainable!r}.")
        if self.head_features not in ("frozen", "live"):
            raise ValueError(f"ProbeRequest: `head_features` must be 'frozen' or 'live', got {self.head_features!r}.")
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


class _ParameterSnapshot:
    """The values and optimizer states of a few parameters (a head's), restored between the tasks of one run.

    Cheaper than a :class:`ModelSnapshot` when only these parameters move: restoring it copies them and their
    optimizers' per-parameter state (and the param groups' hyperparameters), not the whole model's.
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.params = list(params)
        self.optimizers = list(optimizers)
        self._values = [p.detach().clone() for p in self.params]
        self._states = [
            {id(p): copy.deepcopy(opt.state[p]) for p in self.params if p in opt.state} for opt in self.optimizers
        ]
        self._groups = [
            [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in opt.param_groups]
            for opt in self.optimizers
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, self._values):
                p.copy_(value)
        for p in self.params:
            p.grad = None
        for opt, states, groups in zip(self.optimizers, self._states, self._groups):
            for p in self.params:
                if id(p) in states:
                    opt.state[p] = copy.deepcopy(states[id(p)])
                else:
                    opt.state.pop(p, None)
            for group, saved in zip(opt.param_groups, groups):
                group.update(copy.deepcopy(saved))


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
        head_inputs, head_losses: ``example_losses`` split at the head (the extractor's
            :meth:`~grace_lightning.signals.SignalExtractor.head_inputs` and ``head_losses``), for head-only
            probes on frozen features (``ProbeRequest.head_features="frozen"``).

    Example::

        runner = ProbeRunner(model, trainer.optimizers, extractor.example_losses, extractor.head, train_set,
                             None, lambda b: b, reference=None, eval_batch_size=256,
                             head_inputs=extractor.head_inputs, head_losses=extractor.head_losses)
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
        head_inputs: Optional[Callable[[Any], tuple[Tensor, Tensor]]] = None,
        head_losses: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
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
        self.head_inputs = head_inputs
        self.head_losses = head_losses
        self.steps_taken = 0
        self._on_device: dict[tuple[int, ...], Any] = {}  # a run's batches, moved to the device before it starts

    def _batch(self, indices: Tensor) -> Any:
        moved = self._on_device.get((-1, *indices.tolist()))
        if moved is not None:
            return moved
        return self.to_device(self.collate([self.dataset[int(i)] for i in indices.tolist()]))

    def _move_batches(self, request: ProbeRequest, task_ids: list[int]) -> None:
        """Every batch the live tasks will read, on the device before the first step (held until the run ends), so
        that no step waits on a copy (a blocking one from the host waits for the device's queue). Probe tasks are
        small (single examples for Group-MATES)."""
        if self.reference is not None and any(request.tasks[i].eval_indices is None for i in task_ids):
            self._on_device[()] = self._eval_batches(None)
        for i in task_ids:
            task = request.tasks[i]
            chunks = () if task.eval_indices is None else self._eval_chunks(task.eval_indices)
            for indices in (*task.steps, *chunks):
                self._on_device[(-1, *indices.tolist())] = self._batch(indices)

    def _eval_chunks(self, eval_indices: Tensor) -> list[Tensor]:
        """``eval_indices`` in batches of ``eval_batch_size``."""
        return [eval_indices[s : s + self.eval_batch_size] for s in range(0, eval_indices.numel(), self.eval_batch_size)]

    def _eval_batches(self, eval_indices: Optional[Tensor]) -> list[Any]:
        """The batches a loss evaluation runs over: the reference set's, or ``eval_indices`` in chunks."""
        if eval_indices is None:
            if self.reference is None:
                raise ValueError("a probe task evaluates on the reference set, but the callback has none")
            if () in self._on_device:
                return self._on_device[()]
            return [self.to_device(b) for b in self.reference]
        return [self._batch(chunk) for chunk in self._eval_chunks(eval_indices)]

    def _mean_loss(self, eval_indices: Optional[Tensor]) -> Tensor:
        """Mean per-example loss in eval mode without grad (a float64 scalar on the device, read after the run);
        every module's mode restored."""
        with inference_forward(self.module, self.forward_context):
            return _mean(self.example_losses(batch) for batch in self._eval_batches(eval_indices))

    def _apply(self, loss: Tensor, params: list[nn.Parameter]) -> None:
        """One optimizer step of every optimizer on ``loss``'s gradient with respect to ``params`` only."""
        # autograd.grad, not backward: nothing accumulates into .grad behind our back and DDP's reducer hooks
        # (registered on the gradient accumulators) never fire.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        for opt in self.optimizers:
            opt.step()
        for p in params:
            p.grad = None
        self.steps_taken += 1

    def _step(self, indices: Tensor, params: list[nn.Parameter]) -> None:
        with self.forward_context():
            loss = self.example_losses(self._batch(indices)).float().mean()
        for p in self.module.parameters():
            p.grad = None  # parameters without a gradient are skipped by the optimizers
        self._apply(loss, params)

    def _trainable(self, request: ProbeRequest) -> list[nn.Parameter]:
        if request.trainable == "head":
            if self.head is None:
                raise ValueError("trainable='head' needs the output layer, and the signal capture found none")
            return [p for p in self.head.parameters() if p.requires_grad]
        return [p for p in self.module.parameters() if p.requires_grad]

    def run(self, request: ProbeRequest, task_ids: Iterable[int]) -> list[Tensor]:
        """Run ``request.tasks[i]`` for each ``i`` in ``task_ids``; return their losses (float64), in that order."""
        params = self._trainable(request)
        task_ids = list(task_ids)
        frozen = request.trainable == "head" and request.head_features == "frozen"
        if frozen and (self.head_inputs is None or self.head_losses is None):
            raise ValueError("head_features='frozen' needs the runner's `head_inputs` and `head_losses`")
        snapshot = ModelSnapshot(self.module, self.optimizers)
        # On frozen features only the head moves: restoring it between tasks is enough (the whole model is
        # restored once at the end), and stale gradients of the body must not reach the optimizers' steps.
        between_tasks = _ParameterSnapshot(params, self.optimizers) if frozen else snapshot
        if frozen:
            for p in self.module.parameters():
                p.grad = None
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        out: dict[int, list[Tensor]] = {}  # losses stay on the device until every task has been queued
        initial: dict[tuple[int, ...], Tensor] = {}  # the first loss of live tasks, by evaluated examples
        if not frozen:
            self._move_batches(request, task_ids)
        try:
            # fork_rng: dropout and re-initialisation inside probes draw from the global generators, which the
            # live run must find exactly as it left them.
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
                groups = self._feature_groups(request, task_ids) if frozen else [(task_ids, None)]
                for group, features in groups:
                    for i in group:
                        task = request.tasks[i]
                        # Seeded per task: a task's dropout noise and head re-initialisation depend on (seed, i)
                        # only, not on which tasks ran before it on this rank. The CPU generator and the current
                        # device's, as fork_rng saves (torch.manual_seed would also queue a seed for every CUDA
                        # device, with a stack trace, when CUDA is not initialised: a millisecond a task).
                        seed = derive_seed(request.seed, i)
                        torch.default_generator.manual_seed(seed)
                        if cuda:
                            torch.cuda.manual_seed(seed)
                        if request.reset_head and self.head is not None:
                            self.head.reset_parameters()  # type: ignore[operator]
                        if features is None:
                            # Every task starts from the snapshot: without a head reset, tasks evaluated on the same
                            # examples share their first loss, measured once (Group-MATES' trajectories all
                            # start on the reference set).
                            key = None if request.reset_head else _eval_key(task.eval_indices)
                            losses = self._live_task(task, params, initial.get(key) if key is not None else None)
                            if key is not None:
                                initial.setdefault(key, losses[0])
                        else:
                            losses = self._frozen_task(task, params, features)
                        out[i] = losses
                        between_tasks.restore()
        finally:
            snapshot.restore()
            self._on_device.clear()
        return [torch.tensor([float(v) for v in out[i]], dtype=torch.float64) for i in task_ids]

    def _live_task(self, task: ProbeTask, params: list[nn.Parameter], initial: Optional[Tensor] = None) -> list[Tensor]:
        """Steps on the whole module's forward; ``initial``: the loss before the first step, if already measured."""
        first = self._mean_loss(task.eval_indices) if initial is None else initial
        return _trajectory(
            task, first, lambda step: self._step(step, params), lambda: self._mean_loss(task.eval_indices)
        )

    def _feature_groups(self, request: ProbeRequest, task_ids: list[int]) -> Iterator[tuple[list[int], "_Features"]]:
        """Tasks in groups of about one evaluation batch of distinct examples, with the body's features of each group.

        The body runs over a group's examples in batches of ``eval_batch_size`` (a GRIP probe has a few dozen,
        so one forward serves many tasks), and over the reference set once; only one group's features are held
        at a time.
        """
        reference: Optional[list[tuple[Tensor, Tensor]]] = None
        if any(request.tasks[i].eval_indices is None for i in task_ids):
            reference = self._features(self._eval_batches(None))
        group: list[int] = []
        examples: set[int] = set()
        for position, i in enumerate(task_ids):
            task = request.tasks[i]
            group.append(i)
            for indices in (*task.steps, task.eval_indices):
                if indices is not None:
                    examples.update(indices.tolist())
            last = position == len(task_ids) - 1
            if last or len(examples) >= self.eval_batch_size:
                ids = torch.tensor(sorted(examples), dtype=torch.int64)
                batches = self._eval_chunks(ids)
                rows: dict[int, tuple[Tensor, Tensor]] = {}
                for chunk, (inputs, targets) in zip(batches, self._features([self._batch(c) for c in batches])):
                    rows.update((int(e), (inputs[r], targets[r])) for r, e in enumerate(chunk.tolist()))
                yield group, _Features(rows, reference)
                group, examples = [], set()

    def _features(self, batches: list[Any]) -> list[tuple[Tensor, Tensor]]:
        """The head's inputs and loss targets of each batch, from the body in eval mode."""
        assert self.head_inputs is not None
        with inference_forward(self.module, self.forward_context):
            return [self.head_inputs(batch) for batch in batches]

    def _frozen_task(self, task: ProbeTask, params: list[nn.Parameter], features: "_Features") -> list[Tensor]:
        """A head-only task on the body's features: the head alone trains and is evaluated."""
        assert self.head is not None and self.head_losses is not None
        head_losses = self.head_losses
        if task.eval_indices is None:
            evaluated = features.reference
        else:  # no examples: a mean loss of 0, as the live path's
            evaluated = [features.batch(task.eval_indices)] if task.eval_indices.numel() else []
        assert evaluated is not None
        stacked: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # GRIP repeats one slice for every step

        def mean_loss() -> Tensor:
            with inference_forward(self.head, self.forward_context):
                return _mean(head_losses(inputs, targets) for inputs, targets in evaluated)

        def step(indices: Tensor) -> None:
            key = tuple(indices.tolist())
            if key not in stacked:
                stacked[key] = features.batch(indices)
            with self.forward_context():
                loss = head_losses(*stacked[key]).float().mean()
            self._apply(loss, params)

        return _trajectory(task, mean_loss(), step, mean_loss)


def _trajectory(
    task: ProbeTask, first: Tensor, step: Callable[[Tensor], None], evaluate: Callable[[], Tensor]
) -> list[Tensor]:
    """A task's losses ``[L_0, ...]``: ``step`` on each of its steps, ``evaluate`` after each (or after the last)."""
    losses = [first]
    for t, indices in enumerate(task.steps):
        step(indices)
        if task.eval_every_step or t == len(task.steps) - 1:
            losses.append(evaluate())
    if not task.steps:
        losses.append(losses[0])
    return losses


def _mean(losses: Iterable[Tensor]) -> Tensor:
    """Mean of per-example losses over batches, accumulated in float64 (0 for no examples): a scalar on the losses'
    device, so that the device is not waited for here."""
    total: Optional[Tensor] = None
    count = 0
    for batch_losses in losses:
        values = batch_losses.double()
        total = values.sum() if total is None else total + values.sum()  # a running float's IEEE additions
        count += values.numel()
    return torch.zeros((), dtype=torch.float64) if total is None else total / max(count, 1)


def _eval_key(eval_indices: Optional[Tensor]) -> tuple[int, ...]:
    """What a task evaluates on, as a dictionary key: ``()`` for the reference set, else its pool indices."""
    return () if eval_indices is None else (-1, *eval_indices.tolist())


class _Features:
    """The body's output for a group of probe examples (one row each) and for the reference set's batches."""

    def __init__(self, rows: dict[int, tuple[Tensor, Tensor]], reference: Optional[list[tuple[Tensor, Tensor]]]) -> None:
        self.rows = rows
        self.reference = reference

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of ``indices``, stacked; sequences of different padded lengths are padded again to the longest
        (features with zeros, labels with the ignored index, so the padding carries no loss)."""
        inputs = [self.rows[int(i)][0] for i in indices.tolist()]
        targets = [self.rows[int(i)][1] for i in indices.tolist()]
        if inputs[0].ndim == 2 and targets[0].ndim == 1:  # (T, D) and (T,) per sequence: causal LM
            length = max(x.shape[0] for x in inputs)
            inputs = [F.pad(x, (0, 0, 0, length - x.shape[0])) for x in inputs]
            targets = [F.pad(y, (0, length - y.shape[0]), value=IGNORE_INDEX) for y in targets]
        return torch.stack(inputs), torch.stack(targets)
