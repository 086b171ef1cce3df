"""Importance-weighted facility location on a sparse k-NN graph, maximised by (lazy) greedy.

This is GRACE's selection objective as reconstructed here (see the ``grace`` section of
``grace_lightning/strategies/README.md``; facility location itself is the classic monotone submodular
coverage function, used for coresets e.g. by CRAIG: Mirzasoleiman, Bilmes, Leskovec, *Coresets for
Data-efficient Training of Machine Learning Models*, ICML 2020, arXiv:1906.01827). For a pool ``V`` of ``N``
nodes, each linked to at most ``k`` neighbours::

    F(S) = sum_{v in V} g_v * max_{s in S} w_vs  +  lam * sum_{s in S} g_s

    w_vv = 1                                   (a node covers itself)
    w_vs = weights[v, j]  if neighbors[v, j] == s  (largest such entry if s is listed twice)
    w_vs = 0              otherwise            (and max over an empty S is 0)

``g`` is the per-node importance (``>= 0``), ``lam >= 0`` trades importance against coverage. The
first term rewards covering the pool (diversity / representativeness), the second rewards picking
important nodes. ``F`` is monotone submodular, so greedy is a ``(1 - 1/e)`` approximation
(Nemhauser, Wolsey & Fisher 1978) and lazy greedy (Minoux 1978) makes it cheap.

Marginal gain of adding ``s`` to ``S`` (``cover[v] = max_{s' in S} w_vs'``, ``0`` for an empty ``S``)::

    gain(s | S) = sum_{v in R(s) ∪ {s}} g_v * max(0, w_vs - cover[v])  +  lam * g_s

with ``R(s) = {v : s in neighbors[v]}`` the reverse adjacency. Only ``s`` and its ``~k`` reverse
neighbours are touched, so one evaluation is ``O(k)`` and a lazy-greedy pass is about
``O((N + evaluations) log N)``. Ties are broken by the smallest node id, in lazy and plain greedy
alike, so both return the same picks.

Everything here is numpy in, numpy out: no torch, no Lightning.

Example::

    >>> import numpy as np
    >>> neighbors = np.array([[1, -1], [0, 2], [1, -1]])      # a path 0 - 1 - 2
    >>> weights = np.array([[0.9, 0.0], [0.9, 0.8], [0.8, 0.0]], dtype=np.float32)
    >>> importance = np.ones(3)
    >>> res = select_facility_location(neighbors, weights, importance, budget=1, lam=0.0)
    >>> res.selected.tolist(), res.coverage.tolist(), res.uncovered
    ([1], [3], 0)
    >>> round(facility_location_value(res.selected, neighbors, weights, importance, lam=0.0), 4)
    2.7
"""

from __future__ import annotations

import bisect
import heapq
import operator
from dataclasses import dataclass

import numpy as np

__all__ = ["FacilityLocationResult", "coverage_weights", "facility_location_value", "select_facility_location"]

# Machine epsilon of float64 (twice the unit roundoff): inflates the vectorised initial gains into safe upper bounds.
_EPS = float(np.finfo(np.float64).eps)


