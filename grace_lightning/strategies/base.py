"""What every strategy receives and returns, and the registry that maps names to strategies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from grace_lightning.probes import ProbeRequest, ProbeResults
from grace_lightning.signals.store import SignalStore
from grace_lightning.signals.types import ExampleSignals, signal_names
from grace_lightning.validation import non_negative_float

__all__ = ["Selection", "SelectionInput", "Strategy", "StrategyState", "register_strategy", "build_strategy", "available_strategies"]


@dataclass(frozen=True)
class Selection:
    """A strategy's answer: which pool examples to train on, and with what weight.

    Attributes:
        indices: ``(M,)`` int64 dataset indices. ``None`` means the whole pool.
        weights: ``(M,)`` float32 non-negative per-example weights, or ``None`` for all ones. Weights are
            scaled so that a plain mean over a batch of ``loss * weight`` estimates what the strategy means
            to optimise (e.g. InfoBatch's ``1/(1-r)`` keeps the full-data gradient unbiased).
    """

    indices: Optional[Tensor]
    weights: Optional[Tensor] = None
    diagnostics: dict[str, float] = field(default_factory=dict)


class StrategyState(Protocol):
    """A strategy's memory between refreshes (GRACE's k-NN graph, for instance), checkpointed by the callback.

    ``state_dict`` must return tensors, numbers, strings, lists and dicts only (checkpoints load with
    ``weights_only=True``).
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SelectionInput:
    """Everything a strategy may look at. Built by the callback; strategies must not mutate it.

    Attributes:
        pool_size: number of examples in the pool (``len(dataset)``).
        budget: examples trained per epoch (the sampler's budget).
        store: per-example signals measured so far (finite values only; see :class:`SignalStore`), or
            ``None`` for a strategy that reads no signals.
        generator: a private, seeded generator; the only source of randomness a strategy may use.
        epoch: the epoch the selection will first be used in.
        step: the global batch position the selection will first be used at.
        progress: share of training done, in ``[0, 1]`` (``None`` when the run has no fixed length).
        now_batch: the global batch position training has reached (signals measured now carry it).
        state: the strategy's own memory from :meth:`Strategy.create_state` (``None`` if it keeps none).
            Only the strategy reads or updates it; selection runs on rank 0, so only rank 0's copy is live.
        fidelity: in ``(0, 1]``; below 1 when the callback's overhead budget is exceeded, asking the strategy
            to spend proportionally less on scoring (e.g. fewer anchors).
        reference: the reference set's signals measured by the live model at this refresh (``loss``,
            ``grad_norm``, ``embedding`` in the store's space, i.e. projected like the pool's; float32, CPU), or
            ``None`` when the callback has no reference set or the strategy does not read it.
        quality: ``(N,)`` float32 user quality scores of the pool examples (``CoresetCallback(quality=...)``),
            or ``None``.
        probe: in :meth:`Strategy.select` only, the results of the probes :meth:`Strategy.to_probe` asked
            for at this refresh (``None`` when it asked for none).
    """

    pool_size: int
    budget: int
    store: Optional[SignalStore]
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    progress: Optional[float] = None
    now_batch: int = 0
    state: Any = None
    fidelity: float = 1.0
    reference: Optional[ExampleSignals] = None
    quality: Optional[Tensor] = None
    probe: Optional[ProbeResults] = None


