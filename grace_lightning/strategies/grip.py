"""``grip``: cluster budgets from a Rapid Adaptation Probe, then density- and length-aware sampling inside clusters.

Reconstructed from GRIP (Wang, Yang, Yao, et al., *GRIP: Geometric Refinement and Adaptive Information
Potential for Data Efficiency*, arXiv:2603.00031, 2026). The paper has no public code and its method section
was not readable; the pieces come from its abstract and two third-party summaries, and what they leave open is a
parameter here, with the interpretation documented in the ``grip`` section of
``grace_lightning/strategies/README.md``.
The paper curates a static pool once with an external embedder and a proxy model; here every refresh runs
in-loop on the live model's embeddings, and the probe trains a snapshot of the live model.

The pure pieces (:func:`neyman_allocation`, :func:`cluster_base_weights`, :func:`replay_multipliers`,
:func:`allocate_budgets`, :func:`intra_cluster_probabilities`, ...) are module-level functions on numpy
arrays, usable and testable without a trainer.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

from grace_lightning.clustering import spherical_kmeans
from grace_lightning.probes import ProbeRequest, ProbeTask
from grace_lightning.strategies.apportion import round_to_total
from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    gumbel_top_k,
    register_strategy,
    require_embeddings,
    rescore_share_arg,
    stalest_first,
    uniform_draw,
)
from grace_lightning.validation import (
    boolean,
    integer,
    non_negative_float,
    positive_float,
    positive_int,
    real,
    unit_interval,
)

__all__ = [
    "Grip",
    "GripState",
    "adaptation_delta",
    "allocate_budgets",
    "cluster_base_weights",
    "cluster_dispersion",
    "default_cluster_count",
    "gumbel_top_k",
    "intra_cluster_probabilities",
    "length_feature",
    "local_density",
    "neyman_allocation",
    "rank01",
    "replay_multipliers",
]


# ---------------------------------------------------------------------- pure pieces
def default_cluster_count(measured: int) -> int:
    """``round(sqrt(M) / 4)`` clipped to ``[2, 256]`` and to ``M``: the number of clusters for ``M`` examples.

    ``sqrt(N)/10`` is a common choice for web-scale pools; in-loop pools are small (10^3-10^6), where that
    gives too few clusters for the budget re-allocation to matter, hence ``/4``.

    Example::

        >>> default_cluster_count(10_000), default_cluster_count(10), default_cluster_count(10**8)
        (25, 2, 256)
    """
    if measured <= 1:
        return max(int(measured), 1)
    return int(min(measured, min(256, max(2, round(math.sqrt(measured) / 4)))))


def cluster_dispersion(similarity: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """``o_k = sqrt(1 - mean cos(x, mu_k))`` over each cluster's members (0 for an empty cluster).

    Our reading of GRIP's "geometric consistency": Neyman allocation needs a dispersion, and on the
    unit sphere ``1 - cos`` is half the squared distance to the centroid, so ``o_k`` is a standard deviation.
    """
    sums = np.bincount(assignment, weights=np.asarray(similarity, dtype=np.float64), minlength=k)
    counts = np.bincount(assignment, minlength=k)
    mean = np.divide(sums, counts, out=np.ones(k, dtype=np.float64), where=counts > 0)
    return np.sqrt(np.clip(1.0 - mean, 0.0, None))


def _water_fill(weights: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """Real shares ``x_k = clip(lam * w_k, lower_k, upper_k)`` with ``sum x = total``.

    Requires ``sum lower <= total <= sum upper``. When the positive-weight entries are all at their upper
    bound and budget is left, the rest goes to the zero-weight entries in proportion to their room.
    """
    w = np.asarray(weights, dtype=np.float64)
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    if total <= lo.sum():
        return lo.copy()
    positive = w > 0
    top = np.where(positive, hi, lo)
    if top.sum() <= total:
        rest = total - top.sum()
        room = np.where(positive, 0.0, hi - lo)
        return top + (rest * room / room.sum() if rest > 0 and room.sum() > 0 else 0.0)
    w = w / w.max()

    def filled(lam: float) -> float:
        return float(np.clip(lam * w, lo, hi).sum())

    lam_lo, lam_hi = 0.0, max(total / w.sum(), 1e-12)
    while filled(lam_hi) < total:
        lam_lo, lam_hi = lam_hi, lam_hi * 2.0
    for _ in range(100):  # f(lam) is monotone and piecewise linear: bisection to float precision
        mid = 0.5 * (lam_lo + lam_hi)
        if filled(mid) < total:
            lam_lo = mid
        else:
            lam_hi = mid
    return np.clip(lam_hi * w, lo, hi)


def neyman_allocation(sizes: np.ndarray, dispersion: np.ndarray, total: int, minimum: int = 4) -> np.ndarray:
    """Probe examples per cluster, ``n_k ∝ N_k · o_k`` (Neyman), at least ``min(minimum, N_k)``, at most ``N_k``.

    Clusters whose proportional share falls below the minimum are raised to it and the rest re-shared in
    proportion (water-filling), so the others stay proportional to ``N_k o_k``. ``total`` is raised to the
    sum of the minimums and lowered to the pool size when out of that range. Rounding: floors, then the
    largest remainders; the result sums exactly to the (clipped) total.

    Example::

        >>> neyman_allocation(np.array([100, 100, 10]), np.array([0.2, 0.4, 0.3]), 30, minimum=4).tolist()
        [9, 17, 4]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    lo = np.minimum(int(minimum), sizes)
    total = int(min(max(int(total), int(lo.sum())), int(sizes.sum())))
    weights = sizes * np.clip(np.asarray(dispersion, dtype=np.float64), 0.0, None)
    return round_to_total(_water_fill(weights, lo, sizes, total), lo, sizes, total)