@dataclass
class FacilityLocationResult:
    """What :func:`select_facility_location` returns.

    Attributes:
        selected: ``(B,)`` int64 node ids in pick order.
        gains: ``(B,)`` float64 marginal gain of each pick (``F`` of the whole selection is their sum,
            up to float rounding). Non-increasing, because ``F`` is submodular.
        coverage: ``(B,)`` int64 number of pool nodes each pick represents: itself plus every
            non-picked node ``v`` whose best pick in ``N(v)`` (largest ``w_vs``, smallest ``s`` on
            ties) it is; an edge of weight 0 still names its pick. ``coverage.sum() + uncovered == N``.
        weights: ``(B,)`` float32 per-pick training weights (mean 1): ``coverage + uncovered / B``,
            normalised to mean 1, i.e. nodes no pick can reach are spread evenly over all picks.
        uncovered: number of pool nodes with no pick in ``{v} ∪ N(v)`` (``N`` when ``B = 0``).
        evaluations: exact marginal-gain evaluations done: lazy greedy's re-evaluations of heap
            tops (its one vectorised pass over all ``N`` nodes for the initial bounds is not counted),
            or one per remaining candidate per step for plain greedy.
    """

    selected: np.ndarray
    gains: np.ndarray
    coverage: np.ndarray
    weights: np.ndarray
    uncovered: int
    evaluations: int


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def _validate_graph(neighbors, weights, importance, lam):
    """Check and convert the graph arrays; return ``(neighbors int64, weights float64, importance float64, lam)``."""
    neighbors = np.asarray(neighbors)
    if neighbors.ndim != 2:
        raise ValueError(f"neighbors must be a 2-D (N, k) array, got shape {neighbors.shape}")
    if neighbors.dtype == np.bool_ or not np.issubdtype(neighbors.dtype, np.integer):
        raise ValueError(f"neighbors must be an integer array (node ids, -1 for missing), got dtype {neighbors.dtype}")
    n = neighbors.shape[0]
    neighbors = neighbors.astype(np.int64, copy=False)
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
        raise ValueError(f"neighbors must hold node ids in [0, {n}) or -1 for a missing edge; "
                         f"found values in [{int(neighbors.min())}, {int(neighbors.max())}]")

    weights = np.asarray(weights)
    if weights.shape != neighbors.shape:
        raise ValueError(f"weights must have the same shape as neighbors {neighbors.shape}, got {weights.shape}")
    if weights.dtype == np.bool_ or not np.issubdtype(weights.dtype, np.floating):
        raise ValueError(f"weights must be a floating array, got dtype {weights.dtype}")
    if weights.size and not bool(np.all((weights >= 0.0) & (weights <= 1.0))):  # also rejects NaN
        raise ValueError("weights must lie in [0, 1] (cosine similarities clipped at 0); "
                         f"found values in [{np.nanmin(weights)}, {np.nanmax(weights)}] or NaN")
    # float64 internally: float32 inputs convert exactly, so the greedy sees the caller's values.
    # `+ 0.0` turns -0.0 into +0.0 (the greedy orders gains by their IEEE bit patterns).
    weights = np.add(weights, 0.0, dtype=np.float64)

    importance = np.asarray(importance)
    if importance.shape != (n,):
        raise ValueError(f"importance must have shape ({n},) to match neighbors, got {importance.shape}")
    if importance.dtype == np.bool_ or not (np.issubdtype(importance.dtype, np.floating)
                                            or np.issubdtype(importance.dtype, np.integer)):
        raise ValueError(f"importance must be a real array, got dtype {importance.dtype}")
    importance = np.add(importance, 0.0, dtype=np.float64)
    if importance.size and not bool(np.all(np.isfinite(importance))):
        raise ValueError("importance must be finite")
    if importance.size and importance.min() < 0:
        raise ValueError(f"importance must be >= 0 (F is only monotone then), found {importance.min()}")

    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a real number, got {lam!r}") from None
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be finite and >= 0 (F is only monotone then), got {lam}")
    lam += 0.0
    return neighbors, weights, importance, lam


def _validate_budget(budget, n):
    if isinstance(budget, (bool, np.bool_)):
        raise ValueError(f"budget must be an integer, got {budget!r}")
    try:
        budget = operator.index(budget)
    except TypeError:
        raise ValueError(f"budget must be an integer, got {budget!r}") from None
    if not 0 <= budget <= n:
        raise ValueError(f"budget must be in [0, N={n}] (picks are distinct nodes), got {budget}")
    return budget


# ----------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------


def _cover(picked, neighbors, weights):
    """``cover[v] = max_{s in S} w_vs`` for the boolean pick mask ``picked`` (vectorised)."""
    n, k = neighbors.shape
    cover = np.zeros(n, dtype=np.float64)
    if k:
        to_pick = np.append(picked, False)[neighbors]  # neighbors == -1 reads the appended False
        cover = np.where(to_pick, weights, 0.0).max(axis=1)
    cover[picked] = 1.0  # w_vv = 1 >= any edge weight
    return cover