class Strategy:
    """Base class of selection strategies: a pure function from :class:`SelectionInput` to :class:`Selection`.

    Subclasses set ``name``, list the signals they read in ``needs`` (``"loss"``, ``"grad_norm"``,
    ``"embedding"``, ...; the store keeps no other optional signal), say whether they read a reference set in ``reference`` (``"unused"``, ``"optional"``
    or ``"required"``) and quality scores in ``uses_quality``, and implement :meth:`select`. A strategy never
    touches the trainer, the sampler or any global state; the callback validates and applies what it returns.
    Per refresh the callback calls :meth:`to_score`, runs that scoring pass, asks :meth:`is_cold`; if so it takes
    :meth:`cold_start`'s subset; else it calls :meth:`to_probe`, runs those probes, then calls :meth:`select`
    with the probe results (and the request they answer) in ``inputs.probe``. How to write one:
    ``grace_lightning/strategies/README.md``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    reference: ClassVar[str] = "unused"
    uses_quality: ClassVar[bool] = False  # whether select() reads inputs.quality (the callback warns if unused)
    # Whether the callback's overlap="auto" runs select() in a background thread: worth it for costly math
    # (graphs, clustering, greedy), not for a cheap strategy whose subset should follow its signals at once.
    overlap_by_default: ClassVar[bool] = False
    # Whether select() reads the reference set's embeddings (inputs.reference.embedding): with fixed pool
    # embeddings (CoresetCallback(embeddings=...)) the reference's must then come from the same encoder.
    reads_reference_embedding: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.needs) - signal_names()
        if unknown:
            raise TypeError(
                f"Strategy {cls.__name__}: `needs` lists {sorted(unknown)}, which are not signals; the signals are "
                f"{sorted(signal_names())} (declared on grace_lightning.ExampleSignals)."
            )
        if cls.reference not in ("unused", "optional", "required"):
            raise TypeError(f"Strategy {cls.__name__}: `reference` must be 'unused', 'optional' or 'required'.")

    def model_needs(self, store: Optional[SignalStore]) -> frozenset[str]:
        """The signals of :attr:`needs` the live model must measure: those the store was not given up front."""
        return self.needs - (store.fixed if store is not None else frozenset())

    def is_cold(self, inputs: SelectionInput) -> bool:
        """Whether nothing informs a selection yet: the model must measure signals and none was measured.

        Then the refresh runs no probes (an untrained model's answers carry no information) and takes
        :meth:`cold_start`'s subset instead of :meth:`select`'s.
        """
        needed = self.model_needs(inputs.store)
        return bool(needed) and inputs.store is not None and not bool(inputs.store.measured.any())

    def cold_start(self, inputs: SelectionInput) -> Selection:
        """The selection when :meth:`is_cold`: a uniform subset of the budget's size."""
        return Selection(uniform_sample(inputs.pool_size, inputs.budget, inputs.generator))

    def check_inputs(self, has_reference: bool, has_quality: bool) -> None:
        """Raise ``ValueError`` (saying how to fix it) if the callback lacks an input this strategy needs.

        Called by the callback at ``setup``, before any training. The default enforces ``reference == "required"``.
        """
        if self.reference == "required" and not has_reference:
            raise ValueError(
                f"Strategy {self.name!r} measures influence on a reference set, and the callback has none: pass "
                "CoresetCallback(..., reference=my_reference_dataset) (a Dataset or DataLoader of examples in the "
                "training batch format, e.g. 64-256 held-out examples of the target task)."
            )

    def check_embedding_source(self, fixed: bool) -> None:
        """Raise ``ValueError`` (saying how to fix it) if a setting needs embeddings from elsewhere than they come.

        Called by the callback at construction; ``fixed`` is whether the pool's embeddings are given up front
        (``CoresetCallback(embeddings=...)``) rather than measured on the live model. The default accepts both.
        """

    def to_probe(self, inputs: SelectionInput) -> Optional[ProbeRequest]:
        """Probes (optimizer steps on a restored snapshot) to run before :meth:`select`; None (default) for none."""
        return None

    def create_state(self, pool_size: int) -> Optional[StrategyState]:
        """The memory this strategy keeps between refreshes, or None (the default: a memoryless strategy)."""
        return None

    #: Examples a refresh rescores beyond what was never measured, stalest first, as a share of the budget
    #: (:func:`stalest_first`); None rescores the whole pool.
    rescore_share: Optional[float] = None

    def to_score(self, inputs: SelectionInput) -> Optional[Tensor]:
        """Pool indices (int64) the scoring pass should measure before :meth:`select`; None for none.

        The default, for a strategy that reads signals: everything never measured, plus the stalest
        ``rescore_share`` times the budget (the whole pool when it is None, the default). Strategies that choose
        what to rescore otherwise (GRACE's anchors) override this. Nothing when every signal read was given up
        front.
        """
        return stalest_first(inputs, self.rescore_share) if self.model_needs(inputs.store) else None

    def select(self, inputs: SelectionInput) -> Selection:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, Callable[..., Strategy]] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator that makes a strategy constructible by name (``CoresetCallback(strategy=name)``)."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_strategies() -> list[str]:
    """Names accepted by :func:`build_strategy`, sorted."""
    return sorted(_REGISTRY)


def build_strategy(strategy: Union[str, Strategy], **kwargs) -> Strategy:
    """Return ``strategy`` itself, or construct the registered strategy of that name with ``kwargs``."""
    if isinstance(strategy, Strategy):
        if kwargs:
            raise ValueError("`strategy_kwargs` only apply when `strategy` is given by name.")
        return strategy
    if not isinstance(strategy, str) or strategy not in _REGISTRY:
        raise ValueError(
            f"Unknown `strategy` {strategy!r}; choose one of {available_strategies()} or pass a Strategy instance."
        )
    if "rescore_fraction" in kwargs:
        raise ValueError(
            "`rescore_fraction` (a share of the pool) was replaced by `rescore_share`, a share of the budget: "
            "rescore_share=r rescores r times the budget's examples a refresh (e.g. 0.25); pass rescore_share=None "
            "to rescore the whole pool."
        )
    try:
        return _REGISTRY[strategy](**kwargs)
    except TypeError as err:
        raise ValueError(f"`strategy_kwargs` do not fit strategy {strategy!r}: {err}") from err