def cluster_base_weights(
    sizes: np.ndarray,
    tau: float = 0.5,
    quality: Optional[np.ndarray] = None,
    temperature: float = 1.0,
    quality_gate: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """GRIP's static budget weights ``w0_k = N_k^tau · softmax_k(Q_k / T)`` and the quality gate.

    With ``quality=None`` every ``Q_k`` is equal and ``w0_k ∝ N_k^tau`` (``tau = 0.5`` is the paper's
    square-root sampling, ``tau = 1`` is proportional). With quality, clusters whose ``Q_k`` is strictly
    below the ``quality_gate`` quantile of the ``Q_k`` get weight 0 (the paper's gate ``τ_th``, value
    unspecified there); the best cluster always survives. Empty clusters get weight 0.

    Returns:
        ``(w0, gated)``: float64 weights and the bool mask of gated clusters.
    """
    n = np.asarray(sizes, dtype=np.float64)
    if quality is None:
        soft = np.full(n.shape, 1.0 / max(n.size, 1))
    else:
        z = np.asarray(quality, dtype=np.float64) / temperature
        z = np.exp(z - z.max())
        soft = z / z.sum()
    weights = np.where(n > 0, np.power(n, tau, where=n > 0, out=np.zeros_like(n)), 0.0) * soft
    gated = np.zeros(n.shape, dtype=bool)
    if quality is not None and quality_gate > 0 and n.size > 1:
        q = np.asarray(quality, dtype=np.float64)
        gated = q < np.quantile(q, quality_gate)
        weights[gated] = 0.0
    return weights, gated


def rank01(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to ``[0, 1]`` (smallest 0, largest 1), ties sharing their mean rank; 0.5 for a single value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size <= 1:
        return np.full(v.shape, 0.5)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(v.size)
    _, inverse = np.unique(v, return_inverse=True)
    ranks = (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]
    return ranks / (v.size - 1)


def adaptation_delta(losses: Sequence[Tensor], signal: str = "ratio") -> np.ndarray:
    """Each probe's loss drop from ``[L_init, ..., L_final]``: ``(L_init - L_final) / L_init`` or ``L_init - L_final``.

    ``signal="ratio"`` is the paper's ``δL_k``; ``"absolute"`` is the reducible loss, offered as an
    alternative. A probe with a non-finite loss gives NaN (treated as not probed); ``L_init <= 0`` gives 0.
    """
    out = np.full(len(losses), np.nan)
    for i, curve in enumerate(losses):
        curve = torch.as_tensor(curve, dtype=torch.float64).reshape(-1)
        if curve.numel() < 2:
            continue
        first, last = float(curve[0]), float(curve[-1])
        if not (math.isfinite(first) and math.isfinite(last)):
            continue
        drop = first - last
        out[i] = drop if signal == "absolute" else (drop / first if first > 0 else 0.0)
    return out


def replay_multipliers(
    delta: np.ndarray, alpha: float = 1.0, sign: int = 1, probed: Optional[np.ndarray] = None
) -> np.ndarray:
    """``r_k = 1 + alpha · rank01(sign · δL_k)`` over the probed clusters; unprobed clusters get the middle rank.

    Ranks rather than raw deltas keep the multiplier in ``[1, 1 + alpha]`` whatever the loss scale. With no
    finite probed delta every ``r_k`` is 1 (budgets from the static weights alone).
    """
    delta = np.asarray(delta, dtype=np.float64)
    valid = np.isfinite(delta) if probed is None else (np.asarray(probed, dtype=bool) & np.isfinite(delta))
    r = np.ones(delta.shape, dtype=np.float64)
    if valid.any():
        r[:] = 1.0 + alpha * 0.5
        r[valid] = 1.0 + alpha * rank01(sign * delta[valid])
    return r


def allocate_budgets(weights: np.ndarray, caps: np.ndarray, budget: int) -> np.ndarray:
    """Integer budgets ``B_k ∝ weights_k``, capped at ``caps_k``, summing exactly to ``budget``.

    Water-filling: a cluster whose share exceeds its cap takes its cap and the excess is re-shared among the
    others in proportion to their weights; if every positive-weight cluster is full, the remainder goes to
    zero-weight (gated) clusters in proportion to their size. Rounding: floors, then largest remainders.

    Raises:
        ValueError: if ``budget`` is negative or exceeds ``sum(caps)``.

    Example::

        >>> allocate_budgets(np.array([1.0, 1.0, 2.0]), np.array([100, 5, 100]), 40).tolist()
        [12, 5, 23]
    """
    caps = np.asarray(caps, dtype=np.int64)
    if budget < 0 or budget > int(caps.sum()):
        raise ValueError(
            f"allocate_budgets: `budget` must be in [0, {int(caps.sum())}] (the clusters' total size), got {budget}."
        )
    lo = np.zeros_like(caps)
    return round_to_total(_water_fill(weights, lo, caps, budget), lo, caps, int(budget))


def local_density(embeddings: np.ndarray, knn: int = 10, reference: Optional[np.ndarray] = None) -> np.ndarray:
    """k-NN Gaussian kernel density of unit rows: ``p(x) = mean_{j in kNN+(x)} exp(-||e_x - e_j||² / 2h²)``.

    ``kNN+(x)`` is ``x`` with its ``knn`` nearest rows (exact inner-product search); counting ``x`` itself
    keeps ``p(x)`` in ``[1/(knn+1), 1]``, so ``1 / p`` is bounded and one isolated point cannot take a
    cluster's whole budget. The bandwidth ``h`` (unspecified in the paper) is the median distance from
    each row to its ``knn`` nearest neighbours.

    ``reference``: positions of the rows the neighbours are searched among (default: every row), so that a large
    cluster costs ``O(n · m · d)`` instead of ``O(n² · d)``. Neighbours in a uniform sample of a fraction ``f``
    of the rows lie as far as the ``knn / f`` nearest of all of them; the bandwidth grows with them, so the
    densities keep their order within the cluster, which is all the normalised probabilities read.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    n = x.shape[0]
    if n <= 1:
        return np.ones(n)
    faiss.normalize_L2(x)
    if reference is not None:
        return _sampled_density(x, knn, np.asarray(reference, dtype=np.int64))
    kk = min(int(knn), n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, _ = index.search(x, kk + 1)  # column 0 is the row itself (or an exact duplicate: also distance 0)
    sq = np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None)
    return _kernel_density(sq)


def _sampled_density(x: np.ndarray, knn: int, reference: np.ndarray) -> np.ndarray:
    """:func:`local_density` of unit rows ``x`` with neighbours searched among ``x[reference]`` only."""
    n = x.shape[0]
    kk = min(int(knn), reference.size - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x[reference]))
    sims, ids = index.search(x, kk + 1)
    # Each row counts itself once (distance 0) and its kk nearest *other* sampled rows: a sampled row drops its
    # own match, any other row its farthest of the kk + 1.
    position = np.full(n, -1, dtype=np.int64)
    position[reference] = np.arange(reference.size)
    own = ids == position[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), kk)
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    others = sims[keep].reshape(n, kk)
    sq = np.clip(2.0 - 2.0 * others.astype(np.float64), 0.0, None)
    return _kernel_density(np.concatenate([np.zeros((n, 1)), sq], axis=1))


def _kernel_density(sq: np.ndarray) -> np.ndarray:
    """``mean_j exp(-sq_j / 2h²)`` per row, column 0 the row itself, ``h`` the median of the other distances."""
    dist = np.sqrt(sq[:, 1:])
    h = float(np.median(dist))
    if h <= 0:
        positive = dist[dist > 0]
        h = float(positive.mean()) if positive.size else 1.0
    return np.exp(-sq / (2.0 * h * h)).mean(axis=1)


def length_feature(lengths: np.ndarray) -> np.ndarray:
    """``l(x)``: ``log(length)`` z-scored within the group; all zeros when every length is equal."""
    log_len = np.log(np.maximum(np.asarray(lengths, dtype=np.float64), 1.0))
    std = float(log_len.std())
    if std < 1e-12:
        return np.zeros_like(log_len)
    return (log_len - log_len.mean()) / std


def intra_cluster_probabilities(
    embeddings: np.ndarray,
    lengths: np.ndarray,
    beta: float = 0.3,
    knn: int = 10,
    length_clip: float = 10.0,
    reference: Optional[np.ndarray] = None,
) -> np.ndarray:
    """GRIP's length-rectified geometric prior inside one cluster: ``pi(x) ∝ exp(beta · l(x)) / p(x)``, normalised.

    ``1 / p(x)`` (:func:`local_density`) favours sparse regions; ``exp(beta · l(x))`` (:func:`length_feature`,
    clipped to ``[1/length_clip, length_clip]``) pulls long sequences back, which the paper says collapse
    into dense cones of embedding space and would otherwise look redundant.
    """
    prior = np.clip(np.exp(beta * length_feature(lengths)), 1.0 / length_clip, length_clip)
    pi = prior / local_density(embeddings, knn, reference)
    return pi / pi.sum()


# ---------------------------------------------------------------------- state
class GripState:
    """GRIP's memory within and between refreshes (rank 0 only).

    :meth:`Grip.to_probe` clusters the pool and draws the probe slices; :meth:`Grip.select`, called at the
    same refresh with the probes' losses (and their request, whose ``keys`` are the probed clusters), reuses
    the clusters kept here. ``refresh`` identifies that refresh; a ``select`` at another refresh re-clusters.

    Attributes:
        refresh: ``[epoch, step, now_batch]`` of the refresh the clusters belong to, or ``None``.
        assignment: ``(N,)`` int64 cluster of each example, -1 for examples without an embedding then.
        centroids: ``(K, d)`` float32 unit centroids (new examples are assigned to the nearest).
        dispersion: ``(K,)`` float64 ``o_k``.
        cluster_seconds: wall clock of the last clustering.
        last_delta / last_budgets: ``(K,)`` adaptation deltas and budgets of the last estimate (the budgets are what a
            redraw draws again).
        draw_weight: ``(N,)`` float32 draw weight of each example at the last estimate (its cluster's ``π``; 1 in
            clusters taken whole or not drawn from; NaN for examples without an embedding then), or ``None``.
        since_estimate: refreshes that redrew from the last estimate since it was made (``reestimate_every``).
    """

    def __init__(self, pool_size: int) -> None:
        self.pool_size = int(pool_size)
        self.refresh: Optional[list[int]] = None
        self.assignment: Optional[Tensor] = None
        self.centroids: Optional[Tensor] = None
        self.dispersion: Optional[Tensor] = None
        self.cluster_seconds = 0.0
        self.last_delta: Optional[Tensor] = None
        self.last_budgets: Optional[Tensor] = None
        self.draw_weight: Optional[Tensor] = None
        self.since_estimate = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "refresh": None if self.refresh is None else list(self.refresh),
            "assignment": self.assignment,
            "centroids": self.centroids,
            "dispersion": self.dispersion,
            "cluster_seconds": self.cluster_seconds,
            "last_delta": self.last_delta,
            "last_budgets": self.last_budgets,
            "draw_weight": self.draw_weight,
            "since_estimate": self.since_estimate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["pool_size"]) != self.pool_size:
            raise ValueError(
                f"GripState: the checkpoint covers {state['pool_size']} examples, the pool has {self.pool_size}."
            )

        def copy(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.clone()

        self.refresh = None if state["refresh"] is None else [int(v) for v in state["refresh"]]
        self.assignment = copy(state["assignment"])
        self.centroids = copy(state["centroids"])
        self.dispersion = copy(state["dispersion"])
        self.cluster_seconds = float(state["cluster_seconds"])
        self.last_delta = copy(state["last_delta"])
        self.last_budgets = copy(state["last_budgets"])
        self.draw_weight = copy(state.get("draw_weight"))  # absent in checkpoints written before reestimate_every
        self.since_estimate = int(state.get("since_estimate", 0))


# ---------------------------------------------------------------------- strategy
@register_strategy("grip")
class Grip(Strategy):
    r"""Cluster-level budgets re-allocated by a Rapid Adaptation Probe; density- and length-aware sampling inside.

    Each refresh clusters the measured examples' live embeddings (spherical k-means), probes each cluster
    with a few optimizer steps on a snapshot of the live model (:meth:`to_probe`), shares the budget as
    ``B_k ∝ N_k^tau · softmax_k(Q_k / T) · r_k`` (``r_k = 1 + alpha · rank01(replay_sign · δL_k)`` from the
    probe's loss drops, ``Q_k`` the cluster's mean quality score), and draws ``B_k`` examples inside each
    cluster with probability ``∝ exp(beta · l(x)) / p(x)`` (:func:`intra_cluster_probabilities`). That estimate is
    made at every ``reestimate_every``-th refresh; the refreshes in between draw again from it. Weights are
    ``None``. How it works, where it departs from the paper, when to use it, suggested settings and costs:
    the ``grip`` section of ``grace_lightning/strategies/README.md``.

    Args:
        clusters: number of k-means clusters ``K`` (``None``: ``round(sqrt(M)/4)`` clipped to ``[2, 256]``).
        kmeans_iters: k-means iterations.
        probe_fraction: share of the measured examples in the probe set, in ``[0, 1]``; 0 disables the
            probe (budgets from size and quality only). The paper uses 0.005.
        probe_min_per_cluster: minimum probe examples per cluster (>= 2: one to train, one to evaluate).
        rap_steps: optimizer steps per probe (the paper's ``K = 10``).
        rap_trainable: ``"head"`` (the paper's ``N = 0`` partial reset: head only) or ``"all"``.
        rap_reset_head: re-initialise the head before each probe, as the paper's proxy does.
        rap_features: with ``rap_trainable="head"``, ``"frozen"`` trains the head on the body's eval-mode
            features, computed once per probe example for many probes at a time (a few large forwards of the
            body a refresh instead of ``rap_steps + 2`` small ones per probe), or ``"live"``: every step runs
            the whole model in train mode (dropout, BatchNorm batch statistics).
        alpha: strength of the replay multiplier (>= 0; 0 ignores the probe).
        replay_sign: ``+1``: clusters whose loss drops more get more budget (the paper's "representation
            deficit"); ``-1``: less ("learned instantly = too easy").
        replay_signal: ``"ratio"`` (relative drop, the paper's) or ``"absolute"`` loss drop.
        tau: cluster-size exponent (0.5 = square-root sampling, 1 = proportional).
        temperature: ``T`` of the quality softmax (> 0), in the units of the user's quality scores.
        quality_gate: share (quantile) of clusters by ``Q_k`` dropped when quality scores are given, in
            ``[0, 1)``.
        beta: length recovery coefficient (>= 0; 0 = density prior only).
        knn: neighbours of the density estimate.
        density_sample: a cluster with more members searches their neighbours among a uniform sample of this
            many of them (``O(N_k · m · d)`` instead of ``O(N_k² · d)``); ``None``: every cluster exactly.
        length_clip: bound ``c`` on the length prior, clipped to ``[1/c, c]`` (>= 1).
        reestimate_every: estimate (cluster, probe, measure densities) at every this many refreshes; the refreshes
            in between draw a fresh subset from the last estimate's cluster budgets and in-cluster weights, with no
            scoring pass, clustering, probe or density (milliseconds, where an estimate costs about an epoch's
            training at a 10% budget on the bench's CNN). The default ``3`` cut GRIP's selection time 2.2-3.5x at
            the same accuracy on noisy and long Fashion-MNIST and tweets at 10% and 30% (``README.md``,
            ``benchmarks/grip_reestimate.toml``); ``1`` estimates at every refresh, as the paper does.
        rescore_share: the stalest examples rescored per refresh, as a share of the budget (``0.25``: a quarter of the
            budget's worth; ``None``: the whole pool, as the paper re-embeds); see
            :func:`~grace_lightning.strategies.base.stalest_first`.

    Raises:
        ValueError: on a parameter outside the ranges above, naming it.

    Example::

        CoresetCallback(sampler, strategy="grip", strategy_kwargs={"probe_fraction": 0.02, "beta": 0.3})
    """

    needs = frozenset({"loss", "embedding"})
    overlap_by_default = True
    reference = "unused"
    uses_quality = True

    def __init__(
        self,
        clusters: Optional[int] = None,
        kmeans_iters: int = 20,
        probe_fraction: float = 0.02,
        probe_min_per_cluster: int = 4,
        rap_steps: int = 10,
        rap_trainable: str = "head",
        rap_reset_head: bool = False,
        rap_features: str = "frozen",
        alpha: float = 1.0,
        replay_sign: int = 1,
        replay_signal: str = "ratio",
        tau: float = 0.5,
        temperature: float = 1.0,
        quality_gate: float = 0.1,
        beta: float = 0.3,
        knn: int = 10,
        density_sample: Optional[int] = 4096,
        length_clip: float = 10.0,
        rescore_share: Optional[float] = 0.25,
        reestimate_every: int = 3,
    ) -> None:
        if clusters is not None:
            positive_int("grip", "clusters", clusters, hint=", or None (round(sqrt(N)/4))")
        positive_int("grip", "kmeans_iters", kmeans_iters)
        unit_interval("grip", "probe_fraction", probe_fraction, hint=" (0: no probe)")
        integer(
            "grip", "probe_min_per_cluster", probe_min_per_cluster, minimum=2,
            hint=" (one example to train, one to evaluate)",
        )
        positive_int("grip", "rap_steps", rap_steps, hint=" (the paper uses 10)")
        if rap_trainable not in ("head", "all"):
            raise ValueError(f"grip: `rap_trainable` must be 'head' or 'all', got {rap_trainable!r}.")
        boolean("grip", "rap_reset_head", rap_reset_head)
        if rap_features not in ("frozen", "live"):
            raise ValueError(f"grip: `rap_features` must be 'frozen' or 'live', got {rap_features!r}.")
        non_negative_float("grip", "alpha", alpha)
        if isinstance(replay_sign, bool) or replay_sign not in (1, -1):
            raise ValueError(f"grip: `replay_sign` must be 1 or -1, got {replay_sign!r}.")
        if replay_signal not in ("ratio", "absolute"):
            raise ValueError(f"grip: `replay_signal` must be 'ratio' or 'absolute', got {replay_signal!r}.")
        non_negative_float("grip", "tau", tau, hint=" (0.5 = square-root sampling)")
        positive_float("grip", "temperature", temperature)
        unit_interval("grip", "quality_gate", quality_gate, high_open=True, hint=" (0 drops no cluster)")
        non_negative_float("grip", "beta", beta, hint=" (the paper uses 0.3)")
        positive_int("grip", "knn", knn)
        if density_sample is not None:
            integer("grip", "density_sample", density_sample, minimum=2, hint=", or None (exact in every cluster)")
        real("grip", "length_clip", length_clip, low=1.0)
        self.rescore_share = rescore_share_arg("grip", rescore_share)
        self.reestimate_every = positive_int("grip", "reestimate_every", reestimate_every, hint=" (1: every refresh)")
        self.clusters = clusters
        self.kmeans_iters = kmeans_iters
        self.probe_fraction = float(probe_fraction)
        self.probe_min_per_cluster = probe_min_per_cluster
        self.rap_steps = rap_steps
        self.rap_trainable = rap_trainable
        self.rap_reset_head = rap_reset_head
        self.rap_features = rap_features
        self.alpha = float(alpha)
        self.replay_sign = int(replay_sign)
        self.replay_signal = replay_signal
        self.tau = float(tau)
        self.temperature = float(temperature)
        self.quality_gate = float(quality_gate)
        self.beta = float(beta)
        self.knn = knn
        self.density_sample = density_sample
        self.length_clip = float(length_clip)

    def __repr__(self) -> str:
        return (
            f"Grip(clusters={self.clusters}, probe_fraction={self.probe_fraction}, rap_steps={self.rap_steps}, "
            f"alpha={self.alpha}, tau={self.tau}, beta={self.beta})"
        )

    def create_state(self, pool_size: int) -> GripState:
        return GripState(pool_size)

    # ------------------------------------------------------------------ estimate or redraw
    def _redraws(self, inputs: SelectionInput) -> bool:
        """Whether this refresh draws again from the last estimate (``reestimate_every``) instead of estimating: the
        estimate is fresh enough and weighs every example measured now."""
        state, store = inputs.state, inputs.store
        if self.reestimate_every == 1 or state is None or state.draw_weight is None or store is None:
            return False
        if state.since_estimate + 1 >= self.reestimate_every:
            return False
        if int(state.last_budgets.sum()) != min(int(inputs.budget), inputs.pool_size):
            return False  # the estimate filled part of the budget with unmeasured examples: estimate again
        return not bool(torch.isnan(state.draw_weight[store.measured]).any())

    def to_score(self, inputs: SelectionInput) -> Optional[Tensor]:
        """The default rescoring at an estimate; at a redraw, only what was never measured (normally nothing)."""
        if self._redraws(inputs):
            return stalest_first(inputs, 0.0)
        return super().to_score(inputs)

    # ------------------------------------------------------------------ probes
    def to_probe(self, inputs: SelectionInput) -> Optional[ProbeRequest]:
        """Cluster the measured pool and ask for one Rapid Adaptation Probe per cluster (None when nothing to probe,
        or when this refresh redraws from the last estimate).

        Needs ``inputs.state`` (where the clusters wait for :meth:`select`); without it, asks for none.
        """
        state, store = inputs.state, inputs.store
        if state is None or self.probe_fraction == 0 or store is None or store.embedding is None:
            return None
        if self._redraws(inputs):
            return None
        ids = store.measured.nonzero().squeeze(1).numpy()
        if ids.size < 2:
            return None
        self._cluster(inputs, state, ids)
        assignment = state.assignment.numpy()[ids]
        k = int(state.dispersion.numel())
        sizes = np.bincount(assignment, minlength=k)
        probeable = np.where(sizes >= 2, sizes, 0)  # a probe needs one example to train and one to evaluate
        target = round(self.probe_fraction * inputs.fidelity * ids.size)
        counts = neyman_allocation(probeable, state.dispersion.numpy(), target, self.probe_min_per_cluster)
        tasks, clusters = [], []
        for c in np.flatnonzero(counts >= 2):
            members = torch.from_numpy(ids[assignment == c])
            drawn = members[torch.randperm(members.numel(), generator=inputs.generator)[: int(counts[c])]]
            half = drawn.numel() // 2
            train_slice, heldout_slice = drawn[:half].sort().values, drawn[half:].sort().values
            steps = (train_slice,) * self.rap_steps
            tasks.append(ProbeTask(steps=steps, eval_indices=heldout_slice, eval_every_step=False))
            clusters.append(int(c))
        if not tasks:
            return None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inputs.generator))
        return ProbeRequest(
            tuple(tasks), trainable=self.rap_trainable, reset_head=self.rap_reset_head, seed=seed,
            head_features=self.rap_features,
            keys=torch.tensor(clusters, dtype=torch.int64),  # the cluster each task probes, read back in select
        )

    def _cluster(self, inputs: SelectionInput, state: GripState, ids: np.ndarray) -> None:
        """Spherical k-means on the measured embeddings; writes the clusters (non-empty, renumbered) to ``state``."""
        began = time.perf_counter()
        x = inputs.store.embedding.numpy()[ids].astype(np.float32)
        k = self.clusters if self.clusters is not None else default_cluster_count(ids.size)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inputs.generator))
        found = spherical_kmeans(x, int(min(k, ids.size)), niter=self.kmeans_iters, seed=seed)
        used, assignment = np.unique(found.assignment, return_inverse=True)  # faiss may leave clusters empty
        full = np.full(inputs.pool_size, -1, dtype=np.int64)
        full[ids] = assignment
        state.assignment = torch.from_numpy(full)
        state.centroids = torch.from_numpy(np.ascontiguousarray(found.centroids[used], dtype=np.float32))
        state.dispersion = torch.from_numpy(cluster_dispersion(found.similarity, assignment, used.size))
        state.refresh = _refresh_key(inputs)
        state.cluster_seconds = time.perf_counter() - began

    # ------------------------------------------------------------------ selection
    def select(self, inputs: SelectionInput) -> Selection:
        store = inputs.store
        require_embeddings(store, "grip")
        if self._redraws(inputs):
            return self._redraw(inputs)
        state = inputs.state if inputs.state is not None else GripState(inputs.pool_size)
        budget = min(int(inputs.budget), inputs.pool_size)
        measured = store.measured.numpy()
        ids = np.flatnonzero(measured)
        diagnostics: dict[str, float] = {}
        clustered_now = 0.0
        if state.refresh != _refresh_key(inputs) or state.assignment is None:
            if inputs.probe is not None:
                raise ValueError(
                    "grip: `select` got probe results, but `inputs.state` does not hold the clusters `to_probe` "
                    "drew them from at this refresh; call `to_probe` and `select` with the same state and refresh."
                )
            if ids.size:
                self._cluster(inputs, state, ids)
                clustered_now = state.cluster_seconds
        else:
            self._assign_new(store, state, ids)
        diagnostics["cluster_seconds"] = clustered_now

        picks: list[np.ndarray] = []
        take = min(budget, ids.size)
        if take > 0:
            picks.append(self._select_measured(inputs, state, ids, take, diagnostics))
        filled = budget - take
        if filled > 0:  # too few measured examples: the rest uniformly among the unmeasured
            unmeasured = torch.from_numpy(np.flatnonzero(~measured))
            picks.append(uniform_draw(unmeasured, filled, inputs.generator).numpy())
        diagnostics["filled_unmeasured"] = float(filled)
        diagnostics["redrawn"] = 0.0
        state.since_estimate = 0
        indices = torch.from_numpy(np.sort(np.concatenate(picks or [np.zeros(0, dtype=np.int64)])).astype(np.int64))
        if take > 0:
            length = store.length.numpy().astype(np.float64)
            diagnostics["length_ratio"] = float(length[indices.numpy()].mean() / max(length[ids].mean(), 1e-12))
        return Selection(indices=indices, weights=None, diagnostics=diagnostics)

    def _redraw(self, inputs: SelectionInput) -> Selection:
        """A fresh draw of the last estimate's budget of each cluster, in proportion to its in-cluster weights."""
        state = inputs.state
        ids = inputs.store.measured.nonzero().squeeze(1).numpy()
        assignment, budgets = state.assignment.numpy()[ids], state.last_budgets.numpy()
        weight = state.draw_weight.numpy()
        picks = []
        for c in np.flatnonzero(budgets):
            members = ids[assignment == c]
            take = int(min(budgets[c], members.size))
            picks.append(members if take == members.size else members[gumbel_top_k(weight[members], take, inputs.generator)])
        state.since_estimate += 1
        indices = np.sort(np.concatenate(picks or [np.zeros(0, dtype=np.int64)])).astype(np.int64)
        diagnostics = {"redrawn": 1.0, "cluster_seconds": 0.0, "density_seconds": 0.0, "filled_unmeasured": 0.0}
        return Selection(indices=torch.from_numpy(indices), weights=None, diagnostics=diagnostics)

    def _assign_new(self, store, state: GripState, ids: np.ndarray) -> None:
        """Examples measured after :meth:`to_probe` clustered join their most similar centroid."""
        assignment = state.assignment.numpy()
        new = ids[assignment[ids] < 0]
        if new.size:
            x = store.embedding.numpy()[new].astype(np.float32)
            faiss.normalize_L2(x)
            assignment = assignment.copy()
            assignment[new] = np.argmax(x @ state.centroids.numpy().T, axis=1)
            state.assignment = torch.from_numpy(assignment)

    def _select_measured(
        self, inputs: SelectionInput, state: GripState, ids: np.ndarray, take: int, diagnostics: dict[str, float]
    ) -> np.ndarray:
        store = inputs.store
        assignment = state.assignment.numpy()[ids]
        k = int(state.dispersion.numel())
        sizes = np.bincount(assignment, minlength=k)

        delta = np.full(k, np.nan)
        probe_examples = 0
        if inputs.probe is not None:
            request = inputs.probe.request
            asked = 0 if request is None or request.keys is None else len(request.keys)
            if asked == 0 or len(inputs.probe.losses) != asked:
                raise ValueError(
                    f"grip: got {len(inputs.probe.losses)} probe results for {asked} probe tasks; `inputs.probe` "
                    "must be the ProbeResults (with its `request`) of the request `to_probe` returned at this refresh."
                )
            delta[request.keys.numpy()] = adaptation_delta(inputs.probe.losses, self.replay_signal)
            probe_examples = sum(t.steps[0].numel() + t.eval_indices.numel() for t in request.tasks)
        replay = replay_multipliers(delta, self.alpha, self.replay_sign)

        quality = None
        if inputs.quality is not None:
            quality = _cluster_quality(inputs.quality.numpy().astype(np.float64)[ids], assignment, k)
        weights, gated = cluster_base_weights(sizes, self.tau, quality, self.temperature, self.quality_gate)
        budgets = allocate_budgets(weights * replay, sizes, take)

        density_began = time.perf_counter()
        embedding, length = store.embedding.numpy(), store.length.numpy()
        draw_weight = np.full(inputs.pool_size, np.nan, dtype=np.float32)
        draw_weight[ids] = 1.0  # taken whole, or not drawn from
        picks = []
        for c in np.flatnonzero(budgets):
            members = ids[assignment == c]
            if budgets[c] >= members.size:
                picks.append(members)
                continue
            reference = None
            if self.density_sample is not None and members.size > self.density_sample:
                drawn = torch.randperm(members.size, generator=inputs.generator)[: self.density_sample]
                reference = drawn.sort().values.numpy()
            pi = intra_cluster_probabilities(
                embedding[members], length[members], self.beta, self.knn, self.length_clip, reference
            )
            picks.append(members[gumbel_top_k(pi, int(budgets[c]), inputs.generator)])
            draw_weight[members] = pi
        diagnostics["density_seconds"] = time.perf_counter() - density_began
        state.draw_weight = torch.from_numpy(draw_weight)

        state.last_delta = torch.from_numpy(delta)
        state.last_budgets = torch.from_numpy(budgets)
        finite = delta[np.isfinite(delta)]
        share = budgets[budgets > 0] / budgets.sum()
        diagnostics.update(
            clusters=float(k),
            probed_clusters=float(finite.size),
            probe_examples=float(probe_examples),
            delta_mean=float(finite.mean()) if finite.size else float("nan"),
            delta_min=float(finite.min()) if finite.size else float("nan"),
            delta_max=float(finite.max()) if finite.size else float("nan"),
            replay_max=float(replay.max()),
            gated_clusters=float(gated.sum()),
            capped_clusters=float(((budgets == sizes) & (sizes > 0)).sum()),
            budget_entropy=float(-(share * np.log(share)).sum()),
        )
        return np.concatenate(picks)


def _cluster_quality(quality: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """Mean finite quality per cluster; a cluster without any takes the mean of the others."""
    finite = np.isfinite(quality)
    sums = np.bincount(assignment[finite], weights=quality[finite], minlength=k)
    counts = np.bincount(assignment[finite], minlength=k)
    means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
    if (counts == 0).any():
        means[counts == 0] = means[counts > 0].mean() if (counts > 0).any() else 0.0
    return means


def _refresh_key(inputs: SelectionInput) -> list[int]:
    return [int(inputs.epoch), int(inputs.step), int(inputs.now_batch)]
