"""Cosine k-NN graph over unit embeddings, with incremental repair and GRACE's score/embedding propagation.

Numpy in, numpy out (faiss underneath); nothing here knows about Lightning or torch. Rows of ``embeddings`` are
L2-normalised, so cosine similarity is the inner product and faiss runs with ``METRIC_INNER_PRODUCT``.

The pieces, in the order GRACE uses them (papers.md §1.3):

* :class:`KnnGraph` -- ``neighbors[i]`` / ``similarities[i]`` are node ``i``'s ``k`` most similar *other* nodes,
  best first. Exact (``IndexFlatIP``) up to ``exact_threshold`` nodes, HNSW above. :meth:`KnnGraph.update`
  repairs the graph locally after some embeddings moved instead of rebuilding it.
* :func:`edge_weights` -- ``w_ij = max(0, cos(e_i, e_j))``, 0 on missing edges.
* :func:`propagate` -- after only the *anchors* were rescored, move every other node's score towards its
  anchor neighbours' (minimiser of a quadratic smoothing energy, or the paper's Eq. 21 as printed).
* :func:`propagate_drift` -- the same for embeddings: non-anchors follow their anchor neighbours' drift.
* :func:`neighbour_mean` -- ``sum_j a_ij v_j`` with row-normalised weights, for GRACE's disagreement score.
* :func:`set_faiss_threads` -- faiss has its own OpenMP thread count; set it per DDP rank.

Conventions: a missing edge (fewer than ``k`` other nodes, or an approximate search that returned too few) has
neighbour ``-1`` and similarity ``-inf``, and always sorts last.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

__all__ = [
    "KnnGraph",
    "edge_weights",
    "neighbour_mean",
    "propagate",
    "propagate_drift",
    "set_faiss_threads",
]

_SEARCH_BLOCK = 16_384  # queries per faiss call: bounds the temporary result buffers
_GATHER_BYTES = 64 << 20  # numpy gathers (x[idx] for many idx) are chunked to about this many bytes
_REVERSE_FACTOR = 4  # moved nodes are re-queried with 4k results: the extra hits are reverse-edge candidates (step 3b)
_MODES = ("exact", "paper_eq21")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def set_faiss_threads(world_size: int = 1) -> int:
    """Give faiss ``max(1, os.cpu_count() // world_size)`` OpenMP threads and return that number.

    faiss keeps its own OpenMP thread count: neither ``torch.set_num_threads`` (which Lightning sets per DDP
    rank) nor ``OMP_NUM_THREADS`` read after import reaches it, so without this every rank of a DDP run uses all
    cores and the ranks oversubscribe the machine (lightning.md §6).

    Example::

        >>> n = set_faiss_threads(1)
        >>> n == faiss.omp_get_max_threads()
        True
    """
    n = max(1, (os.cpu_count() or 1) // max(1, int(world_size)))
    faiss.omp_set_num_threads(n)
    return n


def _as_f32(x) -> np.ndarray:
    """faiss only takes float32, C-contiguous arrays (float16 embeddings are upcast here)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_embeddings(x: np.ndarray) -> None:
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"embeddings must be a non-empty (N, d) array, got shape {x.shape}")