def facility_location_value(selected, neighbors, weights, importance, lam=1.0) -> float:
    """Value of the importance-weighted facility location objective.

    ``F(S) = sum_v importance[v] * max_{s in S} w_vs + lam * sum_{s in S} importance[s]`` with
    ``w_vv = 1``, ``w_vs = weights[v, j]`` where ``neighbors[v, j] == s`` (the largest such entry if
    ``s`` is listed more than once) and ``0`` otherwise.

    Args:
        selected: node ids forming ``S`` (a set: repeated ids count once).
        neighbors: ``(N, k)`` integer neighbour ids, ``-1`` for a missing edge.
        weights: ``(N, k)`` edge weights in ``[0, 1]`` (ignored, but still checked, where ``neighbors == -1``).
        importance: ``(N,)`` non-negative importance ``g``.
        lam: weight ``>= 0`` of the importance term.

    Example::

        >>> import numpy as np
        >>> nb = np.array([[1], [0]]); w = np.array([[0.5], [0.5]], dtype=np.float32)
        >>> facility_location_value([0], nb, w, np.array([1.0, 2.0]), lam=1.0)  # 1*1 + 2*0.5 + 1*1
        3.0
    """
    neighbors, weights, importance, lam = _validate_graph(neighbors, weights, importance, lam)
    n = neighbors.shape[0]
    sel = np.asarray(selected)
    if sel.size and (sel.dtype == np.bool_ or not np.issubdtype(sel.dtype, np.integer)):
        raise ValueError(f"selected must hold integer node ids, got dtype {sel.dtype}")
    sel = sel.astype(np.int64).reshape(-1)
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        raise ValueError(f"selected must hold node ids in [0, {n})")
    picked = np.zeros(n, dtype=bool)
    picked[sel] = True
    cover = _cover(picked, neighbors, weights)
    return float(importance @ cover + lam * importance[picked].sum())


# ----------------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------------


def _reverse_csr(neighbors, weights, importance):
    """Reverse adjacency with self records, as CSR: ``R'(s) = [s] + sorted(R(s))``, ``R(s) = {v : s in neighbors[v]}``.

    Returns ``(indptr, src, w, imp_src)``: for ``e in range(indptr[s], indptr[s+1])``, node ``src[e]`` is
    covered by ``s`` with weight ``w[e]`` and has importance ``imp_src[e]``. The first record of every
    ``s`` is ``s`` itself with weight 1 (``w_ss = 1``), so one loop handles the self term; the other
    records follow in increasing source order. Dropped: missing edges (``-1``), explicit self loops
    (implied), and edges that can never add to a gain (``w_vs = 0`` or ``g_v = 0``: their term is
    ``+0.0``, and skipping it leaves every sum bit-identical). A pair listed twice in ``neighbors[v]``
    is kept once with its largest weight, so no gain counts a node twice. Storing ``imp_src`` per
    record keeps a gain evaluation's reads contiguous.
    """
    n, k = neighbors.shape
    rows = np.arange(n, dtype=np.int64)
    keep = (neighbors >= 0) & (neighbors != rows[:, None]) & (weights > 0.0) & (importance[:, None] > 0.0)
    # Each record is (s, v + 1, j): v + 1 = 0 marks s's self record, j the column in neighbors[v].
    bits_k = max(k - 1, 1).bit_length()
    bits_v = n.bit_length()
    shift = bits_v + bits_k
    if shift + max(n - 1, 1).bit_length() <= 62:
        # Packed into one int64 and sorted with a plain sort (several times faster than a stable
        # argsort): grouped by s, the self record first, then by v, then by j.
        key2d = neighbors << shift
        key2d |= (rows + 1)[:, None] << bits_k
        key2d |= np.arange(k, dtype=np.int64)
        key = np.concatenate((key2d[keep], rows << shift))
        del key2d
        key.sort()
        key &= (1 << shift) - 1
        j = key & ((1 << bits_k) - 1)
        vp = key >> bits_k
        del key
    else:  # pragma: no cover - ~2**29 nodes and beyond: same order, slower sort
        dst = np.concatenate((neighbors[keep], rows))
        vp = np.concatenate((np.broadcast_to((rows + 1)[:, None], (n, k))[keep], np.zeros(n, dtype=np.int64)))
        j = np.concatenate((np.broadcast_to(np.arange(k, dtype=np.int64), (n, k))[keep], np.zeros(n, dtype=np.int64)))
        order = np.lexsort((j, vp, dst))
        vp, j = vp[order], j[order]
        del dst, order
    src = vp - 1  # -1 on self records, set below
    w = weights.reshape(-1)[np.maximum(src, 0) * k + j] if k else np.ones(src.size)
    if src.size > 1:
        # Equal v next to each other share s too: every group of s starts with its self record (v + 1 = 0).
        dup = (vp[1:] == vp[:-1]) & (vp[1:] > 0)
        if dup.any():  # rare (ANN graphs with repeated ids): keep the max weight of each (s, v) run
            starts = np.flatnonzero(np.concatenate(([True], ~dup)))
            w = np.maximum.reduceat(w, starts)
            src = src[starts]
    del vp, j
    first = np.flatnonzero(src < 0)  # the self records, one per s, in order of s
    indptr = np.empty(n + 1, dtype=np.int64)
    indptr[:-1] = first
    indptr[-1] = src.size
    src[first] = rows
    w[first] = 1.0
    return indptr, src, w, importance[src]


