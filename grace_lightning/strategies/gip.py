"""``gip``: Greedy Information Projection, the examples whose span best captures a set of query embeddings.

After Dong, Lee, Shuai, Liu, Liu, Jiao, *Greedy Information Projection for LLM Data Selection*, DATA-FM
workshop @ ICLR 2026 (arXiv:2603.13790). Only the abstract is public and there is no code; the objective
below is this project's reconstruction (a latent-task linear-Gaussian model, see :class:`QueryPosterior`), and
every choice the paper leaves open is a parameter, documented in :class:`GIP`.

The functional core works on plain numpy arrays and can be used without any trainer:

* :func:`greedy_projection` maximises ``J(S) = ‖Q P_S‖_F²`` by orthogonal matching pursuit;
* :func:`greedy_logdet` maximises the mutual information ``I(u_S; v)`` of the Gaussian model by exact greedy
  in ``O(N d)`` a pick, on top of :class:`QueryPosterior`, which keeps ``Σ_S`` and ``Q^T A_S^{-1} Q`` by
  rank-one updates.

Example::

    >>> import numpy as np
    >>> X = np.eye(4)[[0, 1, 2, 3, 0]]              # four axes and a duplicate of the first
    >>> Q = np.array([[3.0, 0, 0, 0], [0, 1.0, 0, 0]])
    >>> result = greedy_projection(X, Q, budget=3)
    >>> result.picks.tolist(), result.values.tolist()  # the span saturates after the two query axes
    ([0, 1], [9.0, 10.0])
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    register_strategy,
    require_embeddings,
    rescore_share_arg,
    uniform_draw,
)
from grace_lightning.validation import positive_float, positive_int, positive_int_or_none, unit_interval

__all__ = [
    "GIP", "GreedyResult", "QueryPosterior", "compress_queries", "greedy_logdet", "greedy_logdet_stochastic",
    "greedy_projection",
]

# Squared residual norm, relative to the row's own squared norm, below which a candidate is taken to lie in
# the chosen span already. A unit row stored in fp16 carries ~6e-4 of rounding noise in norm at d = 128
# (~4e-7 squared), so a residual below ~3e-3 is storage noise, not a new direction.
_RESIDUAL_FLOOR = 1e-5
# The projection objective is saturated when the best gain is below this share of ‖Q‖_F² (float32 noise
# in the incremental correlations is ~1e-7 relative).
_SATURATION_TOL = 1e-6
# Σ_S and M are rebuilt from X_S^T X_S this often, so rank-one round-off cannot accumulate over thousands of picks.
_REFACTOR_EVERY = 128
# The candidates' quadratic forms are recomputed exactly this often (two (N, d) x (d, d) products).
_RESCORE_EVERY = 512
# The batched stochastic greedy takes at least this many steps: picks made in one step do not see each other, so a
# step holding a large share of a small budget would lose objective (64 picks of 100 in one step: 4% of the MI).
_MIN_STEPS = 64
# Rows handled at once when gains are computed for the whole pool (bounds the float64 temporaries).
_CHUNK = 8192
# The embedding width at which ``exact_limit`` counts picks x candidates as they are.
_EXACT_LIMIT_WIDTH = 128


def _matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y`` in ``x``'s dtype, returned as float64.

    Through torch: numpy's multithreaded OpenBLAS matrix-vector products slow down tenfold or more when the
    CPUs are shared (measured during training-time selection on 2 busy cores), torch's do not.
    """
    out = torch.from_numpy(x) @ torch.from_numpy(np.ascontiguousarray(y, dtype=x.dtype))
    return out.numpy().astype(np.float64, copy=False)