def check_selection(strategy: Strategy, selection: Any) -> Selection:
    """``selection`` if it is a well-formed :class:`Selection`; else TypeError/ValueError naming the strategy."""
    if not isinstance(selection, Selection):
        raise TypeError(f"Strategy {strategy!r} returned {type(selection).__name__}; `select` must return a Selection.")
    if selection.indices is not None:
        if selection.indices.dtype != torch.int64:
            raise TypeError(f"Strategy {strategy!r} returned {selection.indices.dtype} indices; use int64.")
        if selection.indices.numel() == 0:
            raise ValueError(f"Strategy {strategy!r} selected no example.")
    return selection


def require_embeddings(store: Optional[SignalStore], strategy: str) -> None:
    """Raise the error that says how to provide embeddings when ``store`` holds none (for strategies that read them)."""
    if store is None or store.embedding is None:
        raise ValueError(
            f"{strategy}: no embeddings were measured; the module's signal capture must return `embedding` "
            "(the head's input). Implement `coreset_signals` returning ExampleSignals(embedding=...)."
        )


def rescore_share_arg(owner: str, value: Optional[float]) -> Optional[float]:
    """A strategy's validated ``rescore_share``: a share of the budget ``>= 0``, or None for the whole pool."""
    if value is None:
        return None
    return non_negative_float(owner, "rescore_share", value, hint=" (e.g. 0.25 of the budget), or None for the whole pool")


def stalest_first(inputs: SelectionInput, share: Optional[float]) -> Optional[Tensor]:
    """What a refresh should rescore: every example never measured, plus the ``share · fidelity · budget``
    examples measured longest ago (ties broken by the seeded generator, not by index), sorted; None when nothing.

    The examples trained since the last refresh were measured for free, so they are the freshest and come last;
    ``share=None`` rescores the whole pool every refresh (its ``fidelity`` share under an overhead budget). A share
    of the *budget*, not of the pool, so that the rescoring costs the same share of training whatever the budget:
    an epoch trains the budget's examples, and rescoring ``share`` times as many costs about ``share / r`` of it
    (``r``: how much faster a forward-only pass runs than a training step, 3-5 on the bench's models).
    """
    store = inputs.store
    if store is None:
        return None
    unmeasured = ~store.measured
    if share is None:
        count = int(round(inputs.fidelity * inputs.pool_size))
    else:
        count = int(round(share * inputs.fidelity * inputs.budget))
    if count >= inputs.pool_size:
        return torch.arange(inputs.pool_size)
    if count > 0:
        last = store.last_step.numpy().astype(np.int64)
        last[unmeasured.numpy()] = np.iinfo(np.int64).max  # already chosen: rank them last
        stalest = top_k_random_ties(-last, min(count, int((~unmeasured).sum())), inputs.generator)
        unmeasured[torch.from_numpy(stalest)] = True
    chosen = unmeasured.nonzero().squeeze(1)
    return chosen if chosen.numel() else None


def uniform_draw(items: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct entries of ``items`` drawn uniformly, in draw order (how strategies fill a budget
    their informed picks cannot cover, e.g. with unmeasured examples)."""
    return items[torch.randperm(items.numel(), generator=generator)[:count]]


def uniform_sample(pool_size: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct pool indices drawn uniformly (sorted, int64): the shared cold-start draw."""
    return torch.randperm(pool_size, generator=generator)[:count].sort().values


def top_positions(keys: np.ndarray, count: int) -> np.ndarray:
    """``np.argsort(-keys, kind="stable")[:count]`` without sorting all the keys: those above the ``count``-th largest,
    then its ties in index order, sorted stably (a refresh takes 10-50% of a pool this way; 4x faster at 60k).

    Example::

        >>> top_positions(np.array([0.5, 2.0, 0.5, 1.0]), 3).tolist()
        [1, 3, 0]
    """
    keys = np.asarray(keys)
    n = keys.shape[0]
    if not 0 < count < n or np.isnan(keys).any():
        return np.argsort(-keys, kind="stable")[:count]
    threshold = keys[np.argpartition(-keys, count - 1)[:count]].min()
    above = np.flatnonzero(keys > threshold)
    chosen = np.concatenate([above, np.flatnonzero(keys == threshold)[: count - above.size]])
    return chosen[np.argsort(-keys[chosen], kind="stable")]


def top_k_random_ties(scores: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """Positions of the ``count`` highest ``scores``, best first, ties broken by ``generator`` rather than by index
    (a seeded random order first, then :func:`top_positions`' stable partial sort)."""
    shuffled = torch.randperm(len(scores), generator=generator).numpy()
    return shuffled[top_positions(np.asarray(scores)[shuffled], count)]


def gumbel_top_k(probabilities: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    """Positions of ``count`` draws without replacement ∝ ``probabilities`` (Gumbel-top-k on ``generator`` noise)."""
    n = len(probabilities)
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12).numpy()
    with np.errstate(divide="ignore"):
        keys = np.log(np.asarray(probabilities, dtype=np.float64)) - np.log(-np.log(u))
    return top_positions(keys, count)
