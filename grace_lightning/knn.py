"""The maintained cosine k-NN index: a faiss k-NN graph over unit embeddings, built once and repaired locally.

Numpy in, numpy out (faiss underneath, or for exact search on a GPU torch, :mod:`grace_lightning.knn_torch`);
nothing here knows about Lightning. Rows of ``embeddings`` are L2-normalised, so cosine similarity is the inner
product and faiss runs with ``METRIC_INNER_PRODUCT``.

* :class:`KnnGraph` -- ``neighbors[i]`` / ``similarities[i]`` are node ``i``'s ``k`` most similar *other* nodes,
  best first. Exact (``IndexFlatIP``, or a matrix product on a GPU) up to ``exact_threshold`` nodes, an inverted
  file (``IndexIVFFlat``) above; HNSW on request.
  :meth:`KnnGraph.update` repairs the graph locally after some embeddings moved instead of rebuilding it.
* :func:`set_faiss_threads` -- faiss has its own OpenMP thread count; set it per DDP rank.

What GRACE computes along the graph's edges (edge weights, score and drift propagation) is in
:mod:`grace_lightning.propagation`.

Conventions: a missing edge (fewer than ``k`` other nodes, or an approximate search that returned too few) has
neighbour ``-1`` and similarity ``-inf``, and always sorts last.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from grace_lightning.validation import non_negative_int, positive_int

__all__ = ["KnnGraph", "resolve_device", "set_faiss_threads"]

_SEARCH_BLOCK = 16_384  # queries per faiss call: bounds the temporary result buffers
_GATHER_BYTES = 64 << 20  # numpy gathers (x[idx] for many idx) are chunked to about this many bytes
_REVERSE_FACTOR = 4  # moved nodes are re-queried with 4k results: the extra hits are reverse-edge candidates (step 3b)
_IVF_POINTS_PER_LIST = 64  # k-means of an IVF index trains on this many rows a list (faiss's default: 256)
_METHODS = ("flat", "hnsw", "ivf")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def set_faiss_threads(world_size: int = 1) -> int:
    """Give faiss ``max(1, os.cpu_count() // world_size)`` OpenMP threads and return that number.

    faiss keeps its own OpenMP thread count: neither ``torch.set_num_threads`` (which Lightning sets per DDP
    rank) nor ``OMP_NUM_THREADS`` read after import reaches it, so without this every rank of a DDP run uses all
    cores and the ranks oversubscribe the machine.

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


def _check_repair(repair: str) -> str:
    if repair not in ("search", "two_hop"):
        raise ValueError(f"repair must be 'search' or 'two_hop', got {repair!r}")
    return repair


def resolve_device(device: str) -> str:
    """``device`` checked and normalised: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Does not initialise CUDA (a
    ``"cuda"`` index is pinned to the building thread's current device when the index is made).

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}: exact search runs on CUDA or the CPU")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but no CUDA device is visible; use device='cpu'")
    return str(parsed)


def _restored_device(device: str) -> str:
    """A checkpoint's search device where it exists here, else the CPU (exact search either way)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    index = torch.device(device).index or 0
    return device if index < torch.cuda.device_count() else "cpu"


def _resolve_method(method: str, n: int, exact_threshold: int) -> str:
    if method == "auto":
        return "flat" if n <= exact_threshold else "ivf"
    if method not in _METHODS:
        raise ValueError(f"method must be 'auto', 'flat', 'ivf' or 'hnsw', got {method!r}")
    return method


def _ivf_lists_for(n: int) -> int:
    """The inverted lists of an IVF graph over ``n`` nodes by default: ``round(sqrt(n))``, faiss's usual choice,
    which balances the probe (one comparison a list) against the scan of the probed lists (``n / lists`` each)."""
    return max(1, int(round(n**0.5)))


# ----------------------------------------------------------------------------------------------------------------
# the graph


@dataclass(eq=False)
class KnnGraph:
    """Cosine k-NN graph: ``neighbors[i]`` are node ``i``'s ``k`` most similar other nodes, best first.

    Attributes:
        neighbors: ``(N, k)`` int64; row ``i`` never contains ``i``; ``-1`` where fewer than ``k`` exist.
        similarities: ``(N, k)`` float32 ``cos(e_i, e_neighbors[i, c])``, each row sorted descending; ``-inf``
            on missing edges.
        method: ``"flat"`` (exact ``IndexFlatIP``), ``"ivf"`` (``IndexIVFFlat``: k-means lists, ``ivf_probes`` of
            ``ivf_lists`` searched) or ``"hnsw"`` (``IndexHNSWFlat``); all inner product.
        device: where exact search runs: ``"cpu"`` (faiss) or a CUDA device such as ``"cuda:0"`` (torch matrix
            products, :class:`~grace_lightning.knn_torch.TorchFlatIndex`); IVF and HNSW always run on the CPU.
        k, hnsw_m, ef_construction, ef_search, ivf_lists, ivf_probes, overlay_limit, exact_threshold, repair,
            reserve, inplace_drift: the build parameters (kept so that :meth:`update` and :meth:`from_state_dict`
            use the same ones).
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
    ivf_lists: int = 0
    ivf_probes: int = 8
    overlay_limit: float = 0.2
    exact_threshold: int = 200_000
    repair: str = "search"
    reserve: int = 5
    inplace_drift: float = 0.5
    device: str = "cpu"
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
        ivf_lists: int | None = None,
        ivf_probes: int = 8,
        overlay_limit: float = 0.2,
        repair: str = "search",
        reserve: int = 5,
        inplace_drift: float = 0.5,
        device: str = "cpu",
    ) -> KnnGraph:
        """Build the self k-NN graph of ``embeddings`` (``(N, d)`` float32/float16, unit rows).

        ``method="auto"`` is exact search (``faiss.IndexFlatIP``, ``O(N^2 d)``: about 20 s at 100k x 128 on 2 cores)
        when ``N <= exact_threshold``, else an inverted file (``IndexIVFFlat``: ``ivf_lists`` k-means lists,
        ``round(sqrt(N))`` when ``None``, trained on 64 rows a list; each search scans the ``ivf_probes`` lists
        nearest the query, about ``O(N^1.5 d)`` for the whole build; recall@10 0.99 on clustered embeddings,
        0.57-0.78 on unclustered low-rank ones). ``method="hnsw"`` builds ``IndexHNSWFlat(d, hnsw_m, METRIC_INNER_PRODUCT)``
        with ``ef_construction`` / ``ef_search`` (recall less dependent on clusters, at about twice the build time).
        Every node is searched with ``k + reserve + 2`` results and itself removed: the best ``k`` are its row,
        the next ``reserve`` its reserve, the last one's similarity its :attr:`floor` (``reserve`` costs a few
        more results per search; ``ef_search`` bounds the HNSW work anyway). ``overlay_limit``, ``repair``,
        ``reserve`` and ``inplace_drift`` matter for :meth:`update`. ``device="cuda"`` (or ``"cuda:N"``) runs
        exact search as matrix products on that GPU (``"cuda"``: the calling thread's current device); HNSW
        ignores it.

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
        resolved = _resolve_method(method, n, int(exact_threshold))
        graph = cls(
            neighbors=np.empty((0, int(k)), dtype=np.int64),
            similarities=np.empty((0, int(k)), dtype=np.float32),
            method=resolved,
            device=resolve_device(device) if resolved == "flat" else "cpu",
            k=int(k),
            hnsw_m=int(hnsw_m),
            ef_construction=int(ef_construction),
            ef_search=int(ef_search),
            ivf_lists=_ivf_lists_for(n) if ivf_lists is None else positive_int("KnnGraph", "ivf_lists", ivf_lists),
            ivf_probes=positive_int("KnnGraph", "ivf_probes", ivf_probes),
            overlay_limit=float(overlay_limit),
            exact_threshold=int(exact_threshold),
            repair=_check_repair(repair),
            reserve=non_negative_int("KnnGraph", "reserve", reserve),
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

    def _make_index(self, x: np.ndarray, centroids: np.ndarray | None = None) -> None:
        """(Re)build the faiss index from all of ``x`` and forget any overlay. An IVF index trains its lists on ``x``
        unless ``centroids`` (its lists' centres, as :meth:`state_dict` keeps them) are given."""
        d = x.shape[1]
        if self.method == "flat" and self.device != "cpu":
            from grace_lightning.knn_torch import TorchFlatIndex

            index = TorchFlatIndex(d, self.device)
            self.device = str(index.device)  # "cuda" pinned to the device it now lives on
        elif self.method == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.method == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.ivf_lists, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = min(self.ivf_probes, self.ivf_lists)
            if centroids is None:
                # Lists need only be roughly even: 64 rows a list train the k-means ~4x faster than faiss's 256.
                index.cp.max_points_per_centroid = _IVF_POINTS_PER_LIST
                index.cp.min_points_per_centroid = 5  # small pools: sqrt(N) rows a list suffice; faiss wants 39
                index.train(x)
            else:
                index.quantizer.add(_as_f32(centroids))
                index.is_trained = True
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
        if self.method != "hnsw":
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

        1. Index: flat re-adds all current vectors (a memcpy, as fast as remove_ids + add_with_ids); IVF too, into
           the lists trained at the build (one probe a vector, about ``O(N sqrt(N) d)``). HNSW cannot
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
        :func:`~grace_lightning.propagation.propagate_drift`, or accept slightly stale rows for them). Returns
        ``{"moved", "requeried", "reverse_patched" (rows changed in 3), "refilled" (rows in 4), "rebuilt",
        "inplace" (HNSW nodes written in place), "overlay" (HNSW overlay size), "seconds"}``.

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
        if self.method != "hnsw":
            self._index.reset()  # an IVF index keeps its trained lists
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

    def _centroids(self) -> np.ndarray | None:
        """An IVF index's list centres, ``(ivf_lists, d)`` float32 (``None`` for the other methods)."""
        if self.method != "ivf":
            return None
        return self._index.quantizer.reconstruct_n(0, self._index.nlist)

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
            ['device', 'ef_construction', 'ef_search']
        """
        return {
            "neighbors": self.neighbors.copy(),
            "similarities": self.similarities.copy(),
            "method": self.method,
            "k": self.k,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "ivf_lists": self.ivf_lists,
            "ivf_probes": self.ivf_probes,
            "ivf_centroids": self._centroids(),
            "overlay_limit": self.overlay_limit,
            "exact_threshold": self.exact_threshold,
            "repair": self.repair,
            "reserve": self.reserve,
            "inplace_drift": self.inplace_drift,
            "device": self.device,
            "reserve_neighbors": self.reserve_neighbors.copy(),
            "reserve_similarities": self.reserve_similarities.copy(),
            "floor": self.floor.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, embeddings) -> KnnGraph:
        """Restore a graph: the stored rows exactly, a fresh faiss index (same method/params) over ``embeddings``.

        ``state["neighbors"]`` / ``["similarities"]`` may be numpy arrays or CPU torch tensors. A graph whose exact
        search ran on a GPU searches on the same device again, or with faiss on the CPU where no GPU is visible
        (the stored rows are kept either way; later repairs search exactly on both).

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
            ivf_lists=int(state.get("ivf_lists", 0)),
            ivf_probes=int(state.get("ivf_probes", 8)),
            overlay_limit=float(state.get("overlay_limit", 0.2)),
            exact_threshold=int(state.get("exact_threshold", 200_000)),
            repair=_check_repair(str(state.get("repair", "search"))),
            inplace_drift=float(state.get("inplace_drift", 0.5)),
            device=_restored_device(str(state.get("device", "cpu"))),
        )
        if graph.method not in _METHODS or graph.k != neighbors.shape[1]:
            raise ValueError(f"bad state: method={graph.method!r}, k={graph.k}, rows of width {neighbors.shape[1]}")
        n = neighbors.shape[0]
        if "reserve_neighbors" in state:
            graph.reserve_neighbors = np.array(state["reserve_neighbors"], dtype=np.int64, copy=True)
            graph.reserve_similarities = np.array(state["reserve_similarities"], dtype=np.float32, copy=True)
            graph.floor = np.array(state["floor"], dtype=np.float32, copy=True)
            reserve = int(state.get("reserve", graph.reserve_neighbors.shape[1]))
            graph.reserve = non_negative_int("KnnGraph", "reserve", reserve)
            if graph.reserve_neighbors.shape != (n, graph.reserve) or graph.floor.shape != (n,):
                raise ValueError("bad state: reserve/floor shapes do not match the rows")
        else:  # a state from before reserves: none, and each row's weakest edge as its floor
            graph.reserve = 0
            graph.reserve_neighbors = np.empty((n, 0), dtype=np.int64)
            graph.reserve_similarities = np.empty((n, 0), dtype=np.float32)
            graph.floor = similarities[:, -1].copy()
        centroids = state.get("ivf_centroids")
        if graph.method == "ivf" and (centroids is None or np.shape(centroids) != (graph.ivf_lists, x.shape[1])):
            raise ValueError(f"bad state: an IVF graph needs its {graph.ivf_lists} list centres of width {x.shape[1]}")
        # An IVF index searches the lists it was trained with, so that repairs after a resume find what they would
        # have found without one.
        graph._make_index(x, None if centroids is None else np.asarray(centroids, dtype=np.float32))
        return graph