def _make_gain(indptr, src, w, imp_src, lam_imp, cover):
    """Exact marginal gain ``gain(s)`` and the cover update ``pick(s)``, over memoryviews of the CSR.

    The same ``gain`` serves lazy and plain greedy, so both do the same float64 operations in the same
    order: ``lam * g_s``, then the self record, then ``R(s)`` in increasing source order. Equal gains
    therefore compare equal, and the two pick the same sequence. Each term is monotone in ``cover``
    under IEEE rounding, so a gain computed earlier is a true upper bound of the same gain computed
    later, which lazy greedy relies on.

    Plain Python loops over memoryviews, not numpy: at ``k ~ 10`` numpy's per-call overhead would
    dominate, and memoryviews over numpy buffers avoid millions of boxed list items (memory, cache).
    ``cover`` is a float64 memoryview read and written in place.
    """
    ptr_m, src_m, w_m, imp_m, lam_m = (memoryview(a) for a in (indptr, src, w, imp_src, lam_imp))

    def gain(s):
        g = lam_m[s]
        a = ptr_m[s]
        b = ptr_m[s + 1]
        for v, wv, iv in zip(src_m[a:b], w_m[a:b], imp_m[a:b]):
            c = cover[v]
            if wv > c:  # max(0, wv - c): adding an exact 0.0 would not change g, so skip it
                g += iv * (wv - c)
        return g

    def pick(s):
        a = ptr_m[s]
        b = ptr_m[s + 1]
        for v, wv in zip(src_m[a:b], w_m[a:b]):  # includes s itself: cover[s] = 1
            cover[v] = max(cover[v], wv)
    return gain, pick


def _initial_bounds(indptr, w, imp_src, lam_imp):
    """Upper bounds of the first-step gains (``cover = 0``), vectorised: ``lam*g_s + sum_{R'(s)} g_v w_vs``.

    numpy sums in its own (pairwise) order, which can round below the exact loop's sequential sum.
    These values only order the first look at each node (which always re-evaluates it exactly), so
    inflate them past any such difference: a float sum of ``m`` non-negative terms is within
    ``~m*eps/2`` (relative) of the true sum whatever the order, and ``4*eps*(m+3)`` covers both sums.
    """
    g0 = lam_imp + np.add.reduceat(w * imp_src, indptr[:-1])  # every segment holds its self record
    return g0 * (1.0 + 4.0 * _EPS * (np.diff(indptr) + 4))