def _rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` as a C-contiguous, writeable float32 or float64 array (torch shares its memory); copies only if needed."""
    x = np.asarray(rows)
    return np.require(x, x.dtype if x.dtype in (np.float32, np.float64) else np.float64, ["C", "W"])


@dataclass(frozen=True)
class GreedyResult:
    """What the greedy procedures return.

    Attributes:
        picks: ``(k,)`` int64 row indices of the candidates, in the order they were chosen (``k <= budget``;
            fewer when the candidates run out or, for the projection, when the span saturates).
        values: ``(k,)`` float64 objective after each pick (``J(S)`` for the projection, the mutual information
            in nats for the log-det objective, counting any ``initial`` rows).
    """

    picks: np.ndarray
    values: np.ndarray


def compress_queries(queries: np.ndarray) -> np.ndarray:
    """An ``(min(m, d), d)`` matrix ``T`` with ``T^T T = Q^T Q``: both objectives depend on ``Q`` only through it.

    ``‖Q P‖_F² = tr(P Q^T Q P)`` for any projector ``P``, and the eigenvalues of ``Q Σ Q^T + σ_q² I_m`` are those
    of ``T Σ T^T + σ_q² I_d`` plus ``m − d`` copies of ``σ_q²``, so log-det gains are unchanged. With ``m > d``
    this is the ``R`` factor of a QR decomposition; otherwise ``Q`` itself. It keeps the ``(N, m)`` correlations
    at ``(N, d)`` whatever the number of queries.
    """
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"gip: queries must be an (m, d) matrix, got shape {q.shape}.")
    if q.shape[0] > q.shape[1]:
        return np.linalg.qr(q, mode="r")
    return q


def greedy_projection(
    candidates: np.ndarray,
    queries: np.ndarray,
    budget: int,
    *,
    residual_floor: float = _RESIDUAL_FLOOR,
    saturation_tol: float = _SATURATION_TOL,
) -> GreedyResult:
    """Greedy maximisation of ``J(S) = ‖Q P_S‖_F²`` by orthogonal matching pursuit with rank-one residual updates.

    ``P_S`` is the orthogonal projector onto the span of the chosen rows. Adding candidate ``i`` adds
    ``‖R z_i‖² / ‖z_i‖²`` to ``J``, where ``z_i`` is ``x_i`` minus its projection on the chosen span and
    ``R = Q (I − P_S)`` the query residual; after each pick, candidates' residuals ``Z``, the query residual
    ``R`` and their correlations ``G = Z R^T`` are deflated along the new unit direction
    (modified Gram-Schmidt), so a step costs ``O(N (d + m'))`` with ``m' = min(m, d)`` (see
    :func:`compress_queries`). Runs in the dtype of ``candidates`` when it is float32 or float64.

    Stops before ``budget`` picks once the span saturates: every remaining candidate's residual is below
    ``residual_floor`` of its squared norm (it lies in the span; always the case after ``d`` picks), or
    the best gain is at most ``saturation_tol * ‖Q‖_F²`` (the span already holds the queries).

    Args:
        candidates: ``(N, d)`` candidate rows ``X``.
        queries: ``(m, d)`` query rows ``Q``.
        budget: most picks.
        residual_floor: see above.
        saturation_tol: see above.

    Returns:
        :class:`GreedyResult` with ``values[t] = J`` after ``t + 1`` picks.
    """
    z = np.array(_rows(candidates), copy=True)
    dtype = z.dtype
    r = compress_queries(queries).astype(dtype)
    if z.ndim != 2 or r.shape[1] != z.shape[1]:
        raise ValueError(f"gip: candidates {z.shape} and queries {np.shape(queries)} must share the dimension d.")
    total = float(np.square(r, dtype=np.float64).sum())
    g = _matmul(z, r.T).astype(dtype)
    norms0 = np.einsum("ij,ij->i", z, z, dtype=np.float64)
    nz = norms0.copy()
    available = norms0 > 0
    picks: list[int] = []
    values: list[float] = []
    for _ in range(min(int(budget), z.shape[0])):
        if total <= 0 or not available.any():
            break
        gain = np.einsum("ij,ij->i", g, g, dtype=np.float64) / np.where(available, nz, 1.0)
        gain[~available] = -1.0
        best = int(np.argmax(gain))
        if gain[best] <= saturation_tol * total:
            break
        u = (z[best] / math.sqrt(nz[best])).astype(dtype)
        a = _matmul(z, u).astype(dtype)
        ru = r @ u
        z -= np.outer(a, u)
        r -= np.outer(ru, u)
        g -= np.outer(a, ru)
        # Recomputed rather than deflated (nz -= a²): the subtraction loses the small residuals that decide saturation.
        nz = np.einsum("ij,ij->i", z, z, dtype=np.float64)
        available &= nz > residual_floor * norms0
        available[best] = False
        picks.append(best)
        values.append(total - float(np.square(r, dtype=np.float64).sum()))
    return GreedyResult(np.asarray(picks, dtype=np.int64), np.asarray(values, dtype=np.float64))


class QueryPosterior:
    r"""The Gaussian model's state after observing a set ``S``: marginal gains and rank-one updates in ``O(d²)``.

    Model (this project's reconstruction of GIP): latent ``θ ~ N(0, I_d)``; a chosen example gives ``u_i = x_i·θ + ε_i``,
    ``ε_i ~ N(0, σ²)``; the queries are ``v = Q θ + N(0, σ_q² I_m)``. Then

    ``I(u_S; v) = ½ log det(Q Q^T + σ_q² I) − ½ log det(A_S)``,  ``A_S = Q Σ_S Q^T + σ_q² I``,
    ``Σ_S = (I + σ^{-2} X_S^T X_S)^{-1}``,

    and by the matrix determinant lemma the gain of adding ``x`` is
    ``Δ(x) = −½ log(1 − v^T M v / (σ² + x^T v))`` with ``v = Σ_S x`` and ``M = Q^T A_S^{-1} Q`` (``d × d``).
    Adding ``x`` updates ``Σ`` by Sherman-Morrison and ``M`` by ``M += (M v)(M v)^T / (σ² + x^T v − v^T M v)``;
    every ``refactor_every`` additions both are rebuilt from ``X_S^T X_S`` to shed round-off.

    Args:
        queries: ``(m, d)`` query rows ``Q``.
        sigma2: observation noise ``σ² > 0``.
        sigma_q2: query noise ``σ_q² > 0``.
        refactor_every: additions between exact rebuilds (``None``: every 128).

    Example::

        posterior = QueryPosterior(Q, sigma2=0.1, sigma_q2=1e-3)
        gains = posterior.gains(X)          # marginal gains of every row of X given S = {}
        posterior.add(X[int(gains.argmax())])
    """

    def __init__(
        self, queries: np.ndarray, sigma2: float, sigma_q2: float, refactor_every: Optional[int] = None
    ) -> None:
        self.t = compress_queries(queries)
        self.dim = self.t.shape[1]
        self.sigma2 = float(sigma2)
        self.sigma_q2 = float(sigma_q2)
        self.refactor_every = int(refactor_every) if refactor_every is not None else _REFACTOR_EVERY
        self.gram = np.zeros((self.dim, self.dim))  # X_S^T X_S of the rows up to the last rebuild
        self._recent: list[np.ndarray] = []  # the rows added after it, ``(b, d)`` blocks
        self._n_recent = 0
        self._outer = np.empty((self.dim, self.dim))  # scratch for the rank-one updates
        self.size = 0
        self._logdet0 = self._logdet_a(np.eye(self.dim))
        self.mutual_information = 0.0
        self._rebuild()

    def _logdet_a(self, sigma: np.ndarray) -> float:
        a = self.t @ sigma @ self.t.T + self.sigma_q2 * np.eye(self.t.shape[0])
        return float(np.linalg.slogdet(a)[1])

    def _rebuild(self) -> None:
        # The rows added since the last rebuild join the Gram matrix in one matrix product, not one outer product
        # each: at B = 18,000 picks the per-pick outer products were a third of the greedy's time.
        if self._recent:
            recent = np.concatenate(self._recent)
            self.gram += recent.T @ recent
        self._recent, self._n_recent = [], 0
        sigma = np.linalg.inv(np.eye(self.dim) + self.gram / self.sigma2)
        self.sigma = (sigma + sigma.T) / 2
        a = self.t @ self.sigma @ self.t.T + self.sigma_q2 * np.eye(self.t.shape[0])
        m = self.t.T @ np.linalg.solve(a, self.t)
        self.m = (m + m.T) / 2
        self.mutual_information = 0.5 * (self._logdet0 - float(np.linalg.slogdet(a)[1]))

    def quadratic_forms(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(num, den)``, float64 ``(b,)``: ``num_i = v_i^T M v_i`` and ``den_i = σ² + x_i^T v_i``, ``v_i = Σ_S x_i``."""
        x = _rows(rows).reshape(-1, self.dim)
        kernel = self.sigma @ self.m @ self.sigma
        num = np.empty(x.shape[0])
        den = np.empty(x.shape[0])
        for lo in range(0, x.shape[0], _CHUNK):
            part = x[lo : lo + _CHUNK]
            num[lo : lo + _CHUNK] = np.einsum("ij,ij->i", _matmul(part, kernel), part)
            den[lo : lo + _CHUNK] = self.sigma2 + np.einsum("ij,ij->i", _matmul(part, self.sigma), part)
        return num, den

    def gains(self, rows: np.ndarray) -> np.ndarray:
        """``(b,)`` marginal gains ``Δ`` (nats) of adding each of ``rows`` (``(b, d)``) alone to the current ``S``."""
        num, den = self.quadratic_forms(np.asarray(rows, dtype=np.float64))
        # num < den exactly (A_{S+i} stays positive definite); the clip only guards round-off.
        return -0.5 * np.log1p(-np.clip(num / den, 0.0, 1.0 - 1e-15))

    def add(self, row: np.ndarray) -> float:
        """Add ``row`` to ``S``; return its gain (nats)."""
        x = np.asarray(row, dtype=np.float64).reshape(self.dim)
        v = self.sigma @ x
        s = self.sigma2 + float(x @ v)
        w = self.m @ v
        tau = s - float(v @ w)  # = s (1 − ρ) > 0
        gain = -0.5 * math.log(max(tau / s, 1e-15))
        self._recent.append(x[None])
        self._n_recent += 1
        self.size += 1
        if self._n_recent >= self.refactor_every:
            self._rebuild()
        else:
            # Rank-one updates through one preallocated (d, d) buffer: no temporaries per pick. Plain numpy
            # arithmetic, not torch: alternating numpy's BLAS threads with torch's in this loop made each wait for
            # the other's to spin down (a 256-wide greedy ran 20-30x slower on 2 cores).
            np.multiply(v[:, None], v[None, :] * (-1.0 / s), out=self._outer)
            self.sigma += self._outer
            np.multiply(w[:, None], w[None, :] * (1.0 / tau), out=self._outer)
            self.m += self._outer
            self.mutual_information += gain
        return gain

    def add_many(self, rows: np.ndarray) -> float:
        """Add the ``(b, d)`` ``rows`` to ``S`` at once (a rank-``b`` Woodbury update); return their joint gain (nats).

        With ``V = Σ X^T``, ``S_b = σ² I + X V`` and ``W = M V``: ``Σ −= V S_b^{-1} V^T``, ``M += W C^{-1} W^T`` with
        ``C = S_b − V^T W``, and the gain is ``½ (log det S_b − log det C)``, the rank-one formulas of :meth:`add`
        for ``b`` rows.
        """
        x = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        v = self.sigma @ x.T
        s_b = self.sigma2 * np.eye(x.shape[0]) + x @ v
        w = self.m @ v
        c = s_b - v.T @ w
        gain = 0.5 * (np.linalg.slogdet(s_b)[1] - np.linalg.slogdet(c)[1])
        self._recent.append(x)
        self._n_recent += x.shape[0]
        self.size += x.shape[0]
        if self._n_recent >= self.refactor_every:
            self._rebuild()
        else:
            sigma = self.sigma - v @ np.linalg.solve(s_b, v.T)
            m = self.m + w @ np.linalg.solve(c, w.T)
            self.sigma, self.m = (sigma + sigma.T) / 2, (m + m.T) / 2
            self.mutual_information += float(gain)
        return float(gain)


def _conditioned(candidates, queries, sigma2: float, sigma_q2: float, initial: Optional[Sequence[int]]):
    """``(X, posterior, chosen)`` for a log-det greedy: the candidate rows, the posterior after ``initial``, its mask."""
    x = _rows(candidates)
    posterior = QueryPosterior(queries, sigma2, sigma_q2)
    if x.ndim != 2 or posterior.dim != x.shape[1]:
        raise ValueError(f"gip: candidates {x.shape} and queries {np.shape(queries)} must share the dimension d.")
    chosen = np.zeros(x.shape[0], dtype=bool)
    for i in initial if initial is not None else ():
        if not chosen[i]:
            chosen[i] = True
            posterior.add(x[i])
    return x, posterior, chosen


def greedy_logdet(
    candidates: np.ndarray,
    queries: np.ndarray,
    budget: int,
    *,
    sigma2: float = 0.1,
    sigma_q2: float = 1e-3,
    initial: Optional[Sequence[int]] = None,
) -> GreedyResult:
    """Plain greedy maximisation of the mutual information ``I(u_S; v)`` of :class:`QueryPosterior`, in ``O(N d)`` a pick.

    Every candidate's gain is ``½ log(den_i / (den_i − num_i))`` with the quadratic forms
    ``num_i = x_i^T Σ_S M Σ_S x_i`` and ``den_i = σ² + x_i^T Σ_S x_i``. Adding ``x*`` changes ``Σ_S`` by rank one
    and ``Σ_S M Σ_S`` by rank three, all within the span of ``v = Σ_S x*`` and ``p = Σ_S M v``, so both forms
    are updated for every candidate from the two products ``X v`` and ``X p``:

    ``den_i −= α_i² / s``;  ``num_i += −2 α_i β_i / s + n α_i² / s² + (β_i − α_i n / s)² / τ``

    (``α = X v``, ``β = X p``, ``s = σ² + x*·v``, ``n = v^T M v``, ``τ = s − n``). The forms are recomputed
    exactly every 512 picks so that float32 products cannot accumulate round-off.

    This is the exact greedy, not lazy greedy: the MI is monotone but not submodular in general (with
    low-rank queries, a candidate can gain value once another pick has explained away a nuisance direction),
    so stale gains are not upper bounds; and on embeddings, where gains shrink together, lazy greedy
    re-evaluates a large share of the pool at each pick anyway. Ties go to the smallest index.

    Args:
        candidates: ``(N, d)`` candidate rows ``X`` (float32 or float64; other dtypes are cast to float64).
        queries: ``(m, d)`` query rows ``Q``.
        budget: picks to make beyond ``initial`` (fewer only when the candidates run out).
        sigma2: observation noise ``σ² > 0``.
        sigma_q2: query noise ``σ_q² > 0``.
        initial: rows of ``candidates`` already chosen (conditioned on, never picked again).

    Returns:
        :class:`GreedyResult`; ``values[t]`` is the MI (nats) after the ``t + 1``-th pick, counting ``initial``.
    """
    x, posterior, chosen = _conditioned(candidates, queries, sigma2, sigma_q2, initial)
    count = min(int(budget), int((~chosen).sum()))
    picks: list[int] = []
    values: list[float] = []
    if count <= 0:
        return GreedyResult(np.zeros(0, dtype=np.int64), np.zeros(0))
    num, den = posterior.quadratic_forms(x)
    for step in range(count):
        # den/(den − num) is monotone in the gain; it spares N logarithms per pick.
        score = den / np.maximum(den - num, 1e-300)
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        row = x[best].astype(np.float64)
        v = posterior.sigma @ row
        w = posterior.m @ v
        p = posterior.sigma @ w
        s = posterior.sigma2 + float(row @ v)
        quad = float(v @ w)
        tau = s - quad
        alpha = _matmul(x, v)
        beta = _matmul(x, p)
        num += (-2.0 / s) * alpha * beta + (quad / (s * s)) * alpha * alpha + np.square(beta - (quad / s) * alpha) / tau
        den -= alpha * alpha / s
        posterior.add(row)
        chosen[best] = True
        picks.append(best)
        values.append(posterior.mutual_information)
        if (step + 1) % _RESCORE_EVERY == 0:
            num, den = posterior.quadratic_forms(x)
    return GreedyResult(np.asarray(picks, dtype=np.int64), np.asarray(values))


def greedy_logdet_stochastic(
    candidates: np.ndarray,
    queries: np.ndarray,
    budget: int,
    *,
    sigma2: float = 0.1,
    sigma_q2: float = 1e-3,
    initial: Optional[Sequence[int]] = None,
    epsilon: float = 0.01,
    seed: int = 0,
    batch: int = 1,
) -> GreedyResult:
    """Stochastic greedy (Mirzasoleiman et al., "Lazier than lazy greedy", AAAI 2015) on the same MI as :func:`greedy_logdet`.

    Each pick evaluates only ``s = ceil((N / B) ln(1 / epsilon))`` candidates drawn uniformly (with replacement,
    from a generator seeded with ``seed``) among those not yet chosen, and takes the best of them; a pick costs
    ``O(s d² + d²)`` instead of the exact greedy's ``O(N d)``, so the whole selection is ``O(N d² ln(1/ε))``
    rather than ``O(B N d)``. For monotone submodular objectives its expected value is within
    ``1 − 1/e − epsilon`` of the optimum; the MI here is monotone but not always submodular (see
    :func:`greedy_logdet`), so this is the speed/quality trade the method's "fast greedy" asks for at large
    ``B x N``, and it is measured against the exact greedy in the tests. Same arguments and result as
    :func:`greedy_logdet`, plus ``epsilon``, ``seed`` and ``batch``.

    ``batch > 1`` takes the ``batch`` best of ``batch x s`` sampled candidates at each step and adds them with one
    rank-``batch`` update (:meth:`QueryPosterior.add_many`): as many candidates looked at in all, ``batch`` times
    fewer steps, but never fewer than 64 steps (a step takes at most ``budget // 64`` picks). Within a step the
    picks do not see each other's effect, so two similar candidates can both be taken; ``values`` then holds the MI
    after each step, repeated for each of its picks. ``batch=1`` is the sequential stochastic greedy.
    """
    if int(batch) < 1:
        raise ValueError(f"gip: `batch` must be a positive number of picks per step, got {batch!r}.")
    x, posterior, chosen = _conditioned(candidates, queries, sigma2, sigma_q2, initial)
    n = x.shape[0]
    remaining = np.flatnonzero(~chosen)  # swap-remove keeps it dense: position lookups stay O(1)
    count = min(int(budget), remaining.size)
    if count <= 0:
        return GreedyResult(np.zeros(0, dtype=np.int64), np.zeros(0))
    sample = max(1, math.ceil(n / count * math.log(1.0 / epsilon)))
    rng = np.random.default_rng(int(seed))
    picks: list[int] = []
    values: list[float] = []
    alive = remaining.size
    while len(picks) < count:
        take = min(int(batch), max(1, count // _MIN_STEPS), count - len(picks))
        positions = rng.integers(0, alive, size=min(sample * take, alive))
        if take > 1:
            positions = np.unique(positions)  # a candidate drawn twice must not be picked twice
        # The candidates' quadratic forms in the candidates' own precision: float32 rows (the store's embeddings)
        # run these products 3x faster than float64 and only rank the sampled candidates; the posterior itself
        # stays float64.
        rows = x[remaining[positions]]
        v = rows @ posterior.sigma.astype(x.dtype)
        num = np.einsum("ij,ij->i", v @ posterior.m.astype(x.dtype), v).astype(np.float64)
        den = posterior.sigma2 + np.einsum("ij,ij->i", v, rows).astype(np.float64)
        score = den / np.maximum(den - num, 1e-300)
        # The `take` best, the first drawn on ties (argmax's choice for one); highest position first.
        best_positions = np.sort(positions[np.argsort(-score, kind="stable")[:take]])[::-1]
        best = remaining[best_positions]  # fancy indexing copies: the swap-removes below leave it alone
        if best.size == 1:
            posterior.add(x[int(best[0])])
        else:
            posterior.add_many(x[best])
        picks.extend(int(i) for i in best)
        values.extend([posterior.mutual_information] * best.size)
        for at in best_positions:  # swap-remove, highest position first so the others stay where they are
            alive -= 1
            remaining[at], remaining[alive] = remaining[alive], remaining[at]
    return GreedyResult(np.asarray(picks, dtype=np.int64), np.asarray(values))


_OBJECTIVES = ("auto", "projection", "logdet")
_QUERIES = ("auto", "reference", "quality")


@register_strategy("gip")
class GIP(Strategy):
    r"""The examples whose embeddings best explain a set of query embeddings (quality and diversity at once).

    Each refresh builds a query matrix ``Q`` (the reference set's live embeddings, or a quality-weighted
    self-query ``diag(√q) X_P`` of the pool) and greedily picks measured examples: ``objective="projection"``
    maximises ``J(S) = ‖Q P_S‖_F²`` (:func:`greedy_projection`, the rest of the budget filled by the log-det
    greedy once the span saturates), ``objective="logdet"`` the mutual information ``I(u_S; v)`` of a
    latent-task Gaussian model (:func:`greedy_logdet`). Unmeasured examples only fill a budget the measured
    ones cannot; the selection is unweighted. How it works, when to use it, suggested settings and costs:
    the ``gip`` section of ``grace_lightning/strategies/README.md``.

    Diagnostics: ``objective_value`` (``J(S)`` for the projection, with ``projection_share =
    J / ‖Q‖_F²``; the MI in nats for the log-det objective), ``queries`` (rows of ``Q``), ``projection_picks``,
    ``logdet_picks``, ``filled_unmeasured``, ``selection_seconds``.

    Args:
        objective: ``"projection"``, ``"logdet"`` or ``"auto"`` (the projection when ``budget <= d``, the
            embedding dimension; log-det otherwise).
        queries: ``"reference"`` (the reference set's embeddings, rows re-normalised), ``"quality"`` (the
            quality self-query: scores clipped at 0 and divided by their maximum; ``max_queries`` examples
            with a positive score drawn uniformly when there are more) or ``"auto"`` (the reference set when
            the refresh has one, else the quality scores).
        sigma2: example noise ``σ² > 0`` of the log-det objective (on unit embeddings; smaller tends to the
            projection objective, larger to a plain quality ranking).
        sigma_q2: query noise ``σ_q² > 0`` of the log-det objective. It sets which query directions count: one
            whose query energy (its eigenvalue of ``Q^T Q``) is well below ``σ_q²`` is ignored, and above it a
            direction's worth grows only with the log of its energy, so the small default spends picks on weak
            directions too (diversity). With noisy queries, raise it (0.1-1 for unit-row queries) to concentrate
            the picks on the queries' dominant directions.
        max_queries: most pool examples in a quality self-query, or ``None`` for all with a positive score
            (``Q`` is compressed to ``d`` rows, so the greedy's cost does not grow with it; the QR does, as
            ``O(|P| d²)``).
        greedy: how the log-det picks are made: ``"exact"`` (:func:`greedy_logdet`, ``O(N d)`` a pick, so
            ``O(B N d)`` in all: about two minutes for ``B = 18,000`` of ``N = 60,000`` at ``d = 128`` on 2 CPU
            cores), ``"stochastic"`` (:func:`greedy_logdet_stochastic`: each pick looks at
            ``(N/B) ln(1/epsilon)`` random candidates; seconds at that size), or ``"auto"`` (default):
            stochastic once ``picks x candidates x d / 128`` exceeds ``exact_limit``.
        epsilon: the stochastic greedy's ``ε`` in ``(0, 1)``: smaller looks at more candidates a pick.
        exact_limit: the ``"auto"`` switch point, in picks x candidates at ``d = 128`` (the exact greedy's cost
            grows with the width too, so wider embeddings switch sooner). Measured at ``d = 256`` on 2 CPU cores
            (``benchmarks/gip_greedy_cost.py``): ``2e7`` of these units took 2.5 s of exact greedy and ``6e7``
            9.9 s, where the stochastic greedy took 0.7 s and 1.9 s.
        rescore_share: the stalest examples rescored per refresh, as a share of the budget (``0.25``: a quarter of the
            budget's worth; ``None``: the whole pool, as the paper re-embeds); see
            :func:`~grace_lightning.strategies.base.stalest_first`.
        picks_per_step: the stochastic greedy's picks per step (``batch`` of :func:`greedy_logdet_stochastic`):
            the best ``picks_per_step`` of ``picks_per_step x s`` sampled candidates join ``S`` at once (at most
            ``budget // 64``). Its cost is a Python step and a posterior update per step: on lm-mixture's MiniLM
            embeddings (``d = 256``, budget 30%) the greedy took 1.10 s one pick at a time and 0.41 s 16 at a
            time, reaching the same objective and the same share of target examples
            (``benchmarks/gip_greedy_cost.py --picks-per-step 1,4,16,64``). 1 is the sequential greedy.

    Raises:
        ValueError: for a parameter outside the values above; in :meth:`check_inputs`, when the callback has
            neither a reference set nor quality scores (or lacks the one ``queries`` names).

    With embeddings from an encoder of the user's own (``CoresetCallback(embeddings=..., reference_embeddings=...)``,
    as the paper embeds documents with a separate model), every example is a candidate from the first refresh and
    no scoring pass runs: a refresh costs the greedy alone.

    Example::

        CoresetCallback(sampler, strategy="gip", reference=heldout_examples)
        CoresetCallback(sampler, strategy="gip", quality=judge_scores, strategy_kwargs={"objective": "logdet"})
    """

    needs = frozenset({"embedding"})
    overlap_by_default = True
    reads_reference_embedding = True
    reference = "optional"
    uses_quality = True

    def __init__(
        self,
        objective: str = "auto",
        queries: str = "auto",
        sigma2: float = 0.1,
        sigma_q2: float = 1e-3,
        max_queries: Optional[int] = 1024,
        greedy: str = "auto",
        epsilon: float = 0.01,
        exact_limit: float = 5e7,
        rescore_share: Optional[float] = 0.25,
        picks_per_step: int = 16,
    ) -> None:
        if objective not in _OBJECTIVES:
            raise ValueError(f"gip: `objective` must be 'auto', 'projection' or 'logdet', got {objective!r}.")
        if queries not in _QUERIES:
            raise ValueError(f"gip: `queries` must be 'auto', 'reference' or 'quality', got {queries!r}.")
        max_queries = positive_int_or_none("gip", "max_queries", max_queries, hint=" for all (e.g. 1024)")
        self.objective = objective
        self.queries = queries
        self.sigma2 = positive_float("gip", "sigma2", sigma2)
        self.sigma_q2 = positive_float("gip", "sigma_q2", sigma_q2)
        self.max_queries = max_queries
        if greedy not in ("auto", "exact", "stochastic"):
            raise ValueError(f"gip: `greedy` must be 'auto', 'exact' or 'stochastic', got {greedy!r}.")
        self.greedy = greedy
        self.epsilon = unit_interval("gip", "epsilon", epsilon, low_open=True, high_open=True, hint=" (e.g. 0.01)")
        self.exact_limit = positive_float("gip", "exact_limit", exact_limit)
        self.rescore_share = rescore_share_arg("gip", rescore_share)
        self.picks_per_step = positive_int("gip", "picks_per_step", picks_per_step, hint=" (e.g. 16; 1: one at a time)")

    def __repr__(self) -> str:
        return (
            f"GIP(objective={self.objective!r}, queries={self.queries!r}, sigma2={self.sigma2}, "
            f"sigma_q2={self.sigma_q2}, max_queries={self.max_queries}, greedy={self.greedy!r}, "
            f"picks_per_step={self.picks_per_step})"
        )

    def check_inputs(self, has_reference: bool, has_quality: bool) -> None:
        how_reference = (
            "CoresetCallback(..., reference=dataset) (a Dataset or DataLoader of examples of the target task in the "
            "training batch format, e.g. 64-1024 held-out examples)"
        )
        how_quality = "CoresetCallback(..., quality=scores) (one score per pool example, higher is better)"
        if self.queries == "reference" and not has_reference:
            raise ValueError(f"gip: queries='reference' needs a reference set; pass {how_reference}.")
        if self.queries == "quality" and not has_quality:
            raise ValueError(f"gip: queries='quality' needs quality scores; pass {how_quality}.")
        if self.queries == "auto" and not (has_reference or has_quality):
            raise ValueError(
                f"gip: GIP selects the examples that best explain a set of queries, and the callback has none: pass "
                f"{how_reference}, or {how_quality}."
            )

    # ------------------------------------------------------------------ queries
    def _query_matrix(self, inputs: SelectionInput, measured: torch.Tensor, x: np.ndarray) -> tuple[np.ndarray, str]:
        """``Q`` (float64) and where it came from."""
        use_reference = self.queries == "reference" or (self.queries == "auto" and inputs.reference is not None)
        if use_reference:
            if inputs.reference is None or inputs.reference.embedding is None:
                raise ValueError(
                    "gip: the reference set's embeddings are missing at this refresh; pass "
                    "CoresetCallback(..., reference=dataset) and a signal capture that returns `embedding`."
                )
            emb = inputs.reference.embedding.detach().float().cpu()
            emb = emb[torch.isfinite(emb).all(dim=1)]
            if emb.ndim != 2 or emb.shape[1] != x.shape[1]:
                raise ValueError(
                    f"gip: reference embeddings have shape {tuple(emb.shape)}, the pool's dimension is {x.shape[1]}."
                )
            return F.normalize(emb, dim=1).double().numpy(), "reference"
        if inputs.quality is None:
            raise ValueError(
                "gip: no queries at this refresh: pass CoresetCallback(..., reference=dataset) or "
                "CoresetCallback(..., quality=scores)."
            )
        q = inputs.quality.detach().double().cpu()[measured].clamp_min(0.0)
        top = float(q.max()) if q.numel() else 0.0
        if not top > 0:
            raise ValueError(
                "gip: no measured example has a positive quality score, so the quality queries are empty; give "
                "higher scores to the examples to favour (scores <= 0 count as 0)."
            )
        positive = (q > 0).nonzero().squeeze(1)
        if self.max_queries is not None and positive.numel() > self.max_queries:
            draw = torch.randperm(positive.numel(), generator=inputs.generator)[: self.max_queries]
            positive = positive[draw.sort().values]
        weights = (q[positive] / top).sqrt().numpy()
        return weights[:, None] * x[positive.numpy()].astype(np.float64), "quality"

    # ------------------------------------------------------------------ selection
    def select(self, inputs: SelectionInput) -> Selection:
        store = inputs.store
        require_embeddings(store, "gip")
        began = time.perf_counter()
        budget = min(int(inputs.budget), inputs.pool_size)
        # Candidates: the examples whose embedding is known (the whole pool when it was given up front).
        known = store.has("embedding")
        measured = known.nonzero().squeeze(1)
        x = store.embedding[measured].float().numpy()
        q, source = self._query_matrix(inputs, measured, x)
        dim = x.shape[1]
        objective = self.objective if self.objective != "auto" else ("projection" if budget <= dim else "logdet")
        want = min(budget, measured.numel())
        diagnostics = {
            "queries": float(q.shape[0]),
            "reference_queries": 1.0 if source == "reference" else 0.0,
            "candidates": float(measured.numel()),
            "query_energy": float(np.square(q).sum()),
            "logdet_picks": 0.0,
        }
        picks = np.zeros(0, dtype=np.int64)
        if objective == "projection":
            projected = greedy_projection(x, q, want)
            picks = projected.picks
            value = float(projected.values[-1]) if picks.size else 0.0
            diagnostics.update(
                objective_value=value,
                projection_share=value / diagnostics["query_energy"] if diagnostics["query_energy"] > 0 else 0.0,
                projection_picks=float(picks.size),
            )
        if picks.size < want:
            rest = want - picks.size
            work = rest * x.shape[0] * x.shape[1] / _EXACT_LIMIT_WIDTH  # the exact greedy's O(B N d), at d = 128
            stochastic = self.greedy == "stochastic" or (self.greedy == "auto" and work > self.exact_limit)
            if stochastic:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=inputs.generator))
                filled = greedy_logdet_stochastic(
                    x, q, rest, sigma2=self.sigma2, sigma_q2=self.sigma_q2, initial=picks.tolist(),
                    epsilon=self.epsilon, seed=seed, batch=self.picks_per_step,
                )
            else:
                filled = greedy_logdet(x, q, rest, sigma2=self.sigma2, sigma_q2=self.sigma_q2, initial=picks.tolist())
            diagnostics["stochastic_greedy"] = 1.0 if stochastic else 0.0
            if objective == "logdet":
                diagnostics["objective_value"] = float(filled.values[-1]) if filled.picks.size else 0.0
            diagnostics["logdet_picks"] = float(filled.picks.size)
            picks = np.concatenate([picks, filled.picks])
        chosen = measured[torch.from_numpy(picks)]
        unmeasured = (~known).nonzero().squeeze(1)
        missing = budget - chosen.numel()
        if missing > 0:  # fewer measured examples than the budget: fill uniformly from the rest
            fill = uniform_draw(unmeasured, missing, inputs.generator)
            chosen = torch.cat([chosen, fill])
        diagnostics.update(
            objective_logdet=1.0 if objective == "logdet" else 0.0,
            filled_unmeasured=float(max(missing, 0)),
            selection_seconds=time.perf_counter() - began,
        )
        return Selection(chosen.sort().values.to(torch.int64), None, diagnostics)
