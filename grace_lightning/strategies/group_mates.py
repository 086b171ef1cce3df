"""``group_mates``: oracle influence trajectories, a relational influence model fit in-loop, clustered greedy.

After Yu, Peng, Lei, Overwijk, Yih, Xiong, *Group-Level Data Selection for Efficient Pretraining*
(Group-MATES, arXiv:2502.14709v2, NeurIPS 2025; official code ``facebookresearch/Group-MATES``), which
extends MATES (Yu, Das, Xiong, NeurIPS 2024, arXiv:2406.06046) from individual to group-level influence.
Where the paper and the code disagree, this follows the code; see the ``group_mates`` section of
``grace_lightning/strategies/README.md``. Everything runs in the training loop on the live model: the oracle
is a probe on a snapshot, the embeddings are the store's (the head's input), and the influence model is a
linear head plus two scalars.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from grace_lightning.clustering import spherical_kmeans
from grace_lightning.probes import ProbeRequest, ProbeTask
from grace_lightning.strategies.apportion import largest_remainder
from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    register_strategy,
    require_embeddings,
    rescore_share_arg,
    uniform_draw,
    uniform_sample,
)
from grace_lightning.validation import boolean, integer, non_negative_float, positive_float, positive_int

__all__ = [
    "GroupMates",
    "GroupMatesState",
    "RelationalFit",
    "cluster_budgets",
    "clustered_group_selection",
    "default_clusters",
    "fit_relational_model",
    "greedy_group_selection",
    "prefix_similarity",
    "relational_predictions",
]

# temp lives in [1/100, 100]: below, the bracket is all similarity; above, it is constant (no relational effect).
_LOG_TEMP_BOUND = math.log(100.0)
# Keeps the ridge solve defined at l2 = 0 with fewer positions than dimensions.
_JITTER = 1e-9


# ---------------------------------------------------------------------- the relational influence model
@dataclass(frozen=True)
class RelationalFit:
    """A fitted relational influence model ``pred_t = c_t · (w · h_t)`` (see :func:`fit_relational_model`).

    Attributes:
        w: ``(d,)`` float64 head: ``w · h`` is an example's individual influence.
        alpha: scale of the relational bracket (``> 0``).
        temp: similarity temperature of the bracket (in ``[0.01, 100]``).
        mse: mean squared error of the predictions on the labels fitted (without the L2 term).
    """

    w: Tensor
    alpha: float
    temp: float
    mse: float


def prefix_similarity(embeddings: Tensor) -> Tensor:
    """``(n, T)`` float64 mean similarity ``mean_{j<t} h_t · h_j`` of each position to its prefix (0 at ``t = 0``)."""
    h = embeddings.to(torch.float64)
    length = h.shape[1]
    earlier = torch.tril(torch.ones(length, length, dtype=torch.bool), diagonal=-1)
    sums = ((h @ h.transpose(1, 2)) * earlier).sum(dim=-1)
    return sums / torch.arange(length, dtype=torch.float64).clamp(min=1)


def _bracket(similarity: Tensor, alpha, temp) -> Tensor:
    """``c_t``: 1 at the first position, ``alpha · mean_{j<t}(1 − h_t·h_j / temp)`` after it."""
    first = torch.zeros_like(similarity, dtype=torch.bool)
    first[:, 0] = True
    return torch.where(first, torch.ones_like(similarity), alpha * (1.0 - similarity / temp))


def relational_predictions(embeddings: Tensor, w: Tensor, alpha: float, temp: float) -> Tensor:
    r"""Predicted marginal influence of each trajectory position, in the official code's form.

    ``s_t = w · h_t``; ``pred_0 = s_0``; ``pred_t = alpha · s_t · mean_{j<t}(1 − h_t·h_j / temp)`` for ``t ≥ 1``
    (Group-MATES ``RelationalModel.forward``). Lower is better (a larger drop of the reference loss).

    Args:
        embeddings: ``(n, T, d)`` embeddings of ``n`` trajectories of ``T`` examples, in training order.
        w: ``(d,)`` individual-influence head.
        alpha, temp: the relational scalars.

    Returns:
        ``(n, T)`` float64 predictions.

    Example::

        >>> h = torch.nn.functional.normalize(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
        >>> relational_predictions(h, torch.ones(4, dtype=torch.float64), 1.0, 1.0).shape
        torch.Size([2, 3])
    """
    h = embeddings.to(torch.float64)
    return (h @ w.to(torch.float64)) * _bracket(prefix_similarity(h), alpha, temp)


def _temp_of(raw: Tensor) -> Tensor:
    return torch.exp(_LOG_TEMP_BOUND * torch.tanh(raw / _LOG_TEMP_BOUND))


def _raw_of(temp: float) -> float:
    log_temp = min(max(math.log(temp), -0.999 * _LOG_TEMP_BOUND), 0.999 * _LOG_TEMP_BOUND)
    return _LOG_TEMP_BOUND * math.atanh(log_temp / _LOG_TEMP_BOUND)


def fit_relational_model(
    embeddings: Tensor,
    labels: Tensor,
    *,
    iterations: int = 100,
    lr: float = 1.0,
    l2: float = 1e-2,
    alpha_init: float = 1.0,
    temp_init: float = 1.0,
) -> RelationalFit:
    r"""Fit ``w``, ``alpha``, ``temp`` of :func:`relational_predictions` to ``labels`` by least squares.

    Minimises ``mean_{i,t}(pred_{i,t} − y_{i,t})² + l2 · ‖w‖²`` on the labels *as given* (no z-scoring here;
    the strategy z-scores before calling). For fixed ``(alpha, temp)`` the predictions are linear in ``w``,
    so ``w`` is the exact ridge solution and only the two scalars are optimised (variable projection), by
    L-BFGS with a strong-Wolfe line search for at most ``iterations`` iterations, started from the best of
    the warm start and a coarse ``(alpha, temp)`` grid, in float64 on the CPU: deterministic, and free of
    the ``w``/``alpha`` coupling that slows a joint first-order fit. Each evaluation solves one ``d × d``
    system built from moment matrices precomputed once.

    ``alpha = exp(a)`` is kept positive: a negative ``alpha`` would flip the sign of every prediction after
    the first, and the greedy would then prefer the examples predicted harmful. ``temp`` is kept in
    ``[0.01, 100]`` through a smooth bound on ``log temp``. ``w`` and ``alpha`` are identifiable separately
    because the first position of each trajectory (``pred_0 = s_0``) carries no ``alpha``.

    Args:
        embeddings: ``(n, T, d)`` embeddings of the trajectories' examples, in training order.
        labels: ``(n, T)`` oracle marginal influences (``L_{t+1} − L_t`` on the reference set).
        iterations: maximum L-BFGS iterations.
        lr: L-BFGS step size (1.0 suits the line search).
        l2: ridge penalty on ``w`` (``>= 0``).
        alpha_init, temp_init: starting point (the previous fit, to warm-start).

    Returns:
        The fit with the lowest objective seen.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.nn.functional.normalize(torch.randn(64, 4, 8, generator=g, dtype=torch.float64), dim=-1)
        >>> w = torch.randn(8, generator=g, dtype=torch.float64)
        >>> fit = fit_relational_model(h, relational_predictions(h, w, 2.0, 0.5), l2=0.0)
        >>> round(fit.alpha, 3), round(fit.temp, 3)
        (2.0, 0.5)
    """
    h = embeddings.detach().to(torch.float64)
    y = labels.detach().to(torch.float64)
    if h.ndim != 3 or y.shape != h.shape[:2] or h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(
            f"fit_relational_model: `embeddings` must be (n, T, d) and `labels` (n, T) with n, T >= 1; got "
            f"{tuple(h.shape)} and {tuple(y.shape)}."
        )
    if not (torch.isfinite(h).all() and torch.isfinite(y).all()):
        raise ValueError("fit_relational_model: `embeddings` and `labels` must be finite.")
    if alpha_init <= 0 or temp_init <= 0:
        raise ValueError(
            f"fit_relational_model: `alpha_init` and `temp_init` must be > 0, got {alpha_init} and {temp_init}."
        )
    n, length, d = h.shape
    count = n * length
    similarity = prefix_similarity(h)
    # Moments: X^T X = H0 + alpha² (M0 − 2 M1/temp + M2/temp²) and X^T y = b0 + alpha (c0 − c1/temp), with
    # X the rows c_t h_t; so each objective evaluation is one d × d solve, whatever the number of trajectories.
    h0, y0 = h[:, 0], y[:, 0]
    hr, yr, mr = h[:, 1:].reshape(-1, d), y[:, 1:].reshape(-1), similarity[:, 1:].reshape(-1)
    gram0, cross0 = h0.T @ h0, h0.T @ y0
    moments = [hr.T @ (hr * mr[:, None] ** k) for k in range(3)]
    crosses = [hr.T @ (yr * mr**k) for k in range(2)]
    total = float(y.pow(2).sum())
    eye = torch.eye(d, dtype=torch.float64)

    def objective(alpha: Tensor | float, temp: Tensor | float) -> tuple[Tensor, Tensor]:
        xtx = gram0 + alpha**2 * (moments[0] - 2.0 * moments[1] / temp + moments[2] / temp**2)
        xty = cross0 + alpha * (crosses[0] - crosses[1] / temp)
        w = torch.linalg.solve(xtx / count + (l2 + _JITTER) * eye, xty / count)
        mse = (w @ xtx @ w - 2.0 * w @ xty + total) / count
        return mse + l2 * (w @ w), w

    start_alpha, start_temp = float(alpha_init), float(min(max(temp_init, 0.01), 100.0))
    if length > 1:
        # The profile objective has poor local minima near the temp bounds; start L-BFGS from the best of the
        # warm start and a coarse grid (45 d × d solves, negligible next to the iterations).
        with torch.no_grad():
            starts = [(start_alpha, start_temp)] + [
                (a, t) for a in (0.25, 0.5, 1.0, 2.0, 4.0) for t in np.logspace(-2, 2, 9).tolist()
            ]
            values = [float(objective(a, t)[0]) for a, t in starts]
            start_alpha, start_temp = starts[int(np.argmin([v if math.isfinite(v) else math.inf for v in values]))]
    log_alpha = torch.tensor(math.log(start_alpha), dtype=torch.float64, requires_grad=True)
    raw_temp = torch.tensor(_raw_of(start_temp), dtype=torch.float64, requires_grad=True)
    best = {"loss": math.inf, "alpha": start_alpha, "temp": start_temp}
    if length > 1:
        optimizer = torch.optim.LBFGS(
            [log_alpha, raw_temp], lr=lr, max_iter=iterations, line_search_fn="strong_wolfe",
            tolerance_grad=1e-12, tolerance_change=1e-15,
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            alpha, temp = torch.exp(log_alpha), _temp_of(raw_temp)
            loss, _ = objective(alpha, temp)
            if not torch.isfinite(loss):
                # A non-finite step is rejected by making it look infinitely bad (the line search backs off).
                return torch.tensor(math.inf, dtype=torch.float64)
            loss.backward()
            if float(loss.detach()) < best["loss"]:
                best.update(loss=float(loss.detach()), alpha=float(alpha.detach()), temp=float(temp.detach()))
            return loss

        optimizer.step(closure)
    alpha, temp = best["alpha"], best["temp"]
    with torch.no_grad():
        _, w = objective(torch.tensor(alpha, dtype=torch.float64), torch.tensor(temp, dtype=torch.float64))
        mse = float((relational_predictions(h, w, alpha, temp) - y).pow(2).mean())
    return RelationalFit(w=w, alpha=alpha, temp=temp, mse=mse)


# ---------------------------------------------------------------------- selection
def greedy_group_selection(
    embeddings: np.ndarray, scores: np.ndarray, count: int, alpha: float = 1.0, temp: float = 1.0
) -> np.ndarray:
    r"""The in-cluster greedy of Group-MATES (``inference/select_indices.py``): ``count`` picks, in pick order.

    The first pick is ``argmin s``; after the ``i``-th pick ``p`` (0-based),
    ``avg_rel ← (i · avg_rel + alpha · (1 − h · h_p / temp)) / (i + 1)``, i.e. the mean of the relational
    bracket over the picks so far, and the next pick is ``argmin avg_rel · s`` over the unpicked examples
    (lowest index on ties). This greedily minimises the predicted group influence of
    :func:`relational_predictions`.

    Args:
        embeddings: ``(n, d)`` unit embeddings of the cluster's examples.
        scores: ``(n,)`` individual influences ``s = w · h`` (lower is better).
        count: picks to make (capped at ``n``).
        alpha, temp: the relational scalars (the official code hard-codes both to 1.0).

    Returns:
        ``(min(count, n),)`` int64 positions into ``embeddings``, in the order picked.

    Example::

        >>> h = np.eye(3)
        >>> greedy_group_selection(h, np.array([-1.0, -2.0, -0.5]), 2).tolist()
        [1, 0]
    """
    h = np.asarray(embeddings, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    count = int(min(count, s.shape[0]))
    picks = np.empty(max(count, 0), dtype=np.int64)
    if count <= 0:
        return picks
    available = np.ones(s.shape[0], dtype=bool)
    avg_rel = np.zeros(s.shape[0], dtype=np.float64)
    picks[0] = int(np.argmin(s))
    available[picks[0]] = False
    for i in range(count - 1):
        relation = alpha * (1.0 - (h @ h[picks[i]]) / temp)
        avg_rel = (i * avg_rel + relation) / (i + 1)
        picks[i + 1] = int(np.argmin(np.where(available, avg_rel * s, np.inf)))
        available[picks[i + 1]] = False
    return picks


def clustered_group_selection(
    embeddings: np.ndarray, scores: np.ndarray, budget: int, clusters: int, seed: int, alpha: float = 1.0,
    temp: float = 1.0,
) -> tuple[np.ndarray, int]:
    """The strategy's selection step: spherical k-means into ``clusters``, each cluster's quota
    (:func:`cluster_budgets`) filled by :func:`greedy_group_selection`.

    Returns the ``budget`` picked positions into ``embeddings`` (cluster by cluster, each in pick order) and the
    number of clusters k-means kept.

    Example::

        >>> h = np.eye(4)
        >>> positions, k = clustered_group_selection(h, np.array([-1.0, -2.0, -0.5, -3.0]), 2, clusters=1, seed=0)
        >>> sorted(positions.tolist()), k
        ([1, 3], 1)
    """
    # faiss trains k-means on at most 64 rows a centroid (its default is 256): on 60k x 128 embeddings and 122
    # centroids 0.11 s instead of 0.49 s a refresh, at the same mean cosine to the centroids (0.99748 against 0.99750).
    partition = spherical_kmeans(np.asarray(embeddings, dtype=np.float32), clusters, seed=seed, max_points_per_centroid=64)
    chosen = [np.zeros(0, dtype=np.int64)]
    for c, quota in enumerate(cluster_budgets(partition.sizes(), budget)):
        if quota == 0:
            continue
        members = partition.members(c)
        chosen.append(members[greedy_group_selection(embeddings[members], scores[members], int(quota), alpha, temp)])
    return np.concatenate(chosen), partition.k


def cluster_budgets(sizes: np.ndarray, budget: int) -> np.ndarray:
    r"""Per-cluster picks: ``ceil(B · |C| / N)`` (the paper's rule), trimmed so that they sum to exactly ``B``.

    The trim takes one pick from each of the clusters whose ceiling overshoots their exact share
    ``B · |C| / N`` the most (lowest cluster id on ties), so every cluster ends with the floor or the ceiling
    of its share: the largest-remainder apportionment. Integer arithmetic throughout (no float ties).

    Args:
        sizes: ``(K,)`` cluster sizes (``N = sum``; empty clusters get 0).
        budget: ``B``, with ``0 <= B <= N``.

    Returns:
        ``(K,)`` int64 budgets summing to ``B``, each at most its cluster's size.

    Example::

        >>> cluster_budgets(np.array([6, 3, 1]), 5).tolist()  # shares 3, 1.5, 0.5
        [3, 1, 1]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= budget <= total:
        raise ValueError(f"cluster_budgets: `budget` must be in [0, {total}], got {budget}.")
    if total == 0:
        return np.zeros_like(sizes)
    product = budget * sizes
    # Floors of the exact shares B·|C|/N, then one more pick for the largest remainders (B·|C| mod N, exact
    # integers). Trimming the ceilings with the largest overshoot first, lowest id first on ties, leaves the
    # ceiling to the *highest* ids among equal remainders: hence ties="highest_id".
    return largest_remainder(
        product // total, product % total, budget, np.zeros_like(sizes), sizes, ties="highest_id"
    )


def default_clusters(candidates: int, budget: int) -> int:
    """The k-means centroids used when ``clusters=None``: ``round(sqrt(N)/2)``, at most 10,000 and the budget.

    Example::

        >>> default_clusters(10_000, 1_000)
        50
    """
    return max(1, min(10_000, budget, int(round(math.sqrt(candidates) / 2))))


def _spearman(a: Tensor, b: Tensor) -> float:
    if a.numel() < 2:
        return 0.0
    ra = torch.argsort(torch.argsort(a)).to(torch.float64)
    rb = torch.argsort(torch.argsort(b)).to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denominator if denominator > 0 else 0.0


def _unit_rows(x: Tensor) -> Tensor:
    """float64 copy with unit rows (the store keeps fp16 rows, unit only up to rounding)."""
    return torch.nn.functional.normalize(x.to(torch.float64), dim=-1)


# ---------------------------------------------------------------------- state
class GroupMatesState:
    """Group-MATES's memory between refreshes (rank 0 only): the fitted model and recent oracle trajectories.

    Trajectories are kept as pool indices and labels only; their embeddings are re-read from the live store
    at every fit, so an old trajectory is explained in the model's current representation.

    Attributes:
        w: ``(d,)`` float64 head of the last fit (``None`` before the first).
        alpha, temp: the last fit's scalars (1.0 before the first, the paper's initialisation); the next fit
            starts from them.
        buffer_indices: ``(n, T)`` int64 pool indices of the buffered trajectories, oldest first.
        buffer_labels: ``(n, T)`` float64 raw oracle marginal influences ``L_{t+1} − L_t``.
        buffer_refresh: ``(n,)`` int64 refresh (0, 1, ...) each trajectory was measured at.
        refreshes: refreshes whose probe results were absorbed.
        since_probe: selections made since the last one that absorbed probe results (``probe_every``).
    """

    def __init__(self, pool_size: int, trajectory_length: int) -> None:
        self.pool_size = pool_size
        self.w: Optional[Tensor] = None
        self.alpha = 1.0
        self.temp = 1.0
        self.buffer_indices = torch.zeros(0, trajectory_length, dtype=torch.int64)
        self.buffer_labels = torch.zeros(0, trajectory_length, dtype=torch.float64)
        self.buffer_refresh = torch.zeros(0, dtype=torch.int64)
        self.refreshes = 0
        self.since_probe = 0

    def add(self, indices: Tensor, labels: Tensor, capacity: int) -> None:
        """Append trajectories measured at this refresh, keeping the newest ``capacity``."""
        if self.buffer_indices.shape[1] != indices.shape[1]:
            # A resumed run with another trajectory_length: the old trajectories no longer fit the buffer.
            self.buffer_indices = self.buffer_indices.new_zeros(0, indices.shape[1])
            self.buffer_labels = self.buffer_labels.new_zeros(0, indices.shape[1])
            self.buffer_refresh = self.buffer_refresh[:0]
        refresh = torch.full((indices.shape[0],), self.refreshes, dtype=torch.int64)
        self.buffer_indices = torch.cat([self.buffer_indices, indices])[-capacity:]
        self.buffer_labels = torch.cat([self.buffer_labels, labels.to(torch.float64)])[-capacity:]
        self.buffer_refresh = torch.cat([self.buffer_refresh, refresh])[-capacity:]
        self.refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "w": self.w,
            "alpha": self.alpha,
            "temp": self.temp,
            "buffer_indices": self.buffer_indices,
            "buffer_labels": self.buffer_labels,
            "buffer_refresh": self.buffer_refresh,
            "refreshes": self.refreshes,
            "since_probe": self.since_probe,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = None if state["w"] is None else state["w"].clone()
        self.alpha = float(state["alpha"])
        self.temp = float(state["temp"])
        self.buffer_indices = state["buffer_indices"].clone()
        self.buffer_labels = state["buffer_labels"].clone()
        self.buffer_refresh = state["buffer_refresh"].clone()
        self.refreshes = int(state["refreshes"])
        self.since_probe = int(state.get("since_probe", 0))  # absent in checkpoints written before probe_every


# ---------------------------------------------------------------------- the strategy
@register_strategy("group_mates")
class GroupMates(Strategy):
    r"""Group-level influence selection: probe oracle trajectories, fit a relational model, greedy per cluster.

    Each refresh probes ``trajectories`` random sequences of ``trajectory_length`` measured examples on a
    snapshot of the live model (:meth:`to_probe`: one single-example optimizer step per position, the
    reference-set loss after each; a position's label is its loss change), fits the relational influence
    model ``pred_t = alpha · (w·h_t) · mean_{j<t}(1 − h_t·h_j / temp)`` (:func:`fit_relational_model`) on a
    buffer of recent trajectories, clusters the candidates' embeddings and picks, per cluster
    (:func:`cluster_budgets`), the group minimising the predicted influence (:func:`greedy_group_selection`).
    Before any trajectory is absorbed the selection is uniform; ``fidelity < 1`` scales the number of
    trajectories down (at least one). Weights are ``None``. How it works, where it departs from the paper,
    when to use it, suggested settings and costs: the ``group_mates`` section of
    ``grace_lightning/strategies/README.md``.

    Diagnostics: ``oracle_steps``, ``buffer_trajectories``, ``fitted`` (0 for the uniform fallback),
    ``alpha``, ``temp``, ``fit_mse`` and ``fit_spearman`` (on the z-scored buffer), ``clusters``,
    ``filled_unmeasured``, and timings.

    Args:
        trajectories: oracle trajectories probed per refresh.
        trajectory_length: examples per trajectory (``>= 2``: position 0 carries no relational term; the
            paper's ``T = 10``).
        buffer_size: trajectories kept across refreshes for the fit (the oldest are dropped first).
        clusters: k-means centroids, or ``None`` for the default above.
        fit_iterations: maximum L-BFGS iterations of the fit.
        lr: L-BFGS step size.
        l2: ridge penalty on ``w`` (labels are z-scored and ``h`` unit-norm, so ~``1/d`` is strong).
        fixed_relational: select with ``alpha = temp = 1`` (the released code) instead of the fitted values.
        label_scaling: ``"buffer"`` or ``"refresh"`` (see 2.).
        probe_every: probe oracle trajectories at every this many refreshes; the refreshes in between refit the
            relational model on the buffered trajectories (re-embedded in the live model's current space) and run
            the clustered greedy, without probes, which are most of a refresh's cost (0.53 of 0.87 s at a 10%
            budget on the bench's CNN). ``1`` (the default) probes at every refresh, as the paper does; ``3`` cut the
            selection time 1.3-1.8x for 0.13 accuracy points on average in four regimes (``README.md``).
        rescore_share: the stalest examples rescored per refresh, as a share of the budget (``0.25``: a quarter of the
            budget's worth; ``None``: the whole pool, as the paper re-embeds); see
            :func:`~grace_lightning.strategies.base.stalest_first`.

    Raises:
        ValueError: on a bad parameter; at ``setup`` when the callback has no reference set; in
            :meth:`select` when no embeddings were measured or the probe results do not match the request.

    Example::

        CoresetCallback(sampler, strategy="group_mates", reference=held_out_set,
                        strategy_kwargs={"trajectories": 32, "trajectory_length": 4})
    """

    # Only the embeddings: the oracle labels come from probes, never from a per-example loss. On an encoder's
    # embeddings (CoresetCallback(embeddings=...)) the live model then runs no scoring pass at all.
    needs = frozenset({"embedding"})
    overlap_by_default = True
    reference = "required"

    def __init__(
        self,
        trajectories: int = 32,
        trajectory_length: int = 4,
        buffer_size: int = 128,
        clusters: Optional[int] = None,
        fit_iterations: int = 100,
        lr: float = 1.0,
        l2: float = 1e-2,
        fixed_relational: bool = False,
        label_scaling: str = "buffer",
        rescore_share: Optional[float] = 0.25,
        probe_every: int = 1,
    ) -> None:
        self.trajectories = positive_int("group_mates", "trajectories", trajectories)
        self.probe_every = positive_int("group_mates", "probe_every", probe_every, hint=" (1: every refresh)")
        self.rescore_share = rescore_share_arg("group_mates", rescore_share)
        self.trajectory_length = integer(
            "group_mates", "trajectory_length", trajectory_length, minimum=2, hint=" (the paper uses 10)"
        )
        self.buffer_size = positive_int("group_mates", "buffer_size", buffer_size)
        self.clusters = None
        if clusters is not None:
            self.clusters = positive_int("group_mates", "clusters", clusters, hint=", or None for round(sqrt(N)/2)")
        self.fit_iterations = positive_int("group_mates", "fit_iterations", fit_iterations)
        self.lr = positive_float("group_mates", "lr", lr, hint=" (1.0 suits L-BFGS)")
        self.l2 = non_negative_float("group_mates", "l2", l2)
        self.fixed_relational = boolean("group_mates", "fixed_relational", fixed_relational)
        if label_scaling not in ("buffer", "refresh"):
            raise ValueError(f"group_mates: `label_scaling` must be 'buffer' or 'refresh', got {label_scaling!r}.")
        self.label_scaling = label_scaling

    def __repr__(self) -> str:
        return (
            f"GroupMates(trajectories={self.trajectories}, trajectory_length={self.trajectory_length}, "
            f"buffer_size={self.buffer_size}, clusters={self.clusters}, fixed_relational={self.fixed_relational})"
        )

    def create_state(self, pool_size: int) -> GroupMatesState:
        return GroupMatesState(pool_size, self.trajectory_length)

    # ------------------------------------------------------------------ oracle
    def to_probe(self, inputs: SelectionInput) -> Optional[ProbeRequest]:
        """``trajectories`` random trajectories of measured examples to probe; None when there are too few, or when
        this refresh refits on the buffer without probing (``probe_every``)."""
        if inputs.store is None or inputs.store.embedding is None:
            return None
        state = inputs.state
        if (
            isinstance(state, GroupMatesState)
            and state.buffer_indices.shape[0] > 0
            and state.since_probe + 1 < self.probe_every
        ):
            return None
        candidates = _candidates(inputs.store).nonzero().squeeze(1)
        if candidates.numel() < self.trajectory_length:
            return None
        count = max(1, int(round(self.trajectories * inputs.fidelity)))
        rows = [
            candidates[torch.randperm(candidates.numel(), generator=inputs.generator)[: self.trajectory_length]]
            for _ in range(count)
        ]
        tasks = tuple(
            ProbeTask(steps=tuple(i.reshape(1) for i in row), eval_indices=None, eval_every_step=True) for row in rows
        )
        return ProbeRequest(tasks=tasks, trainable="all")

    def _absorb_probe(self, inputs: SelectionInput, state: GroupMatesState) -> int:
        """Turn this refresh's probe losses into buffered labels; return the probe steps they cost."""
        probe = inputs.probe
        if probe is None:
            return 0
        asked = 0 if probe.request is None else len(probe.request.tasks)
        if len(probe.losses) != asked or asked == 0:
            raise ValueError(
                f"group_mates: got {len(probe.losses)} probe results for {asked} requested trajectories; pass "
                "select() the ProbeResults of the ProbeRequest that to_probe() returned (with its `request`)."
            )
        # The trajectories come back with their request: one pool index per single-example step.
        trajectories = torch.stack([torch.cat(task.steps) for task in probe.request.tasks])
        losses = [torch.as_tensor(loss, dtype=torch.float64).reshape(-1) for loss in probe.losses]
        if any(loss.numel() != self.trajectory_length + 1 for loss in losses):
            raise ValueError(
                f"group_mates: each probe result must hold trajectory_length + 1 = {self.trajectory_length + 1} "
                "losses (ProbeTask(eval_every_step=True))."
            )
        labels = torch.diff(torch.stack(losses), dim=1)
        finite = torch.isfinite(labels).all(dim=1)
        if bool(finite.any()):
            state.add(trajectories[finite], labels[finite], self.buffer_size)
        return int(trajectories.numel())

    # ------------------------------------------------------------------ fit
    def _scaled_labels(self, state: GroupMatesState) -> Tensor:
        labels = state.buffer_labels.clone()
        groups = [torch.ones_like(state.buffer_refresh, dtype=torch.bool)]
        if self.label_scaling == "refresh":
            groups = [state.buffer_refresh == r for r in state.buffer_refresh.unique()]
        for rows in groups:
            values = labels[rows]
            std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
            labels[rows] = (values - values.mean()) / (std if std > 0 else 1.0)
        return labels

    def _fit(self, inputs: SelectionInput, state: GroupMatesState) -> tuple[RelationalFit, float]:
        indices = state.buffer_indices
        n, length = indices.shape
        h = _unit_rows(inputs.store.embedding[indices.reshape(-1)]).reshape(n, length, -1)
        labels = self._scaled_labels(state)
        fit = fit_relational_model(
            h, labels, iterations=self.fit_iterations, lr=self.lr, l2=self.l2,
            alpha_init=state.alpha, temp_init=state.temp,
        )
        state.w, state.alpha, state.temp = fit.w, fit.alpha, fit.temp
        spearman = _spearman(relational_predictions(h, fit.w, fit.alpha, fit.temp).reshape(-1), labels.reshape(-1))
        return fit, spearman

    # ------------------------------------------------------------------ selection
    def select(self, inputs: SelectionInput) -> Selection:
        state, store = _state(inputs), inputs.store
        require_embeddings(store, "group_mates")
        oracle_steps = self._absorb_probe(inputs, state)
        state.since_probe = 0 if inputs.probe is not None else state.since_probe + 1
        diagnostics = {"oracle_steps": float(oracle_steps), "buffer_trajectories": float(state.buffer_indices.shape[0])}
        if state.buffer_indices.shape[0] == 0:
            diagnostics["fitted"] = 0.0
            return Selection(uniform_sample(inputs.pool_size, inputs.budget, inputs.generator), diagnostics=diagnostics)

        began = time.perf_counter()
        fit, spearman = self._fit(inputs, state)
        diagnostics.update(
            fitted=1.0, alpha=fit.alpha, temp=fit.temp, fit_mse=fit.mse, fit_spearman=spearman,
            fit_seconds=time.perf_counter() - began,
        )
        began = time.perf_counter()
        indices, clusters, filled = self._select_indices(inputs, fit)
        diagnostics.update(
            clusters=float(clusters), filled_unmeasured=float(filled), selection_seconds=time.perf_counter() - began
        )
        return Selection(indices, None, diagnostics)

    def _select_indices(self, inputs: SelectionInput, fit: RelationalFit) -> tuple[Tensor, int, int]:
        """Sorted selected indices, the number of clusters, and how many unmeasured examples filled the budget."""
        budget, store = min(inputs.budget, inputs.pool_size), inputs.store
        mask = _candidates(store)
        candidates = mask.nonzero().squeeze(1)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inputs.generator))
        if candidates.numel() <= budget:
            others = (~mask).nonzero().squeeze(1)
            fill = uniform_draw(others, budget - candidates.numel(), inputs.generator)
            return torch.cat([candidates, fill]).sort().values, 0, int(fill.numel())
        h = _unit_rows(store.embedding[candidates])
        scores = (h @ fit.w).numpy()
        h_np = h.numpy()
        k = self.clusters if self.clusters is not None else default_clusters(candidates.numel(), budget)
        alpha, temp = (1.0, 1.0) if self.fixed_relational else (fit.alpha, fit.temp)
        positions, clusters = clustered_group_selection(h_np, scores, budget, k, seed, alpha, temp)
        picked = candidates[torch.from_numpy(positions)]
        return picked.sort().values, clusters, 0


def _candidates(store) -> Tensor:
    """Bool mask of the examples with a known embedding: measured (a capture without embeddings leaves zero rows)
    or given up front."""
    return store.has("embedding") & (store.embedding != 0).any(dim=1)


def _state(inputs: SelectionInput) -> GroupMatesState:
    if not isinstance(inputs.state, GroupMatesState):
        raise TypeError(
            "group_mates: `inputs.state` must be the GroupMatesState from GroupMates.create_state(pool_size); the "
            "CoresetCallback passes it. When calling the strategy yourself, pass SelectionInput(..., "
            "state=strategy.create_state(n))."
        )
    return inputs.state