def _lazy_greedy(n, budget, gain, pick, bound):
    """Minoux's lazy greedy over upper bounds; returns ``(selected, gains, evaluations)``.

    Tie rule (shared with :func:`_plain_greedy`): pick the node of largest exact gain, the smallest
    node id among equal gains. Every candidate carries a key ``(TOP - bits(bound)) << SH | s`` (a
    Python int): the IEEE bit pattern of a non-negative float64 orders like the float, so the
    smallest key is the largest bound, then the smallest id -- exactly the tie rule, with no
    rounding. Ints rather than ``(-gain, s)`` tuples: one object per entry, cheaper comparisons,
    fewer cache misses (~30% faster at N = 1e6).

    Candidates never evaluated stay in ``init``, sorted by their first-step bound and consumed from
    the front; evaluated ones go to the heap with their exact gain as the new bound. (Pushing a
    first evaluation into a small heap is far cheaper than sifting it down a heap of all N nodes.)
    The minimum key over both is the candidate to look at: if its gain is exact for the current step
    and it is still the minimum, it is picked -- every other node's gain is ``<=`` its bound, which
    is below, or equal with a larger id. Stale bounds stay valid upper bounds because gains only
    shrink as the cover grows (and the computed ones do too: see :func:`_make_gain`).
    """
    sh = max(n, 1).bit_length()
    mask = (1 << sh) - 1
    top_bits = 1 << 63  # > bits of any finite float64 >= 0, so every key is positive
    buf = np.zeros(1, dtype=np.float64)
    as_float, as_bits = memoryview(buf), memoryview(buf.view(np.int64))

    order = np.argsort(-bound, kind="stable")  # bound descending, id ascending = key ascending
    bits = bound[order].view(np.int64).tolist()
    init = [((top_bits - b) << sh) | s for b, s in zip(bits, order.tolist())]
    # Sentinels above every real key keep init[p], heap[0], heap[1] and heap[2] defined. They are
    # never picked: a real candidate is left for each of the budget <= n picks.
    sentinel = (top_bits + 1) << sh
    init.append(sentinel)
    heap = [sentinel + 1, sentinel + 2, sentinel + 3]
    zero_key = top_bits << sh  # keys >= this have bound 0

    heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
    fresh = {}  # node -> its exact gain at the current step, for heap nodes evaluated in this step
    selected, gains = [], []
    evaluations = 0
    p = 0  # init[p:] are the never-evaluated candidates
    while len(selected) < budget:
        top = init[p]
        from_init = top < heap[0]
        if not from_init:
            top = heap[0]
        if top >= zero_key:
            # Every bound is 0, hence every remaining gain is exactly 0 (gains are >= 0): the tie rule
            # picks the smallest remaining ids. No more evaluations needed.
            rest = heapq.nsmallest(budget - len(selected), heap + init[p:])
            selected.extend(key & mask for key in rest)
            gains.extend([0.0] * len(rest))
            break
        s = top & mask
        if from_init:
            p += 1
            g = gain(s)
            evaluations += 1
            as_float[0] = g
            key = ((top_bits - as_bits[0]) << sh) | s
            if key > init[p] or key > heap[0]:  # beaten by another bound: look again later
                heappush(heap, key)
                fresh[s] = g
                continue
        else:
            g = fresh.get(s)
            if g is None:
                g = gain(s)
                evaluations += 1
                as_float[0] = g
                key = ((top_bits - as_bits[0]) << sh) | s
                # heap[1], heap[2]: the root's children, the smallest keys once the root is gone
                if key > init[p] or key > heap[1] or key > heap[2]:
                    heapreplace(heap, key)
                    fresh[s] = g
                    continue
            heappop(heap)
        pick(s)
        selected.append(s)
        gains.append(g)
        fresh.clear()  # the cover changed: no gain is known to be exact any more
    return selected, gains, evaluations


def _batch_gains(ids, indptr, src, w, imp_src, lam_imp, cover):
    """Exact gains of the nodes ``ids`` against ``cover``, vectorised and bit-identical to ``gain``.

    Returns ``(gains, row, node, weight)``: ``gains[t]`` for ``ids[t]``, and the *active* records -- those with
    ``w_vs > cover[v]``, the only terms that add to a gain and the only cover entries a pick changes -- as row
    ``row`` (index into ``ids``), covered node ``node`` and weight ``weight``.

    The records are laid out as a zero-padded ``(len(ids), 1 + widest)`` matrix, column 0 holding ``lam * g_s``,
    and summed with ``np.add.accumulate`` along rows. Unlike ``np.sum`` (pairwise), ``accumulate`` adds
    strictly left to right, so each row is summed in the same order with the same float64 operations
    (``g += g_v * (w_vs - cover[v])``) as :func:`_make_gain`'s loop; an inactive record adds ``+0.0``, which leaves
    a sum ``>= +0.0`` bit-unchanged, like the loop's skip.
    """
    starts = indptr[ids]
    lens = indptr[ids + 1] - starts
    width = int(lens.max())
    cols = np.arange(width, dtype=np.int64)
    valid = cols < lens[:, None]
    rec = np.where(valid, starts[:, None] + cols, 0)  # record 0 as padding (masked out below)
    node = src[rec]
    wv = w[rec]
    cv = cover[node]
    active = valid & (wv > cv)
    terms = np.zeros((ids.size, width + 1), dtype=np.float64)
    terms[:, 0] = lam_imp[ids]
    np.multiply(imp_src[rec], wv - cv, out=terms[:, 1:], where=active)
    gains = np.add.accumulate(terms, axis=1)[:, -1]
    row = np.broadcast_to(np.arange(ids.size, dtype=np.int64)[:, None], active.shape)[active]
    return gains, row, node[active], wv[active]


