"""Overlapped selection: a strategy's selection runs in a background thread while training goes on.

The callback measures and probes on the training thread (both need the model), then hands the strategy's
``select`` to :class:`SelectionWorker` and training continues on the current subset. At the schedule's *next*
refresh (run or skipped by the overhead budget) the callback collects the result and puts it into force from
there; a refresh followed by no other (the last one, or the one before the anneal) runs synchronously. The hand-over step is fixed by the schedule, never by when the thread finishes, so a run is
as much a function of its seed as a synchronous one: it computes the same selection from the same signals, one
refresh period later. Only the seconds the training thread waits at the hand-over (``exposed``) count as
selection time; the rest ran beside training (``hidden``).

Strategy math is numpy, faiss and torch CPU kernels, which release the GIL for their heavy parts, so the thread
takes little from the training loop where a core is free (always, where a GPU trains). On a small CPU machine
the two share the cores, and the thread costs more than it hides: ``overlap="auto"`` leaves it off there.

From a submission to its hand-over, the BLAS libraries with a process-wide thread pool (numpy's OpenBLAS; not
torch's, and not those threaded by OpenMP, whose thread count is per calling thread) run on one thread; the
training thread sets and lifts the limit, as threadpoolctl lets only one thread control such a pool. The
strategies' greedy loops make thousands of small matrix products, where a pool of one thread a core spins
against the training loop's threads: on one H200 with 16 cores GIP's greedy (60k x 128, budget 18k) took 3.8 s
beside training with numpy's default pool and 2.1 s with one thread, Group-MATES' clustered greedy 2.5 s and
1.1 s (``benchmarks/blas_contention.py``, ``benchmarks/results/gpu_check/run4``). Numpy products the training
thread makes meanwhile run on one thread too.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from grace_lightning.strategies.base import Selection

__all__ = ["PendingSelection", "SelectionWorker"]


@dataclass
class PendingSelection:
    """A selection computed (or being computed) from one refresh's signals, waiting for its hand-over.

    Attributes:
        numbers: the refresh's own telemetry taken when it was submitted (scored examples, phase seconds, ...).
        prepared_seconds: seconds the training thread spent measuring and probing for it (max over ranks).
        selection: the result, once collected (rank 0; ``None`` on other ranks, which receive it by broadcast).
        worker_seconds: seconds the strategy's ``select`` ran in the background thread.
        waited_seconds: seconds the training thread waited for it at the hand-over (or at a checkpoint).
    """

    numbers: dict[str, float]
    prepared_seconds: float
    selection: Optional[Selection] = None
    worker_seconds: float = 0.0
    waited_seconds: float = 0.0
    future: Optional[Future] = field(default=None, repr=False)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the finished result (call :meth:`SelectionWorker.finish` first)."""
        selection = self.selection
        return {
            "numbers": dict(self.numbers),
            "prepared_seconds": self.prepared_seconds,
            "worker_seconds": self.worker_seconds,
            "waited_seconds": self.waited_seconds,
            "selection": None
            if selection is None
            else {"indices": selection.indices, "weights": selection.weights, "diagnostics": dict(selection.diagnostics)},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PendingSelection":
        saved = state["selection"]
        selection = None if saved is None else Selection(saved["indices"], saved["weights"], dict(saved["diagnostics"]))
        return cls(
            numbers=dict(state["numbers"]),
            prepared_seconds=float(state["prepared_seconds"]),
            selection=selection,
            worker_seconds=float(state["worker_seconds"]),
            waited_seconds=float(state["waited_seconds"]),
        )


class SelectionWorker:
    """One background thread that runs one selection at a time.

    Example::

        worker = SelectionWorker()
        pending = PendingSelection(numbers={}, prepared_seconds=0.0)
        worker.submit(pending, lambda: strategy.select(inputs))
        ...                                    # training goes on
        worker.finish(pending)                 # waits only if the thread is not done yet
        pending.selection, pending.waited_seconds
        worker.close()
    """

    def __init__(self) -> None:
        self._executor: Optional[ThreadPoolExecutor] = None
        self._faiss_threads = 1
        self._blas_pools: Any = None
        self._blas_limit = ExitStack()  # holds the one-thread limit from a submission to its hand-over

    def submit(self, pending: PendingSelection, select: Callable[[], Selection]) -> None:
        """Start ``select()`` in the background; its result lands in ``pending`` at :meth:`finish`."""
        if self._executor is None:
            import faiss

            # One core fewer than this process's share, so the thread does not crowd out the training loop.
            self._faiss_threads = max(1, faiss.omp_get_max_threads() - 1)
            # A new thread starts on CUDA device 0: give it this rank's, for strategies that compute on "cuda".
            cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="coreset-selection",
                initializer=_init_thread,
                initargs=(self._faiss_threads, cuda),
            )
            self._blas_pools = process_wide_blas()
        self._blas_limit.close()
        self._blas_limit.enter_context(self._blas_pools.limit(limits=1))
        pending.future = self._executor.submit(_timed, select)

    def finish(self, pending: PendingSelection) -> None:
        """Wait for ``pending``'s thread (if it runs) and move its result in; re-raises the strategy's error."""
        if pending.future is None:
            return
        began = time.perf_counter()
        future, pending.future = pending.future, None
        try:
            selection, seconds = future.result()
        finally:
            self._blas_limit.close()
        pending.waited_seconds += time.perf_counter() - began
        pending.selection, pending.worker_seconds = selection, seconds

    def close(self) -> None:
        """Stop the thread (after the selection it runs, if any) and lift the BLAS limit."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._blas_limit.close()


def _init_thread(faiss_threads: int, cuda_device: Optional[int]) -> None:
    # OpenMP's thread count is per calling thread: this leaves the training thread's own setting alone.
    import faiss

    faiss.omp_set_num_threads(faiss_threads)
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)


def process_wide_blas() -> Any:
    """A ``threadpoolctl.ThreadpoolController`` of the loaded BLAS libraries whose thread pool is process-wide.

    Those threaded by OpenMP are left out (their thread count is per calling thread; faiss's follows
    ``faiss.omp_set_num_threads`` in the selection thread), and so are torch's own, which the training loop uses.
    """
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    paths = [
        lib["filepath"]
        for lib in controller.info()
        if lib["user_api"] == "blas"
        and lib.get("threading_layer") != "openmp"
        # torch's wheels keep their libraries in torch/lib or torch.libs
        and not {"torch", "torch.libs"} & set(os.path.realpath(lib["filepath"]).split(os.sep))
    ]
    return controller.select(filepath=paths)


def _timed(select: Callable[[], Selection]) -> tuple[Selection, float]:
    began = time.perf_counter()
    selection = select()
    return selection, time.perf_counter() - began