def _chunk_rows(per_row_bytes: int) -> int:
    return max(1, _GATHER_BYTES // max(1, per_row_bytes))


def _pair_sims(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x[a[t]] . x[b[t]]`` for every t (float32); ``-inf`` where ``b`` is -1."""
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    out = np.full(a.shape[0], -np.inf, dtype=np.float32)
    ok = np.flatnonzero(b >= 0)
    step = _chunk_rows(2 * x.shape[1] * 4)
    for s in range(0, ok.size, step):
        sel = ok[s : s + step]
        out[sel] = np.einsum("ij,ij->i", x[a[sel]], x[b[sel]])
    return out


def _reverse_lists(nb: np.ndarray, rows: np.ndarray, cap: int) -> np.ndarray:
    """``(rows.size, cap)``: for each of ``rows``, up to ``cap`` nodes whose row contains it (-1 padded)."""
    src = np.repeat(np.arange(nb.shape[0], dtype=np.int64), nb.shape[1])
    dst = nb.ravel()
    ok = dst >= 0
    src, dst = src[ok], dst[ok]
    if src.size == 0:
        return np.full((rows.size, cap), -1, dtype=np.int64)
    order = np.argsort(dst, kind="stable")
    src, dst = src[order], dst[order]
    start = np.searchsorted(dst, rows, side="left")
    end = np.searchsorted(dst, rows, side="right")
    idx = start[:, None] + np.arange(cap)[None, :]
    return np.where(idx < end[:, None], src[np.minimum(idx, src.size - 1)], -1)


def _sort_rows(nb: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by similarity, best first (missing ``-inf`` edges last; ties keep their order)."""
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(nb, order, axis=1), np.take_along_axis(sims, order, axis=1)


def _clean(labels: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss marks missing results with label -1 and distance -FLT_MAX; make that -1 / -inf."""
    labels = labels.astype(np.int64, copy=False)
    sims = np.where(labels >= 0, sims, -np.inf).astype(np.float32, copy=False)
    return labels, sims


def _drop_self(query_ids: np.ndarray, labels: np.ndarray, sims: np.ndarray, k: int):
    """Remove each query from its own result row and keep ``k`` columns.

    Self is not always first: with duplicate vectors another id can tie with (and precede) it, and an approximate
    search may not return it at all. A stable argsort of the "is self" mask moves self to the end wherever it is and
    keeps the order of the rest; a row without self just loses its last (weakest) hit.
    """
    is_self = labels == query_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    labels = np.take_along_axis(labels, order, axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    still = labels == query_ids[:, None]  # only when all results fit in k columns: self is last, blank it
    labels[still], sims[still] = -1, -np.inf
    if labels.shape[1] < k:  # fewer than k + 1 results were asked for (tiny N): pad
        pad = k - labels.shape[1]
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
    return labels, sims


def _merge_extra(nb: np.ndarray, sims: np.ndarray, pos: np.ndarray, cand: np.ndarray, cand_s: np.ndarray):
    """Merge extra edges ``(pos[t] -> cand[t], cand_s[t])`` into the ``(m, w)`` rows ``nb`` / ``sims``.

    Each row becomes the ``w`` best of its entries and its extras, sorted (ties keep existing entries first); the
    extras must not repeat an entry of their row. Returns ``(nb, sims, evicted)`` with ``evicted[r]`` the largest
    similarity that no longer fits (``-inf`` where nothing was dropped). Rows without extras are only re-sorted.
    """
    m, w = nb.shape
    evicted = np.full(m, -np.inf, dtype=np.float32)
    has = np.zeros(m, dtype=bool)
    has[pos] = True
    plain = np.flatnonzero(~has)
    nb[plain], sims[plain] = _sort_rows(nb[plain], sims[plain])
    if pos.size:
        o = np.lexsort((-cand_s, pos))  # by row, best first: at most w extras per row can matter
        pos, cand, cand_s = pos[o], cand[o], cand_s[o]
        rank = np.arange(pos.size) - np.searchsorted(pos, pos, side="left")
        keep = rank < w
        rows = np.flatnonzero(has)
        at = np.searchsorted(rows, pos[keep])
        big_nb = np.full((rows.size, 2 * w), -1, dtype=np.int64)
        big_s = np.full((rows.size, 2 * w), -np.inf, dtype=np.float32)
        big_nb[:, :w], big_s[:, :w] = nb[rows], sims[rows]
        big_nb[at, w + rank[keep]], big_s[at, w + rank[keep]] = cand[keep], cand_s[keep]
        big_nb, big_s = _sort_rows(big_nb, big_s)
        nb[rows], sims[rows] = big_nb[:, :w], big_s[:, :w]
        evicted[rows] = big_s[:, w]
    return nb, sims, evicted


def _check_reserve(reserve) -> int:
    if isinstance(reserve, (bool, np.bool_)) or not isinstance(reserve, (int, np.integer)) or reserve < 0:
        raise ValueError(f"reserve must be an int >= 0, got {reserve!r}")
    return int(reserve)


def _check_repair(repair: str) -> str:
    if repair not in ("search", "two_hop"):
        raise ValueError(f"repair must be 'search' or 'two_hop', got {repair!r}")
    return repair


def _resolve_method(method: str, n: int, exact_threshold: int) -> str:
    if method == "auto":
        return "flat" if n <= exact_threshold else "hnsw"
    if method not in ("flat", "hnsw"):
        raise ValueError(f"method must be 'auto', 'flat' or 'hnsw', got {method!r}")
    return method


# ----------------------------------------------------------------------------------------------------------------
# the graph


@dataclass(eq=False)
class KnnGraph:
    """Cosine k-NN graph: ``neighbors[i]`` are node ``i``'s ``k`` most similar other nodes, best first.

    Attributes:
        neighbors: ``(N, k)`` int64; row ``i`` never contains ``i``; ``-1`` where fewer than ``k`` exist.
        similarities: ``(N, k)`` float32 ``cos(e_i, e_neighbors[i, c])``, each row sorted descending; ``-inf``
            on missing edges.
        method: ``"flat"`` (exact ``IndexFlatIP``) or ``"hnsw"`` (``IndexHNSWFlat``, inner product).
        k, hnsw_m, ef_construction, ef_search, overlay_limit, exact_threshold, repair, reserve, inplace_drift: the
            build parameters (kept so that :meth:`update` and :meth:`from_state_dict` use the same ones).
        reserve_neighbors, reserve_similarities: ``(N, reserve)``, each row's next ``reserve`` candidates after its
            ``k`` edges (same conventions; they are what :meth:`update` promotes when an edge weakens).
        floor: ``(N,)`` float32, per row an upper bound (as good as the search that produced it) on the
            similarity of any node outside the row and its reserve that has not moved since; ``-inf`` when the
            search returned every node.

    Build with :meth:`build`, repair after embeddings moved with :meth:`update`, check with :meth:`recall`,
    checkpoint with :meth:`state_dict` / :meth:`from_state_dict`.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> e = rng.standard_normal((500, 16)).astype(np.float32)
        >>> e /= np.linalg.norm(e, axis=1, keepdims=True)
        >>> g = KnnGraph.build(e, k=5)
        >>> g.method, g.neighbors.shape, bool((g.neighbors != np.arange(500)[:, None]).all())
        ('flat', (500, 5), True)
        >>> moved = np.arange(25)
        >>> e[moved] = rng.standard_normal((25, 16)); e[moved] /= np.linalg.norm(e[moved], axis=1, keepdims=True)
        >>> stats = g.update(e, moved)
        >>> stats["moved"], g.recall(e, sample=500) > 0.95
        (25, True)
    """

    neighbors: np.ndarray
    similarities: np.ndarray
    method: str
    k: int = 10
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    overlay_limit: float = 0.2
    exact_threshold: int = 200_000
    repair: str = "search"
    reserve: int = 5
    inplace_drift: float = 0.5
    reserve_neighbors: np.ndarray | None = field(default=None, repr=False)
    reserve_similarities: np.ndarray | None = field(default=None, repr=False)
    floor: np.ndarray | None = field(default=None, repr=False)
    # The faiss index: over the current vectors (flat); over the vectors as of the last (re)build, with small moves
    # written in place (hnsw).
    _index: faiss.Index | None = field(default=None, repr=False)
    # HNSW only: new vectors of nodes that moved far since the last build (IndexIDMap2 over IndexFlatIP) ...
    _overlay: faiss.Index | None = field(default=None, repr=False)
    # ... and which HNSW entries are stale because of that (bool mask, N); these are filtered out at search time.
    _stale: np.ndarray | None = field(default=None, repr=False)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings,
        k: int = 10,
        method: str = "auto",
        exact_threshold: int = 200_000,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        overlay_limit: float = 0.2,
        repair: str = "search",
        reserve: int = 5,
        inplace_drift: float = 0.5,
    ) -> KnnGraph:
        """Build the self k-NN graph of ``embeddings`` (``(N, d)`` float32/float16, unit rows).

        ``method="auto"`` is exact search (``faiss.IndexFlatIP``, ``O(N^2 d)``: about 20 s at 100k x 128 on 2 cores)
        when ``N <= exact_threshold``, else HNSW (``IndexHNSWFlat(d, hnsw_m, METRIC_INNER_PRODUCT)`` with
        ``ef_construction`` / ``ef_search``; recall@10 about 0.98-0.99 on embedding-like data, lightning.md §6).
        Every node is searched with ``k + reserve + 2`` results and itself removed: the best ``k`` are its row,
        the next ``reserve`` its reserve, the last one's similarity its :attr:`floor` (``reserve`` costs a few
        more results per search; ``ef_search`` bounds the HNSW work anyway). ``overlay_limit``, ``repair``,
        ``reserve`` and ``inplace_drift`` matter for :meth:`update`.

        Example::

            >>> e = np.eye(4, dtype=np.float32) + 0.1
            >>> e /= np.linalg.norm(e, axis=1, keepdims=True)
            >>> KnnGraph.build(e, k=2).neighbors.shape
            (4, 2)
        """
        x = _as_f32(embeddings)
        _check_embeddings(x)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = x.shape[0]
        graph = cls(
            neighbors=np.empty((0, int(k)), dtype=np.int64),
            similarities=np.empty((0, int(k)), dtype=np.float32),
            method=_resolve_method(method, n, int(exact_threshold)),
            k=int(k),
            hnsw_m=int(hnsw_m),
            ef_construction=int(ef_construction),
            ef_search=int(ef_search),
            overlay_limit=float(overlay_limit),
            exact_threshold=int(exact_threshold),
            repair=_check_repair(repair),
            reserve=_check_reserve(reserve),
            inplace_drift=float(inplace_drift),
        )
        graph._make_index(x)
        width = graph.k + graph.reserve
        nb, sims = graph._query(x, np.arange(n, dtype=np.int64), width + 1)
        graph._set_all(nb[:, :width], sims[:, :width], sims[:, width])
        return graph

    def _set_all(self, nb: np.ndarray, sims: np.ndarray, floor: np.ndarray) -> None:
        """Store ``(N, k + reserve)`` rows (best first) as row + reserve, and the floors."""
        k = self.k
        self.neighbors, self.similarities = np.ascontiguousarray(nb[:, :k]), np.ascontiguousarray(sims[:, :k])
        self.reserve_neighbors = np.ascontiguousarray(nb[:, k:])
        self.reserve_similarities = np.ascontiguousarray(sims[:, k:])
        self.floor = np.ascontiguousarray(floor, dtype=np.float32)

    def _rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows.size, k + reserve)`` copies of the rows followed by their reserves."""
        nb = np.concatenate([self.neighbors[rows], self.reserve_neighbors[rows]], axis=1)
        return nb, np.concatenate([self.similarities[rows], self.reserve_similarities[rows]], axis=1)

    def _put_rows(self, rows: np.ndarray, nb: np.ndarray, sims: np.ndarray) -> None:
        k = self.k
        self.neighbors[rows], self.similarities[rows] = nb[:, :k], sims[:, :k]
        self.reserve_neighbors[rows], self.reserve_similarities[rows] = nb[:, k:], sims[:, k:]

    def _make_index(self, x: np.ndarray) -> None:
        """(Re)build the faiss index from all of ``x`` and forget any overlay."""
        d = x.shape[1]
        if self.method == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        index.add(x)
        self._index = index
        self._overlay = faiss.IndexIDMap2(faiss.IndexFlatIP(d)) if self.method == "hnsw" else None
        self._stale = np.zeros(x.shape[0], dtype=bool)

    # -- search ------------------------------------------------------------------------------------------------

    def _query(self, x: np.ndarray, ids: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` nearest other nodes of nodes ``ids`` (their vectors ``x[ids]``), best first."""
        n = x.shape[0]
        want = min(kk + 1, n)  # + 1 for self
        hnsw_params = None
        keep_alive = ()
        if self.method == "hnsw":
            ef = max(self.ef_search, want)
            if self._stale.any():
                # The index holds the stale vectors of far-moved nodes (HNSW cannot remove_ids); skip them while
                # searching. The graph still routes *through* them, so the remaining nodes stay reachable. A
                # bitmap (one bit per node) tests membership in O(1), cheaper than IDSelectorBatch's hash set.
                bits = np.packbits(self._stale, bitorder="little")
                stale = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
                not_stale = faiss.IDSelectorNot(stale)
                keep_alive = (bits, stale, not_stale)  # the C++ params only hold raw pointers to these
                hnsw_params = faiss.SearchParametersHNSW(sel=not_stale, efSearch=ef)
            else:
                hnsw_params = faiss.SearchParametersHNSW(efSearch=ef)
        labels = np.empty((ids.size, kk), dtype=np.int64)
        sims = np.empty((ids.size, kk), dtype=np.float32)
        for s in range(0, ids.size, _SEARCH_BLOCK):
            block = ids[s : s + _SEARCH_BLOCK]
            xq = np.ascontiguousarray(x[block])
            lab, sim = self._search(xq, want, hnsw_params)
            labels[s : s + block.size], sims[s : s + block.size] = _drop_self(block, lab, sim, kk)
        del keep_alive
        return labels, sims

    def _search(self, xq: np.ndarray, kk: int, hnsw_params) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "flat":
            return _clean(*self._index.search(xq, kk)[::-1])
        labels, sims = _clean(*self._index.search(xq, kk, params=hnsw_params)[::-1])
        m = self._overlay.ntotal
        if m == 0:
            return labels, sims
        # Moved nodes live in the exact overlay: merge the two result lists by similarity. They cannot overlap,
        # since exactly the overlay's ids are filtered out of the HNSW search.
        lab2, sim2 = _clean(*self._overlay.search(xq, min(kk, m))[::-1])
        labels = np.concatenate([labels, lab2], axis=1)
        sims = np.concatenate([sims, sim2], axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(labels, order, axis=1), np.take_along_axis(sims, order, axis=1)

    # -- incremental repair ------------------------------------------------------------------------------------

    def update(self, embeddings, moved) -> dict:
        """Repair the graph after the vectors of nodes ``moved`` changed; ``embeddings`` is the full current ``(N, d)``.

        1. Index: flat re-adds all current vectors (a memcpy, as fast as remove_ids + add_with_ids). HNSW cannot
           remove entries; a moved node within ``inplace_drift`` (L2) of the vector the index holds for it gets
           its new vector written in place (its links, built for the old position, still lead near the new one),
           a node that moved farther goes to a small exact *overlay* index and its stale HNSW entry is filtered
           out at search time (``SearchParametersHNSW(sel=IDSelectorNot(...))``); results of both are merged by
           similarity. Once more than ``overlay_limit * N`` nodes are in the overlay, HNSW is rebuilt from scratch
           (the overlay's exact search costs ``O(overlay * d)`` per query).
        2. The moved nodes' rows (and reserves, and floors) are re-queried (``4k`` results).
        3. In every other row and reserve, edges to a moved node get their similarity recomputed from the new
           vectors, and a moved node ``i`` is inserted into the row of each ``j`` among its ``4k`` hits if
           ``cos(i, j)`` beats ``j``'s weakest reserve entry (no duplicates, rows re-sorted, the reserve's
           weakest entry dropped and the :attr:`floor` raised to it). ``4k`` rather than ``k`` because k-NN is
           not symmetric: ``i`` can belong in ``j``'s row without ``j`` being in ``i``'s. A row whose edge
           weakened promotes the best of its reserve; this is where the reserve pays off.
        4. A row whose ``k``-th similarity is now below its floor may miss a node it never stored; only those rows
           are refilled. Without a reserve that is about 30% of the rows at 5% moved, with ``reserve=5`` almost
           none: ``reserve + 1`` of a row's ``k + reserve`` entries must weaken first. ``repair="search"``
           re-searches them in the index (merged with what they hold); ``repair="two_hop"`` instead takes the
           best of their neighbours, neighbours' neighbours and reverse neighbours (one NN-descent step, no
           search; the floor is then not lowered, so a row can stay due).

        Stored similarities are always ``x_i . x_j`` of the given embeddings, for edges to moved nodes and rows that
        were re-queried or refilled. Rows of nodes that changed but are not in ``moved`` are not revisited, nor are
        the similarities of edges to them (list every node whose vector changed, e.g. after
        :func:`propagate_drift`, or accept slightly stale rows for them). Returns ``{"moved", "requeried",
        "reverse_patched" (rows changed in 3), "refilled" (rows in 4), "rebuilt", "inplace" (HNSW nodes written in
        place), "overlay" (HNSW overlay size), "seconds"}``.

        Example::

            >>> rng = np.random.default_rng(0)
            >>> e = rng.standard_normal((300, 8)).astype(np.float32)
            >>> e /= np.linalg.norm(e, axis=1, keepdims=True)
            >>> g = KnnGraph.build(e, k=4)
            >>> e[:10] = e[10:20]  # nodes 0-9 jump next to 10-19
            >>> _ = g.update(e, np.arange(10))
            >>> bool((g.neighbors[:10, 0] == np.arange(10, 20)).all())
            True
        """
        t0 = time.perf_counter()
        x = _as_f32(embeddings)
        n = self.neighbors.shape[0]
        if x.ndim != 2 or x.shape[0] != n or x.shape[1] != self._index.d:
            raise ValueError(f"embeddings must have shape ({n}, {self._index.d}), got {x.shape}")
        moved = np.unique(np.asarray(moved, dtype=np.int64).ravel())
        if moved.size and (moved[0] < 0 or moved[-1] >= n):
            raise ValueError(f"moved ids must lie in [0, {n}), got range [{moved[0]}, {moved[-1]}]")
        stats = {
            "moved": int(moved.size), "requeried": 0, "reverse_patched": 0, "refilled": 0, "rebuilt": False,
            "inplace": 0,
        }
        if moved.size == 0:
            stats.update(overlay=self._overlay_size(), seconds=time.perf_counter() - t0)
            return stats

        # 1. the index
        self._update_index(x, moved, stats)

        k, width = self.k, self.k + self.reserve

        # 2. re-query the moved nodes
        kk = max(_REVERSE_FACTOR * k, width + 1)
        q_nb, _ = self._query(x, moved, kk)
        q_sims = _pair_sims(x, np.repeat(moved, kk), q_nb).reshape(q_nb.shape)
        q_nb, q_sims = _sort_rows(q_nb, q_sims)
        old_rows = self.neighbors[moved].copy()  # where a moved node used to be: candidates for two_hop (step 4)
        self._put_rows(moved, q_nb[:, :width], q_sims[:, :width])
        self.floor[moved] = q_sims[:, width]
        stats["requeried"] = int(moved.size)

        # 3. rows holding an edge to a moved node, and rows a moved node may join
        is_moved = np.zeros(n + 1, dtype=bool)  # neighbour -1 reads the trailing False
        is_moved[moved] = True
        holds = is_moved[self.neighbors].any(axis=1)
        holds |= is_moved[self.reserve_neighbors].any(axis=1)
        holds[moved] = False  # re-queried already
        cand_j = q_nb.ravel()
        cand_i = np.repeat(moved, kk)
        cand_s = q_sims.ravel()
        ok = (cand_j >= 0) & ~is_moved[cand_j]
        cand_j, cand_i, cand_s = cand_j[ok], cand_i[ok], cand_s[ok]
        rows = np.union1d(np.flatnonzero(holds), cand_j)
        needy = rows[:0]
        if rows.size:
            r_nb, r_s = self._rows(rows)
            # 3a. recompute edges to moved nodes
            ri, ci = np.nonzero(is_moved[r_nb])
            r_s[ri, ci] = _pair_sims(x, rows[ri], r_nb[ri, ci])
            # 3b. reverse insertions: moved i found j (not moved) -> candidate edge j -> i
            pos = np.searchsorted(rows, cand_j)
            keep = cand_s > r_s.min(axis=1)[pos]
            pos, cand_i, cand_s = pos[keep], cand_i[keep], cand_s[keep]
            keep = ~(r_nb[pos] == cand_i[:, None]).any(axis=1)  # already listed: its similarity is fresh (3a)
            r_nb, r_s, evicted = _merge_extra(r_nb, r_s, pos[keep], cand_i[keep], cand_s[keep])
            self._put_rows(rows, r_nb, r_s)
            self.floor[rows] = np.maximum(self.floor[rows], evicted)
            needy = rows[r_s[:, k - 1] < self.floor[rows]]
        stats["reverse_patched"] = int(rows.size)

        # 4. refill rows that may miss a true neighbour
        if needy.size:
            if self.repair == "search":
                self._refill_search(x, needy)
            else:
                self._refill_two_hop(x, needy, moved, old_rows)
        stats["refilled"] = int(needy.size)

        stats.update(overlay=self._overlay_size(), seconds=time.perf_counter() - t0)
        return stats

    def _stored_vectors(self) -> np.ndarray:
        """HNSW: a writable ``(N, d)`` numpy view of the vectors the index searches with (its flat storage)."""
        storage = faiss.downcast_index(self._index.storage)
        return faiss.rev_swig_ptr(storage.get_xb(), self._index.ntotal * self._index.d).reshape(self._index.ntotal, -1)

    def _update_index(self, x: np.ndarray, moved: np.ndarray, stats: dict) -> None:
        """Step 1 of :meth:`update`."""
        if self.method == "flat":
            self._index.reset()
            self._index.add(x)
            return
        stored = self._stored_vectors()
        near = np.empty(moved.size, dtype=bool)
        step = _chunk_rows(2 * x.shape[1] * 4)
        for s in range(0, moved.size, step):
            m = moved[s : s + step]
            near[s : s + step] = np.linalg.norm(stored[m] - x[m], axis=1) <= self.inplace_drift
        close, far = moved[near], moved[~near]
        stale_after = np.count_nonzero(self._stale) - np.count_nonzero(self._stale[close])
        stale_after += np.count_nonzero(~self._stale[far])
        if stale_after > self.overlay_limit * x.shape[0]:
            self._make_index(x)
            stats["rebuilt"] = True
            return
        stored[close] = x[close]
        back = close[self._stale[close]]  # was in the overlay, now close to its HNSW entry again
        again = far[self._stale[far]]  # moved far before: replace its overlay vector
        if back.size or again.size:
            self._overlay.remove_ids(np.concatenate([back, again]))
        self._stale[back] = False
        if far.size:
            self._overlay.add_with_ids(np.ascontiguousarray(x[far]), far)
            self._stale[far] = True
        stats["inplace"] = int(close.size)

    def _overlay_size(self) -> int:
        return int(self._overlay.ntotal) if self._overlay is not None else 0

    def _refill_search(self, x: np.ndarray, rows: np.ndarray) -> None:
        """Rows become the top ``k + reserve`` of a fresh index search merged with their current entries."""
        width = self.k + self.reserve
        for s in range(0, rows.size, _SEARCH_BLOCK):
            r = rows[s : s + _SEARCH_BLOCK]
            found, found_s = self._query(x, r, width + 1)
            # merging keeps whatever HNSW's approximate search missed but the row already had
            evicted = self._set_best_rows(x, r, np.concatenate([self._rows(r)[0], found[:, :width]], axis=1))
            self.floor[r] = np.maximum(found_s[:, width], evicted)

    def _refill_two_hop(self, x: np.ndarray, rows: np.ndarray, moved: np.ndarray, old_rows: np.ndarray) -> None:
        """Rows become the top ``k + reserve`` of their neighbourhood (one NN-descent step, no index search).

        Candidates for row ``r``: its neighbours and reserve, their neighbours, and the nodes whose rows contain
        ``r`` (up to ``2k``; k-NN is not symmetric, and these recover about a third of what the forward hops
        miss). Through a moved neighbour the second hop also takes its old row (``old_rows``, aligned with the
        sorted ``moved``): a row that lost a moved neighbour needs nodes near that neighbour's *old* position.
        No search bounds what the candidates missed, so the floor only rises (to the best evicted candidate).
        """
        k, nb = self.k, self.neighbors
        is_moved = np.zeros(nb.shape[0], dtype=bool)
        is_moved[moved] = True
        reverse = _reverse_lists(nb, rows, 2 * k)
        step = _chunk_rows((4 * k + self.reserve + 2 * k * k) * x.shape[1] * 4)
        for s in range(0, rows.size, step):
            r = rows[s : s + step]
            first = nb[r]
            safe = np.where(first >= 0, first, 0)
            second = nb[safe]
            second[first < 0] = -1
            via_moved = (first >= 0) & is_moved[safe]
            third = np.full_like(second, -1)
            third[via_moved] = old_rows[np.searchsorted(moved, first[via_moved])]
            cand = np.concatenate(
                [self._rows(r)[0], reverse[s : s + step], second.reshape(r.size, -1), third.reshape(r.size, -1)],
                axis=1,
            )
            evicted = self._set_best_rows(x, r, cand)
            self.floor[r] = np.maximum(self.floor[r], evicted)

    def _set_best_rows(self, x: np.ndarray, rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Row + reserve of ``rows[t]`` become the best of ``cand[t]`` (self, -1 and repeats skipped).

        Returns the similarity of the best candidate left out (``-inf`` if none).
        """
        width = self.k + self.reserve
        cand = np.sort(cand, axis=1)
        cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1
        cand[cand == rows[:, None]] = -1
        sim = _pair_sims(x, np.repeat(rows, cand.shape[1]), cand).reshape(cand.shape)  # skips the -1 entries
        if sim.shape[1] <= width:
            pad = width + 1 - sim.shape[1]
            cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
            sim = np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf)
        cand, sim = _sort_rows(cand, sim)
        self._put_rows(rows, cand[:, :width], sim[:, :width])
        return sim[:, width]

    # -- quality -----------------------------------------------------------------------------------------------

    def recall(self, embeddings, sample: int = 1000, seed: int = 0) -> float:
        """recall@k of the stored rows against exact search on ``embeddings``.

        On ``sample`` distinct nodes drawn by ``np.random.default_rng(seed)`` (all nodes if ``sample >= N``):
        ``mean_i |stored(i) ∩ exact(i)| / |exact(i)|``, where ``exact(i)`` is the top ``k`` of
        ``faiss.knn(e_i, E, k + 1, METRIC_INNER_PRODUCT)`` without ``i``.

        Example::

            >>> e = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
            >>> e /= np.linalg.norm(e, axis=1, keepdims=True)
            >>> KnnGraph.build(e, k=5).recall(e)
            1.0
        """
        x = _as_f32(embeddings)
        n = self.neighbors.shape[0]
        if x.shape[0] != n:
            raise ValueError(f"embeddings must have {n} rows, got {x.shape[0]}")
        ids = np.random.default_rng(seed).choice(n, size=min(int(sample), n), replace=False)
        ids.sort()
        d, lab = faiss.knn(np.ascontiguousarray(x[ids]), x, min(self.k + 1, n), metric=faiss.METRIC_INNER_PRODUCT)
        truth, _ = _drop_self(ids, *_clean(lab, d), self.k)
        stored = self.neighbors[ids]
        found = ((stored[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)).any(axis=1)
        total = np.count_nonzero(truth >= 0)
        return float(np.count_nonzero(found) / total) if total else 1.0

    # -- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The rows, reserves and floors (numpy copies) and build parameters; the faiss index is not stored.

        Example::

            >>> e = np.eye(5, dtype=np.float32)
            >>> sorted(KnnGraph.build(e, k=2).state_dict())[:3]
            ['ef_construction', 'ef_search', 'exact_threshold']
        """
        return {
            "neighbors": self.neighbors.copy(),
            "similarities": self.similarities.copy(),
            "method": self.method,
            "k": self.k,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "overlay_limit": self.overlay_limit,
            "exact_threshold": self.exact_threshold,
            "repair": self.repair,
            "reserve": self.reserve,
            "inplace_drift": self.inplace_drift,
            "reserve_neighbors": self.reserve_neighbors.copy(),
            "reserve_similarities": self.reserve_similarities.copy(),
            "floor": self.floor.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, embeddings) -> KnnGraph:
        """Restore a graph: the stored rows exactly, a fresh faiss index (same method/params) over ``embeddings``.

        ``state["neighbors"]`` / ``["similarities"]`` may be numpy arrays or CPU torch tensors.

        Example::

            >>> e = np.eye(5, dtype=np.float32)
            >>> g = KnnGraph.build(e, k=2)
            >>> h = KnnGraph.from_state_dict(g.state_dict(), e)
            >>> bool((h.neighbors == g.neighbors).all())
            True
        """
        x = _as_f32(embeddings)
        _check_embeddings(x)
        neighbors = np.array(state["neighbors"], dtype=np.int64, copy=True)
        similarities = np.array(state["similarities"], dtype=np.float32, copy=True)
        if neighbors.ndim != 2 or neighbors.shape != similarities.shape or neighbors.shape[0] != x.shape[0]:
            raise ValueError(
                f"state rows {neighbors.shape}/{similarities.shape} do not match embeddings with {x.shape[0]} rows"
            )
        graph = cls(
            neighbors=neighbors,
            similarities=similarities,
            method=str(state["method"]),
            k=int(state.get("k", neighbors.shape[1])),
            hnsw_m=int(state.get("hnsw_m", 32)),
            ef_construction=int(state.get("ef_construction", 40)),
            ef_search=int(state.get("ef_search", 64)),
            overlay_limit=float(state.get("overlay_limit", 0.2)),
            exact_threshold=int(state.get("exact_threshold", 200_000)),
            repair=_check_repair(str(state.get("repair", "search"))),
            inplace_drift=float(state.get("inplace_drift", 0.5)),
        )
        if graph.method not in ("flat", "hnsw") or graph.k != neighbors.shape[1]:
            raise ValueError(f"bad state: method={graph.method!r}, k={graph.k}, rows of width {neighbors.shape[1]}")
        n = neighbors.shape[0]
        if "reserve_neighbors" in state:
            graph.reserve_neighbors = np.array(state["reserve_neighbors"], dtype=np.int64, copy=True)
            graph.reserve_similarities = np.array(state["reserve_similarities"], dtype=np.float32, copy=True)
            graph.floor = np.array(state["floor"], dtype=np.float32, copy=True)
            graph.reserve = _check_reserve(int(state.get("reserve", graph.reserve_neighbors.shape[1])))
            if graph.reserve_neighbors.shape != (n, graph.reserve) or graph.floor.shape != (n,):
                raise ValueError("bad state: reserve/floor shapes do not match the rows")
        else:  # a state from before reserves: none, and each row's weakest edge as its floor
            graph.reserve = 0
            graph.reserve_neighbors = np.empty((n, 0), dtype=np.int64)
            graph.reserve_similarities = np.empty((n, 0), dtype=np.float32)
            graph.floor = similarities[:, -1].copy()
        graph._make_index(x)
        return graph


# ----------------------------------------------------------------------------------------------------------------
# weights and propagation


def edge_weights(neighbors_or_similarities, similarities=None) -> np.ndarray:
    """Edge weights ``w_ij = min(1, max(0, cos(e_i, e_j)))`` (float32), 0 on missing edges.

    Call as ``edge_weights(similarities)`` or ``edge_weights(neighbors, similarities)``; a missing edge is one with
    neighbour ``-1`` (second form) or a non-finite similarity (both forms: :class:`KnnGraph` stores ``-inf``).

    Example::

        >>> edge_weights(np.array([[0.5, -0.2, -np.inf]], dtype=np.float32)).tolist()
        [[0.5, 0.0, 0.0]]
    """
    if similarities is None:
        sims = np.asarray(neighbors_or_similarities, dtype=np.float32)
        valid = np.isfinite(sims)
    else:
        nb = np.asarray(neighbors_or_similarities)
        sims = np.asarray(similarities, dtype=np.float32)
        if nb.shape != sims.shape:
            raise ValueError(f"neighbors {nb.shape} and similarities {sims.shape} differ in shape")
        valid = (nb >= 0) & np.isfinite(sims)
    # Clipped at 1 too: float32 cosines of near-duplicates come out as 1.0000001.
    return np.where(valid, np.clip(sims, 0.0, 1.0), 0.0).astype(np.float32)


def _float_values(values) -> np.ndarray:
    v = np.asarray(values)
    return v if np.issubdtype(v.dtype, np.floating) else v.astype(np.float32)


def _check_graph_args(n: int, neighbors, weights, anchors=None):
    nb = np.asarray(neighbors, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    if nb.ndim != 2 or nb.shape[0] != n or w.shape != nb.shape:
        raise ValueError(f"neighbors {nb.shape} and weights {w.shape} must both be ({n}, k)")
    if anchors is None:
        return nb, w, None
    a = np.asarray(anchors)
    if a.shape != (n,) or a.dtype != bool:
        raise ValueError(f"anchors must be a boolean mask of shape ({n},), got {a.dtype} {a.shape}")
    return nb, w, a


def _positive_weights(nb: np.ndarray, w: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(safe neighbour ids, weights zeroed on missing / non-positive edges and, with ``mask``, non-mask targets)."""
    valid = nb >= 0
    safe = np.where(valid, nb, 0)
    keep = valid & (w > 0)
    if mask is not None:
        keep &= mask[safe]
    return safe, np.where(keep, w, 0.0).astype(np.float32)


def _weighted_sum(values: np.ndarray, nb: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``sum_c w[t, c] * values[nb[t, c]]`` for each row t.

    Column by column over the non-zero weights only: with 5-10% anchors most weights are zero, so this gathers about
    a tenth of the ``(T, k, d)`` block a dense einsum would (chunked to bound memory).
    """
    out = np.zeros((nb.shape[0],) + values.shape[1:], dtype=np.result_type(values.dtype, np.float32))
    step = _chunk_rows(int(np.prod(values.shape[1:], dtype=np.int64)) * out.itemsize)
    trailing = (1,) * (values.ndim - 1)
    for c in range(nb.shape[1]):
        rows = np.flatnonzero(w[:, c] > 0)
        for s in range(0, rows.size, step):
            r = rows[s : s + step]
            out[r] += w[r, c].reshape((-1,) + trailing) * values[nb[r, c]]
    return out


def _anchor_targets(nb, w, anchors):
    safe, wa = _positive_weights(nb, w, anchors)
    total = wa.sum(axis=1)
    targets = np.flatnonzero(~anchors & (total > 0))
    return targets, safe[targets], wa[targets], total[targets]


def propagate(values, neighbors, weights, anchors, mode: str = "exact") -> np.ndarray:
    """Spread freshly computed anchor values to their non-anchor neighbours (GRACE score propagation).

    ``values`` is ``(N,)`` or ``(N, d)``; ``anchors`` a bool mask ``(N,)`` of nodes whose values are fresh. For every
    non-anchor ``i`` with at least one anchor neighbour ``j`` in ``neighbors[i]`` with ``w_ij > 0`` (set ``A_i``)::

        exact:       z_i = (z_i_old + sum_{j in A_i} w_ij z_j) / (1 + sum_{j in A_i} w_ij)
        paper_eq21:  z_i = 0.5 z_i_old + 0.5 sum_{j in A_i} a_ij z_j,    a_ij = w_ij / sum_{j in A_i} w_ij

    "exact" is the minimiser of ``E(z) = 1/2 (z - z_i_old)^2 + 1/2 sum_{j in A_i} w_ij (z - z_j)^2`` (set
    ``dE/dz = 0``); "paper_eq21" is the paper's Eq. 21 as printed, which equals it only when the weights sum to 1.
    Anchors and nodes without an anchor neighbour keep their values. Vectorised (no loop over nodes). Returns a new
    array.

    Example::

        >>> nb = np.array([[1], [0]]); w = np.array([[1.0], [1.0]], dtype=np.float32)
        >>> propagate(np.array([0.0, 4.0], dtype=np.float32), nb, w, np.array([False, True])).tolist()
        [2.0, 4.0]
        >>> propagate(np.array([0.0, 4.0], dtype=np.float32), nb, w, np.array([False, True]), "paper_eq21").tolist()
        [2.0, 4.0]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    z = _float_values(values)
    nb, w, anchors = _check_graph_args(z.shape[0], neighbors, weights, anchors)
    out = z.copy()
    targets, t_nb, t_w, t_total = _anchor_targets(nb, w, anchors)
    if targets.size == 0:
        return out
    num = _weighted_sum(z, t_nb, t_w)
    shape = (-1,) + (1,) * (z.ndim - 1)
    # in place on `num`: at (N, d) scale every temporary is hundreds of MB
    if mode == "exact":
        num += z[targets]
        num /= (1.0 + t_total).reshape(shape)
    else:
        num /= (2.0 * t_total).reshape(shape)
        num += 0.5 * z[targets]
    out[targets] = num
    return out


def propagate_drift(embeddings, drift, neighbors, weights, anchors, mode: str = "exact") -> np.ndarray:
    """Move non-anchor embeddings along their anchor neighbours' drift (GRACE embedding propagation).

    ``embeddings`` ``(N, d)`` are the current unit rows (anchors already at their fresh values); ``drift`` ``(N, d)``
    holds ``e_j_new - e_j_old`` for anchors (other rows are ignored). For each non-anchor ``i`` with an anchor
    neighbour (``A_i`` as in :func:`propagate`)::

        exact:       e_i <- normalize(e_i + sum_{j in A_i} w_ij drift_j / (1 + sum_{j in A_i} w_ij))
        paper_eq21:  e_i <- normalize(e_i + 0.5 sum_{j in A_i} a_ij drift_j)

    i.e. the same update as :func:`propagate` applied to the displacement, then projected back to the sphere. Other
    rows are returned unchanged. Returns a new ``(N, d)`` float32 array.

    Example::

        >>> e = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
        >>> drift = np.array([[0.0, 0.0], [-1.0, 1.0]], dtype=np.float32)  # anchor 1 moved to (0, 1)
        >>> e[1] = [0.0, 1.0]
        >>> out = propagate_drift(e, drift, np.array([[1], [0]]), np.ones((2, 1), np.float32), np.array([False, True]))
        >>> out[0].astype(float).round(3).tolist()
        [0.707, 0.707]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    e = np.array(embeddings, dtype=np.float32, copy=True)
    dr = np.asarray(drift, dtype=np.float32)
    if e.ndim != 2 or dr.shape != e.shape:
        raise ValueError(f"embeddings {e.shape} and drift {dr.shape} must both be (N, d)")
    nb, w, anchors = _check_graph_args(e.shape[0], neighbors, weights, anchors)
    targets, t_nb, t_w, t_total = _anchor_targets(nb, w, anchors)
    if targets.size == 0:
        return e
    num = _weighted_sum(dr, t_nb, t_w)  # non-anchor drift rows get weight 0 here
    num /= ((1.0 + t_total) if mode == "exact" else (2.0 * t_total))[:, None]
    moved = num
    moved += e[targets]
    norm = np.linalg.norm(moved, axis=1, keepdims=True)
    ok = norm[:, 0] > 1e-12  # a drift that cancels the embedding exactly: keep the old row
    e[targets[ok]] = moved[ok] / norm[ok]
    return e


def neighbour_mean(values, neighbors, weights) -> np.ndarray:
    """Weighted neighbour average ``m_i = sum_j a_ij v_j`` with ``a_ij = w_ij / sum_j w_ij`` over positive edges.

    For GRACE's disagreement ``|g_i - m_i|`` between a node's importance and its neighbourhood's. ``values`` is
    ``(N,)`` or ``(N, d)``; nodes without a positive edge get their own value (disagreement 0).

    Example::

        >>> nb = np.array([[1, 2], [0, -1], [0, 1]])
        >>> w = np.array([[1.0, 3.0], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
        >>> neighbour_mean(np.array([0.0, 4.0, 8.0], dtype=np.float32), nb, w).tolist()
        [7.0, 0.0, 8.0]
    """
    z = _float_values(values)
    nb, w, _ = _check_graph_args(z.shape[0], neighbors, weights)
    safe, wp = _positive_weights(nb, w, None)
    total = wp.sum(axis=1)
    rows = np.flatnonzero(total > 0)
    out = z.copy()
    if rows.size:
        shape = (-1,) + (1,) * (z.ndim - 1)
        out[rows] = _weighted_sum(z, safe[rows], wp[rows]) / total[rows].reshape(shape)
    return out