def _batched_lazy_greedy(n, budget, indptr, src, w, imp_src, lam_imp, cover, bound, batch_size):
    """Lazy greedy that re-evaluates the ``b`` best candidates at once; the same picks and gains as plain greedy.

    Keys, tie rule, ``init`` list and heap are those of :func:`_lazy_greedy`. One round:

    1. Pop the ``b`` smallest keys (largest stale bounds) from ``init`` and the heap; ``M`` is the smallest key
       left outside the batch.
    2. Compute the batch's exact gains against the current cover in one numpy pass (:func:`_batch_gains`,
       bit-identical to the scalar ``gain``) and sort the batch by fresh key (gain descending, id ascending).
    3. Accept the longest prefix ``c_1, c_2, ...`` such that each ``c_t`` (a) has fresh key ``< M`` and (b) shares
       no *active* record (a covered node ``v`` with ``w_{v,c} > cover[v]``) with any earlier ``c_t'`` of the batch.
    4. Apply the accepted picks to the cover; push every other batch member back with its fresh gain as bound.

    Why this is plain greedy: by (b), picking ``c_1 .. c_{t-1}`` changes no cover entry that ``c_t``'s gain reads
    with a non-zero term (a cover entry only changes through an active record, and an entry at or above
    ``w_{v,c_t}`` gives a zero term before and after), so ``c_t``'s fresh gain is still its exact gain, computed
    with the same operations. Every later batch member's fresh gain is an upper bound of its current gain
    (gains only shrink) with a larger key, and by (a) every node outside the batch has a bound, hence a gain,
    with a larger key too. So ``c_t`` is the largest-gain, smallest-id candidate -- plain greedy's pick. The
    first member always passes (b), and fails (a) only while the batch held stale bounds, which it then
    replaces with exact ones, so every round either picks or tightens bounds, and the loop ends.

    ``batch_size=None`` adapts ``b`` between 16 and 4096 (double when a whole batch is accepted, halve when
    under an eighth is); an int fixes it. ``evaluations`` counts every batch member.
    """
    sh = max(n, 1).bit_length()
    mask = (1 << sh) - 1
    top_bits = 1 << 63
    order = np.argsort(-bound, kind="stable")
    bits = bound[order].view(np.int64).tolist()
    init = [((top_bits - b) << sh) | s for b, s in zip(bits, order.tolist())]
    sentinel = (top_bits + 1) << sh
    init.append(sentinel)
    heap = [sentinel + 1]
    zero_key = top_bits << sh

    adaptive = batch_size is None
    b = 64 if adaptive else int(batch_size)
    heappop, heappush = heapq.heappop, heapq.heappush
    selected, gains = [], []
    evaluations = 0
    p = 0
    while len(selected) < budget:
        top = min(init[p], heap[0])
        if top >= zero_key:  # every remaining bound (hence gain) is 0: smallest remaining ids, as in _lazy_greedy
            rest = heapq.nsmallest(budget - len(selected), [key for key in heap if key < sentinel] + init[p:-1])
            selected.extend(key & mask for key in rest)
            gains.extend([0.0] * len(rest))
            break
        keys = []
        want = min(b, n - len(selected))
        while len(keys) < want:
            if init[p] < heap[0]:
                keys.append(init[p])
                p += 1
            else:
                keys.append(heappop(heap))
        outside = min(init[p], heap[0])
        ids = np.fromiter((key & mask for key in keys), dtype=np.int64, count=len(keys))
        fresh, row, node, weight = _batch_gains(ids, indptr, src, w, imp_src, lam_imp, cover)
        evaluations += ids.size
        rank = np.lexsort((ids, -fresh))  # fresh key order: gain descending, id ascending
        ids, fresh = ids[rank], fresh[rank]
        fresh_keys = [((top_bits - g) << sh) | s for g, s in zip(fresh.view(np.int64).tolist(), ids.tolist())]
        # (a), and never past the budget
        accept = bisect.bisect_left(fresh_keys, outside, hi=min(len(keys), budget - len(selected)))
        position = np.empty(rank.size, dtype=np.int64)
        position[rank] = np.arange(rank.size)
        pos = position[row]  # each active record's place in fresh order
        if accept > 1 and pos.size:
            o = np.lexsort((pos, node))
            later = node[o][1:] == node[o][:-1]  # a node some earlier candidate also covers actively
            if later.any():
                accept = min(accept, int(pos[o][1:][later].min()))  # (b)
        taken = pos < accept
        cover[node[taken]] = weight[taken]  # (b): each node at most once among the accepted
        selected.extend(ids[:accept].tolist())
        gains.extend(fresh[:accept].tolist())
        for key in fresh_keys[accept:]:
            heappush(heap, key)
        if adaptive:
            if accept == len(keys):
                b = min(2 * b, 4096)
            elif 8 * accept < len(keys):
                b = max(b // 2, 16)
    return selected, gains, evaluations


def _plain_greedy(n, budget, gain, pick):
    """Reference greedy: every remaining gain recomputed each step; argmax, smallest id on ties."""
    remaining = list(range(n))
    selected, gains = [], []
    evaluations = 0
    for _ in range(budget):
        best_g, best_i = -1.0, -1
        for i, s in enumerate(remaining):  # increasing ids: strict > keeps the smallest on ties
            g = gain(s)
            if g > best_g:
                best_g, best_i = g, i
        evaluations += len(remaining)
        s = remaining.pop(best_i)
        pick(s)
        selected.append(s)
        gains.append(best_g)
    return selected, gains, evaluations


def _coverage(selected, neighbors, weights):
    """Per-pick representation counts (see :class:`FacilityLocationResult`) and the uncovered count."""
    n, k = neighbors.shape
    b = selected.size
    picked = np.zeros(n, dtype=bool)
    picked[selected] = True
    counts = np.ones(b, dtype=np.int64)  # each pick covers itself
    assigned = 0
    if k and b:
        to_pick = np.append(picked, False)[neighbors]  # neighbors == -1 reads the appended False
        rows = np.flatnonzero(to_pick.any(axis=1) & ~picked)
        if rows.size:
            nb, tp = neighbors[rows], to_pick[rows]
            wm = np.where(tp, weights[rows], -1.0)  # -1 < any weight: non-picks never win
            best = wm.max(axis=1, keepdims=True)
            # largest w_vs, smallest s on ties
            owner = np.where(tp & (wm == best), nb, n).min(axis=1)
            pos = np.empty(n, dtype=np.int64)
            pos[selected] = np.arange(b)
            counts += np.bincount(pos[owner], minlength=b)
            assigned = rows.size
    uncovered = n - b - assigned
    return counts, uncovered


def _spread(counts: np.ndarray, uncovered: int) -> np.ndarray:
    if not counts.size:
        return np.zeros(0, dtype=np.float32)
    spread = counts + uncovered / counts.size  # float: uncovered nodes shared evenly by every pick
    return (spread / spread.mean()).astype(np.float32)


def coverage_weights(selected, neighbors, weights) -> np.ndarray:
    """CRAIG-style training weights (mean 1) for any set of picks, as :func:`select_facility_location` gives its own.

    Example::

        >>> import numpy as np
        >>> nb = np.array([[1], [0], [1]])                     # node 2's only neighbour is node 1
        >>> coverage_weights(np.array([1]), nb, np.ones((3, 1), dtype=np.float32)).tolist()
        [1.0]
    """
    selected = np.asarray(selected, dtype=np.int64)
    counts, uncovered = _coverage(selected, np.asarray(neighbors), np.asarray(weights))
    return _spread(counts, uncovered)


def select_facility_location(
    neighbors, weights, importance, budget, lam=1.0, lazy=True, batch_size=None
) -> FacilityLocationResult:
    """Greedily pick ``budget`` distinct nodes maximising the importance-weighted facility location ``F``.

    ``F(S) = sum_v g_v * max_{s in S} w_vs + lam * sum_{s in S} g_s`` (see the module docstring). Each
    step adds the node of largest marginal gain
    ``gain(s) = sum_{v in R(s) ∪ {s}} g_v * max(0, w_vs - cover[v]) + lam * g_s``,
    ties broken by the smallest node id. ``lazy=True`` (Minoux's lazy greedy, a max-heap of stale
    gains as upper bounds, re-evaluated ``batch_size`` at a time) and ``lazy=False`` (recompute every
    gain each step; small ``N`` only) pick the same sequence with the same gains (bit for bit). Once every remaining gain is 0 the rest of the budget is
    filled with the smallest remaining ids, so the result always has exactly ``budget`` picks.

    Training weights are CRAIG-style: a pick's weight is proportional to how many pool nodes it
    represents. Each non-picked node ``v`` is assigned to the pick in ``N(v)`` with the largest
    ``w_vs`` (smallest id on ties), a pick represents itself, and nodes with no pick in
    ``{v} ∪ N(v)`` (``uncovered``) are spread evenly over all picks (``uncovered / B`` each) because
    nothing in the graph says which pick they resemble; the result is normalised to mean 1.

    Args:
        neighbors: ``(N, k)`` integer neighbour ids, ``-1`` for a missing edge.
        weights: ``(N, k)`` edge weights in ``[0, 1]`` (ignored, but still checked, where ``neighbors == -1``).
        importance: ``(N,)`` non-negative importance ``g``.
        budget: number of picks ``B``, ``0 <= B <= N``.
        lam: weight ``>= 0`` of the importance term.
        lazy: lazy greedy (default) or the plain reference greedy.
        batch_size: lazy greedy only. ``None`` (default): re-evaluate the best candidates in vectorised
            batches of adaptive size (:func:`_batched_lazy_greedy`; about 10x faster than one at a time at
            ``N = 1e6``); an int ``>= 2`` fixes the batch size; ``1`` is the scalar Minoux loop
            (:func:`_lazy_greedy`). All pick the same sequence: this only trades speed.

    Returns:
        A :class:`FacilityLocationResult`.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> nb = rng.integers(0, 1000, size=(1000, 10))
        >>> w = rng.random((1000, 10), dtype=np.float32)
        >>> res = select_facility_location(nb, w, rng.random(1000), budget=100)
        >>> res.selected.shape, float(res.weights.mean())
        ((100,), 1.0)
    """
    neighbors, weights, importance, lam = _validate_graph(neighbors, weights, importance, lam)
    n = neighbors.shape[0]
    budget = _validate_budget(budget, n)
    if not isinstance(lazy, (bool, np.bool_)):
        raise ValueError(f"lazy must be a bool, got {lazy!r}")
    if batch_size is not None and (
        isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")

    lam_imp = lam * importance
    if budget == 0:
        selected, gains, evaluations = [], [], 0
    else:
        indptr, src, w, imp_src = _reverse_csr(neighbors, weights, importance)
        cover = np.zeros(n, dtype=np.float64)
        gain, pick = _make_gain(indptr, src, w, imp_src, lam_imp, memoryview(cover))
        if lazy:
            bound = _initial_bounds(indptr, w, imp_src, lam_imp)
            if batch_size == 1:
                selected, gains, evaluations = _lazy_greedy(n, budget, gain, pick, bound)
            else:
                selected, gains, evaluations = _batched_lazy_greedy(
                    n, budget, indptr, src, w, imp_src, lam_imp, cover, bound, batch_size
                )
        else:
            selected, gains, evaluations = _plain_greedy(n, budget, gain, pick)

    selected = np.asarray(selected, dtype=np.int64)
    gains = np.asarray(gains, dtype=np.float64)
    counts, uncovered = _coverage(selected, neighbors, weights)
    weights_out = _spread(counts, uncovered)
    return FacilityLocationResult(
        selected=selected,
        gains=gains,
        coverage=counts,
        weights=weights_out,
        uncovered=int(uncovered),
        evaluations=int(evaluations),
    )
