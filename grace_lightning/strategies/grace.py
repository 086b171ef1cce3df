"""``grace``: gradient importance on a maintained k-NN graph, with anchors, propagation and repair (the default).

Reconstructed from GRACE (Tang, Li, Chen, arXiv:2604.11810, 2026), whose method section is only partly
public; what the paper leaves open is a parameter here, with the interpretation documented in the ``grace``
section of ``grace_lightning/strategies/README.md``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from grace_lightning.knn import KnnGraph, resolve_device
from grace_lightning.propagation import (
    Neighbourhood,
    edge_weights,
    fill_unknown,
    outvoted_labels,
    propagate,
    propagate_drift,
)
from grace_lightning.signals.store import SignalStore
from grace_lightning.strategies.base import (
    Selection,
    SelectionInput,
    Strategy,
    gumbel_top_k,
    register_strategy,
    require_embeddings,
    top_k_random_ties,
)
from grace_lightning.submodular import coverage_weights, select_facility_location
from grace_lightning.validation import non_negative_float, positive_int, unit_interval


# Priority anchors a refresh, as a share of the budget, when neither anchor_share nor anchor_fraction is given.
_ANCHOR_SHARE = 0.1


class GraceState:
    """GRACE's memory between refreshes (rank 0 only): the graph and its view of the pool.

    Attributes:
        graph: the k-NN graph over :attr:`node_embedding` (``None`` until the first informed refresh).
        node_embedding: ``(N, d)`` float16 unit vectors the graph was built/repaired on; non-anchors move
            by propagated drift.
        importance: ``(N,)`` float32 importance estimates: measured on anchors, propagated elsewhere.
        seen_step: ``(N,)`` int32 snapshot of the store's ``last_step`` at the previous refresh; an example
            whose ``last_step`` differs was measured since (scored as an anchor or trained on for free).
        last_now: batch position of the previous refresh.
        projection: ``(d, graph_dim)`` float32 basis (top singular directions) fitted at the graph's build,
            mapping the store's embeddings into the graph's space (``None``: the graph uses the store's
            embeddings as they are).
    """

    def __init__(self, pool_size: int) -> None:
        self.pool_size = pool_size
        self.graph: Optional[KnnGraph] = None
        self.node_embedding: Optional[np.ndarray] = None
        self.importance = np.zeros(pool_size, dtype=np.float32)
        self.seen_step = np.full(pool_size, -1, dtype=np.int32)
        self.last_now = 0
        self.projection: Optional[np.ndarray] = None
        self._edges: Optional[tuple[np.ndarray, Neighbourhood]] = None  # derived from the graph; not saved
        self._outvoted: Optional[tuple[int, np.ndarray]] = None  # (labelled examples, the vote): likewise

    def edges(self) -> tuple[np.ndarray, Neighbourhood]:
        """The graph's edge weights and their :class:`Neighbourhood`, computed once while the edges stay as they are
        (a refresh reads them three to four times: anchor priority, propagation, smoothing, damping)."""
        if self._edges is None:
            weights = edge_weights(self.graph.neighbors, self.graph.similarities)
            self._edges = (weights, Neighbourhood(self.graph.neighbors, weights))
        return self._edges

    def outvoted(self, labels: np.ndarray) -> np.ndarray:
        """:func:`~grace_lightning.propagation.outvoted_labels` on the graph, computed again only when more examples
        have a label (an example's label never changes, so their count says whether the vote can have)."""
        labelled = int((labels >= 0).sum())
        if self._outvoted is None or self._outvoted[0] != labelled:
            self._outvoted = (labelled, outvoted_labels(labels, self.graph.neighbors, self.edges()[0]))
        return self._outvoted[1]

    def edges_changed(self) -> None:
        """Forget :meth:`edges` and :meth:`outvoted` after the graph was built, repaired or loaded."""
        self._edges = None
        self._outvoted = None

    def state_dict(self) -> dict[str, Any]:
        graph = None
        if self.graph is not None:
            graph = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in self.graph.state_dict().items()}
        return {
            "graph": graph,
            "node_embedding": None if self.node_embedding is None else torch.from_numpy(self.node_embedding),
            "importance": torch.from_numpy(self.importance),
            "seen_step": torch.from_numpy(self.seen_step),
            "last_now": self.last_now,
            "projection": None if self.projection is None else torch.from_numpy(self.projection),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = state["importance"].numpy().copy()
        self.seen_step = state["seen_step"].numpy().copy()
        self.last_now = int(state["last_now"])
        projection = state.get("projection")  # absent in checkpoints written before graph_dim existed
        self.projection = None if projection is None else projection.numpy().copy()
        self.node_embedding = None if state["node_embedding"] is None else state["node_embedding"].numpy().copy()
        self.graph = None
        self.edges_changed()
        if state["graph"] is not None:
            graph_state = {k: v.numpy() if isinstance(v, Tensor) else v for k, v in state["graph"].items()}
            # The faiss index is rebuilt from the vectors; the stored edges are kept exactly.
            self.graph = KnnGraph.from_state_dict(graph_state, self.node_embedding.astype(np.float32))


@register_strategy("grace")
class Grace(Strategy):
    r"""Graph-smoothed importance on a k-NN graph that is built once and, on request, repaired between refreshes.

    Each refresh rescores a few *anchors* (the examples trained since the last refresh, plus ``anchor_share`` of
    the budget's worth with the highest staleness-and-disagreement priority), propagates their
    new importance to their graph neighbours (with ``repair_share`` or ``drift_threshold``: also their embedding
    drift, and repairs the edges of the anchors that drifted most), and draws the budget in proportion to
    ``g̃``, each example's importance averaged over its graph neighbourhood (``smoothing``);
    ``selector="facility_location"`` instead selects by lazy greedy on
    ``F(S) = Σ_v g̃_v max_{s∈S} w_vs + lam · Σ_{s∈S} g̃_s``. The first informed refresh measures the whole pool
    and builds the graph. How it works, when to use it, suggested settings and costs:
    the ``grace`` section of ``grace_lightning/strategies/README.md``.

    Args:
        k: neighbours per node.
        importance: ``"grad_norm"`` (closed-form last-layer gradient norm) or ``"loss"``.
        anchor_share: examples rescored per refresh beyond the free training signals, as a share of the budget
            (``None``, the default: ``0.1``, unless ``anchor_fraction`` is given). A share of the budget, so that
            rescoring costs the same share of training whatever the budget (an epoch trains the budget's examples);
            ``0`` rescores none and leaves the unmeasured to propagation. The tenth ablation round (``README.md``:
            four regimes at 10% and 30%) found the priority anchors worth no accuracy at the cost they had as 5%
            of the pool (half the budget at 10%): none, or half as many, gave the same accuracy (+0.01 and -0.02
            points on average) for 0.1-1.0 s less selection a fit.
        anchor_fraction: instead of ``anchor_share``, a share of the *pool* (the paper's ``M/N``, 5-10%; the
            default before ``anchor_share``). At a 1% budget 5% of the pool is five times an epoch's examples.
        staleness_weight: weight of staleness in the anchor priority (batches since an example was last
            measured, over batches since the last refresh).
        disagreement_weight: weight of disagreement in the anchor priority (``|g_i − ḡ_{N(i)}| / mean(g)``:
            importance against the edge-weighted mean of the neighbours').
        propagation: ``"exact"`` (the smoothing energy's minimiser ``z = (z_old + Σ w_ij z_j) / (1 + Σ w_ij)``)
            or ``"paper_eq21"`` (the paper's printed ``z = ½ z_old + ½ Σ a_ij z_j``).
        repair_share: share of each refresh's anchors, those whose embedding drifted most, whose graph edges are
            re-searched (the nodes then follow the anchors' propagated drift). ``0`` (the default) keeps the graph
            as the first informed refresh built it: in the ablation (``README.md``; Fashion-MNIST and tweets,
            noisy and long training) repairing the top ``0.1`` (the default before ``52de1e4``) gave the same
            accuracy at 1.4-2.5x the selection time. Pass ``0.1`` where the model's representation keeps
            changing its neighbourhoods (a pretrained encoder fine-tuned far, a curriculum of new domains).
        drift_threshold: instead of ``repair_share``, repair every anchor whose embedding drift (L2 distance
            between unit vectors in the graph's space; 0.05 is a cosine change of about 0.001) exceeds this. While
            a model trains nearly every anchor drifts past any small fixed threshold, so it re-searches them all.
        lam: weight of the importance term in the facility-location objective (``selector="facility_location"``).
        weighting: ``"none"`` (the default: picks train with weight 1) or ``"coverage"`` (each pick weighted by the
            pool examples it covers, mean 1, as CRAIG does). In the ablation (``README.md``) coverage weights cost
            0.9 points under 30% label noise, where a mislabeled pick that covers its true class's examples gets
            a large weight, and gained nothing on clean data.
        graph_method: ``"auto"`` (exact up to ``exact_threshold`` examples, or ``gpu_exact_threshold`` when the
            graph searches on a GPU; an inverted file above), ``"flat"``, ``"ivf"``, ``"hnsw"``. The inverted file
            (faiss ``IndexIVFFlat``: the embeddings' k-means lists, the ``ivf_probes`` lists nearest each query
            scanned) built Fashion-MNIST's 60k-node graph in 0.62 s against 1.24 s for HNSW (recall@10 0.995
            against 0.997; ``benchmarks/results/graph_build_r9.json``), and a million unclustered synthetic nodes in
            40 s against 75 s (0.57 against 0.77; ``benchmarks/results/grace_scale_ivf.json``);
            HNSW's recall depends less on how clustered the embeddings are (tweets: 0.93 against 0.82). GRACE's
            accuracy did not move with recall between 0.52 and 0.99 (``README.md``, GRACE's ablation).
        exact_threshold: pool size up to which ``"auto"`` uses exact search on the CPU.
        graph_device: where exact search runs: ``"auto"`` (the default: the current GPU where this process has
            initialised CUDA, i.e. the model trains on one, else the CPU; on the CPU, with a warning, when the GPU
            has not the free memory for the graph), ``"cpu"`` (faiss) or ``"cuda"`` /
            ``"cuda:N"`` (torch matrix products on that GPU; ``"cuda"`` is the current device of the thread that
            builds the graph). On one H200 an exact 100k-node graph took 0.31 s against 0.75 s for HNSW on 16 cores,
            at recall 1.0 against 0.95, and a GRACE fit on ``lm-mixture`` picked the same subset as with faiss's
            graph (``README.md``, ``benchmarks/results/gpu_check/run3``). IVF and HNSW always run on the CPU.
        gpu_exact_threshold: pool size up to which ``"auto"`` searches exactly on a GPU graph device. Exact search
            grows as ``N^2``: at a million nodes it took 20.5 s on an H200 against 11.7 s for HNSW on 16 cores, and
            the two cross near half a million (measured against HNSW, before IVF became the approximate default;
            IVF builds about twice as fast as HNSW on 2 cores, so the crossing is likely lower).
        ivf_lists: inverted lists of an IVF graph (``None``: ``round(sqrt(N))``).
        ivf_probes: lists an IVF search scans (faiss ``nprobe``); more find more true neighbours, at a cost linear in
            the probes.
        hnsw_m: links per node of the HNSW index (faiss ``M``) when the graph uses one; fewer build and search
            faster at a lower recall (measured in ``benchmarks/grace_scale.py``, ``README.md``).
        ef_construction: HNSW's search breadth while it inserts a node (faiss ``efConstruction``); lower builds
            the index faster, with links that lead to the true neighbours less often.
        ef_search: HNSW's search breadth (faiss ``efSearch``, at least the results a search asks for) for the
            build's query of every node and for repairs; lower is faster at a lower recall. The defaults (20 and
            24; faiss's are 40 and 16) built the graphs of Fashion-MNIST (60k) and tweets (32k) 1.7x and 2.2x
            faster than 40 and 64, at recall@10 0.997 and 0.933, and in the ablation (``README.md``) cut GRACE's
            selection time by 8-25% at the same accuracy.
        graph_dim: the graph lives in the span of the embeddings' top ``graph_dim`` singular directions (fitted on
            up to 4,096 examples when the graph is built, then fixed), which cuts every search by ``d / graph_dim``;
            ``None`` keeps the store's dimension.
        smoothing: the importance the selection weighs is ``(1 - smoothing) * g_i + smoothing * ḡ_{N(i)}``, the
            example's own mixed with its graph neighbours' edge-weighted mean. Under label noise a mislabeled
            example has a large gradient among easy neighbours of its true class, so smoothing stops the selection
            from chasing it. The default ``1.0`` weighs a region's importance, not an example's: in the ablation
            (``README.md``; with ``weighting="none"``) it raised accuracy under 30% label noise by 2 points and
            cost 0.3 on clean 20-epoch training; ``0`` weighs each example's own importance.
        smoothing_statistic: the neighbours' value ``ḡ_{N(i)}`` that ``smoothing`` mixes in: ``"mean"`` (edge-weighted)
            or ``"median"`` (of the positive-weight neighbours): with label noise a region's mislabeled examples
            lift its mean gradient norm, so easy regions look as important as hard ones, where the median stays
            at the correct majority's value. In the eleventh ablation round (``README.md``; 4 regimes at 10% and
            30%) the median changed nothing measurable: +0.02 points on average, the same 30% noisy share of the
            trained examples as the mean. It stays an option; the mean is the default.
        selector: how the picks are made from the (smoothed) importance. ``"sample"`` (the default) draws the
            budget without replacement with probabilities in proportion to the importance (Gumbel top-k on the
            seeded generator, as GRIP draws inside its clusters); with ``smoothing > 0`` that importance is a graph-neighbourhood
            mean, so the graph still shapes the draw. ``"facility_location"`` maximises the objective above by
            lazy greedy, which spreads the picks by coverage and costs most of a later refresh. In the ablation
            (``README.md``; 4 regimes, 30% budget) sampling had the better mean and worst case against random
            and cost a third to a half of the greedy's selection time; the greedy was 0.5 points better under
            30% label noise on Fashion-MNIST, the one regime of those four where it won, and in the suite 1.7
            points better fine-tuning MiniLM on 2,000 tweets, at equal budget; at equal wall clock it was not
            ahead of random there once random also ran at a larger budget. Choose it on an encoder's embeddings
            where examples, not seconds, are scarce.
        outlier_damping: exponent ``γ`` of a factor ``min(1, m_i / g_i)^γ`` on each example's selection weight
            (``g_i``: its last measured importance; ``m_i``: its graph neighbours' edge-weighted mean of the same):
            an example whose importance stands far above its neighbourhood's (a mislabeled example among
            neighbours of its true class, which the model fits) is drawn less. Not in the paper: a neighbourhood
            form of the small-loss rule for noisy labels. In the ablation (``README.md``, 30% of the labels
            flipped) ``3`` halved the noisy share on Fashion-MNIST and gained 0.4-0.6 points, but cost 0.8-1.0
            on clean data: pass it when the labels are known to be noisy. ``0`` (the default) turns it off.
        contradiction_weight: the draw weight, in ``[0, 1]``, of an example the model *contradicts*: its last measured
            error norm ``‖softmax(z) − onehot(y)‖`` (EL2N) exceeds 1, which takes the model putting most of its mass
            on one other class than the label (``p_y`` below about 0.3). Under label noise that is a flipped label
            the model has not memorised; on clean data a hard or ambiguous example. ``1`` (the default) draws it as
            any other; ``0.1`` draws it a tenth as often. Not in the paper: a per-example small-loss rule with a
            threshold that needs no noise rate. Reads ``error_norm``, which the automatic captures provide. Measured
            on classification; for a causal LM (a mean of per-token error norms) the threshold is untested.
        outvoted_weight: the draw weight, in ``[0, 1]``, of an example whose label its graph neighbours *outvote*:
            some other class gets more edge weight among its neighbours of known label than its own. Under label
            noise that is a flipped label among examples of its true class; on clean data an example on a class
            boundary, or wherever the embeddings do not separate the classes. ``1`` (the default) draws it as any
            other; ``0.1`` a tenth as often. Not in the paper: the k-NN label filter for noisy labels (Bahri et al.,
            "Deep k-NN for Noisy Labels", ICML 2020) as a draw weight, which needs no noise rate and, unlike
            ``contradiction_weight``, no measurement of the example itself, only its neighbours' labels. Reads
            ``label``, which the automatic captures of a classifier provide; an example or neighbour whose label
            was never measured does not vote. Offline on Fashion-MNIST with 30% of the labels flipped, in the
            pixels' principal components alone, 98% of the flipped examples and 13% of the clean ones were
            outvoted (12% of a clean pool). In the ablation (``README.md``, fifteenth round; 0.1) it beat
            ``contradiction_weight=0.1`` on noisy tweets at 10% by 0.9 points, lost to it by 0.6 on noisy
            Fashion-MNIST at 30-50% (the clean examples it holds back are the class boundaries), and cost 0.8-2.1
            points on clean data: an option, off by default.
        score_unmeasured: whether the first informed refresh runs a scoring pass over every example not yet measured
            (``True``, the default). ``False`` needs fixed embeddings (``CoresetCallback(embeddings=...)``; on the
            model's own the graph needs the pass, and it is an error): the graph is built on them and an example
            never measured takes the edge-weighted mean importance of its measured graph neighbours (up to three
            hops out; beyond, the measured mean) until training or a priority anchor measures it. On the LM mixture
            with MiniLM's embeddings (``README.md``) that cut GRACE's selection from 53% / 23% of training to
            7% / 3% (10% / 30% budgets) at a perplexity 0.17 / 0.27 lower; on tweets, whose model's forward pass is
            cheap, it saved a tenth of the selection and moved accuracy by -0.16 to +0.09 points (-0.09 at 30% on
            long training, consistently over 3 seeds), so it is not the default.

    Example::

        CoresetCallback(sampler, strategy="grace", strategy_kwargs={"anchor_share": 0.1, "k": 10})
    """

    needs = frozenset({"loss", "grad_norm", "embedding"})
    overlap_by_default = True

    def __init__(
        self,
        k: int = 10,
        importance: str = "grad_norm",
        anchor_share: Optional[float] = None,
        anchor_fraction: Optional[float] = None,
        staleness_weight: float = 1.0,
        disagreement_weight: float = 1.0,
        propagation: str = "exact",
        repair_share: float = 0.0,
        drift_threshold: Optional[float] = None,
        lam: float = 1.0,
        weighting: str = "none",
        graph_method: str = "auto",
        exact_threshold: int = 20_000,
        graph_device: str = "auto",
        gpu_exact_threshold: int = 500_000,
        ivf_lists: Optional[int] = None,
        ivf_probes: int = 8,
        hnsw_m: int = 32,
        ef_construction: int = 20,
        ef_search: int = 24,
        graph_dim: Optional[int] = 32,
        smoothing: float = 1.0,
        smoothing_statistic: str = "mean",
        selector: str = "sample",
        outlier_damping: float = 0.0,
        contradiction_weight: float = 1.0,
        score_unmeasured: bool = True,
        outvoted_weight: float = 1.0,
    ) -> None:
        positive_int("grace", "k", k, hint=" (e.g. 10)")
        if importance not in ("grad_norm", "loss"):
            raise ValueError(f"grace: `importance` must be 'grad_norm' or 'loss', got {importance!r}.")
        if anchor_share is not None and anchor_fraction is not None:
            raise ValueError(
                "grace: pass `anchor_share` (a share of the budget) or `anchor_fraction` (a share of the pool), not both."
            )
        if anchor_share is not None:
            non_negative_float("grace", "anchor_share", anchor_share)
        if anchor_fraction is not None:
            unit_interval("grace", "anchor_fraction", anchor_fraction, hint=" (e.g. 0.05) or None for anchor_share")
        if propagation not in ("exact", "paper_eq21"):
            raise ValueError(f"grace: `propagation` must be 'exact' or 'paper_eq21', got {propagation!r}.")
        if weighting not in ("coverage", "none"):
            raise ValueError(f"grace: `weighting` must be 'coverage' or 'none', got {weighting!r}.")
        if smoothing_statistic not in ("mean", "median"):
            raise ValueError(f"grace: `smoothing_statistic` must be 'mean' or 'median', got {smoothing_statistic!r}.")
        if selector not in ("facility_location", "sample"):
            raise ValueError(f"grace: `selector` must be 'facility_location' or 'sample', got {selector!r}.")
        if graph_method not in ("auto", "flat", "ivf", "hnsw"):
            raise ValueError(f"grace: `graph_method` must be 'auto', 'flat', 'ivf' or 'hnsw', got {graph_method!r}.")
        if graph_device != "auto":
            try:
                resolve_device(graph_device)
            except ValueError as error:
                raise ValueError(f"grace: `graph_device`: {error} (or 'auto').") from None
        positive_int("grace", "gpu_exact_threshold", gpu_exact_threshold, hint=" (e.g. 500000)")
        if ivf_lists is not None:
            positive_int("grace", "ivf_lists", ivf_lists, hint=" (e.g. 256) or None for sqrt(N)")
        positive_int("grace", "ivf_probes", ivf_probes, hint=" (e.g. 8, faiss's nprobe)")
        positive_int("grace", "hnsw_m", hnsw_m, hint=" (e.g. 32, faiss's M)")
        positive_int("grace", "ef_construction", ef_construction, hint=" (e.g. 20, faiss's efConstruction)")
        positive_int("grace", "ef_search", ef_search, hint=" (e.g. 24, faiss's efSearch)")
        if graph_dim is not None:
            positive_int("grace", "graph_dim", graph_dim, hint=" (e.g. 32) or None")
        unit_interval("grace", "repair_share", repair_share, hint=" (e.g. 0.1; 0 keeps the graph as built)")
        if drift_threshold is not None:
            non_negative_float("grace", "drift_threshold", drift_threshold)
        non_negative_float("grace", "lam", lam)
        unit_interval("grace", "smoothing", smoothing, hint=" (e.g. 0.5; 0 selects on each example's own importance)")
        non_negative_float("grace", "outlier_damping", outlier_damping)
        unit_interval("grace", "contradiction_weight", contradiction_weight, hint=" (e.g. 0.1; 1 turns it off)")
        unit_interval("grace", "outvoted_weight", outvoted_weight, hint=" (e.g. 0.1; 1 turns it off)")
        if not isinstance(score_unmeasured, bool):
            raise ValueError(f"grace: `score_unmeasured` must be True or False, got {score_unmeasured!r}.")
        non_negative_float("grace", "staleness_weight", staleness_weight)
        non_negative_float("grace", "disagreement_weight", disagreement_weight)
        self.k = k
        self.importance = importance
        self.anchor_share = _ANCHOR_SHARE if anchor_share is None and anchor_fraction is None else anchor_share
        self.anchor_fraction = anchor_fraction
        self.staleness_weight = staleness_weight
        self.disagreement_weight = disagreement_weight
        self.propagation = propagation
        self.repair_share = repair_share
        self.drift_threshold = drift_threshold
        self.lam = lam
        self.weighting = weighting
        self.graph_method = graph_method
        self.exact_threshold = exact_threshold
        self.graph_device = graph_device
        self.gpu_exact_threshold = gpu_exact_threshold
        self.ivf_lists = ivf_lists
        self.ivf_probes = ivf_probes
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.graph_dim = graph_dim
        self.smoothing = smoothing
        self.smoothing_statistic = smoothing_statistic
        self.selector = selector
        self.outlier_damping = outlier_damping
        self.contradiction_weight = contradiction_weight
        self.score_unmeasured = score_unmeasured
        self.outvoted_weight = outvoted_weight
        # An instance's needs: only these options read the error norm and the label.
        self.needs = Grace.needs | ({"error_norm"} if contradiction_weight < 1 else set()) | (
            {"label"} if outvoted_weight < 1 else set()
        )

    def __repr__(self) -> str:
        return (
            f"Grace(k={self.k}, importance={self.importance!r}, {self._anchors_repr()}, "
            f"selector={self.selector!r})"
        )

    def create_state(self, pool_size: int) -> GraceState:
        return GraceState(pool_size)

    def check_embedding_source(self, fixed: bool) -> None:
        if not self.score_unmeasured and not fixed:
            raise ValueError(
                "grace: score_unmeasured=False leaves the first informed refresh without embeddings for the examples "
                "not yet trained on, and the graph needs one per example: pass the pool's embeddings from an encoder "
                "(CoresetCallback(embeddings=...)) or keep score_unmeasured=True."
            )

    def _scores_unmeasured(self, store: SignalStore) -> bool:
        """Whether the first informed refresh measures every example: always on the model's own embeddings."""
        return self.score_unmeasured or "embedding" not in store.fixed

    # ------------------------------------------------------------------ what to measure
    def to_score(self, inputs: SelectionInput) -> Optional[Tensor]:
        store, state = inputs.store, inputs.state
        if self._scores_unmeasured(store):
            unmeasured = (~store.measured).nonzero().squeeze(1)
            if state.graph is None or unmeasured.numel() > 0:
                return unmeasured if unmeasured.numel() else None
        elif state.graph is None:
            return None  # the graph is built on the fixed embeddings; the unmeasured take their neighbours' importance
        count = int(round(self._anchor_count(inputs) * inputs.fidelity))
        if count == 0:
            return None
        priority = self._priority(inputs)
        priority[store.last_step.numpy() != state.seen_step] = -np.inf  # measured for free since the last refresh
        chosen = top_k_random_ties(priority, count, inputs.generator)
        return torch.from_numpy(np.sort(chosen[np.isfinite(priority[chosen])]))

    def _anchor_count(self, inputs: SelectionInput) -> float:
        """Priority anchors a refresh asks for, before the overhead budget's ``fidelity``."""
        if self.anchor_fraction is not None:
            return self.anchor_fraction * inputs.pool_size
        return self.anchor_share * min(inputs.budget, inputs.pool_size)

    def _anchors_repr(self) -> str:
        if self.anchor_fraction is not None:
            return f"anchor_fraction={self.anchor_fraction}"
        return f"anchor_share={self.anchor_share}"

    def _priority(self, inputs: SelectionInput) -> np.ndarray:
        state, store = inputs.state, inputs.store
        staleness = (inputs.now_batch - store.last_step.numpy()).astype(np.float32)
        period = max(inputs.now_batch - state.last_now, 1)
        g = state.importance
        disagreement = np.abs(g - state.edges()[1].mean(g))
        scale = float(g.mean()) or 1.0
        return self.staleness_weight * staleness / period + self.disagreement_weight * disagreement / scale

    # ------------------------------------------------------------------ selection
    def _measured_importance(self, inputs: SelectionInput) -> np.ndarray:
        values = inputs.store.grad_norm if self.importance == "grad_norm" else inputs.store.loss
        return values.numpy().astype(np.float32, copy=True)

    def _graph_device(self) -> str:
        """The graph's search device for a build now (``"auto"``: the current GPU once CUDA is in use here)."""
        if self.graph_device != "auto":
            return resolve_device(self.graph_device)
        return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"

    def _build_graph(self, vectors: np.ndarray) -> KnnGraph:
        """The k-NN graph of ``vectors`` on :meth:`_graph_device`; with ``graph_device="auto"``, on the CPU (and a
        warning) when the GPU has not the memory for it, as a model that fills the GPU can leave it."""

        def build(device: str) -> KnnGraph:
            return KnnGraph.build(
                vectors,
                k=self.k,
                method=self.graph_method,
                exact_threshold=self.exact_threshold if device == "cpu" else self.gpu_exact_threshold,
                device=device,
                ivf_lists=self.ivf_lists,
                ivf_probes=self.ivf_probes,
                hnsw_m=self.hnsw_m,
                ef_construction=self.ef_construction,
                ef_search=self.ef_search,
            )

        device = self._graph_device()
        try:
            return build(device)
        except torch.cuda.OutOfMemoryError as error:  # only a GPU build raises it
            if self.graph_device != "auto":
                raise RuntimeError(
                    f"grace: the k-NN graph of {len(vectors)} examples did not fit in the free memory of "
                    f"graph_device={self.graph_device!r} ({error}); pass graph_device='cpu' (faiss) or 'auto' (the "
                    "GPU where it fits, else the CPU)."
                ) from error
        warnings.warn(
            f"grace: the k-NN graph of {len(vectors)} examples did not fit in the GPU's free memory; it is built on "
            "the CPU with faiss instead (graph_device='auto'). Pass graph_device='cpu' to build it there from the start.",
            stacklevel=2,
        )
        return build("cpu")

    def select(self, inputs: SelectionInput) -> Selection:
        store, state = inputs.store, inputs.state
        require_embeddings(store, "grace")
        diagnostics: dict[str, float] = {}
        began = time.perf_counter()
        if state.graph is None:
            state.projection = self._fit_projection(store.embedding.numpy())
            state.node_embedding = self._to_graph_space(store.embedding.numpy(), state).astype(np.float16)
            state.importance = self._measured_importance(inputs)
            diagnostics["propagation_seconds"] = 0.0
            graph_began = time.perf_counter()
            state.graph = self._build_graph(state.node_embedding.astype(np.float32))
            state.edges_changed()
            measured = store.measured.numpy()
            scored_all = self._scores_unmeasured(store)
            diagnostics.update(
                graph_seconds=time.perf_counter() - graph_began,
                anchors=float(inputs.pool_size if scored_all else measured.sum()),
                moved=0.0,
            )
            if not scored_all:  # fixed embeddings, no scoring pass: most of the pool unmeasured
                state.importance = fill_unknown(state.importance, measured, state.edges()[1])
        else:
            anchors = store.last_step.numpy() != state.seen_step
            diagnostics["anchors"] = float(anchors.sum())
            weights = state.edges()[0]
            measured = self._measured_importance(inputs)
            importance = state.importance.copy()
            importance[anchors] = measured[anchors]
            state.importance = propagate(importance, state.graph.neighbors, weights, anchors, mode=self.propagation)
            if "embedding" in store.fixed or not self._repairs:
                # The user's embeddings never move, or the graph stays as built: no drift to follow.
                diagnostics.update(propagation_seconds=time.perf_counter() - began, moved=0.0, graph_seconds=0.0)
            else:
                self._follow_drift(store, state, anchors, weights, began, diagnostics)
        state.seen_step = store.last_step.numpy().copy()
        state.last_now = inputs.now_batch

        select_began = time.perf_counter()
        weights, hood = state.edges()
        importance = state.importance
        if self.smoothing > 0:
            # A mislabeled example has a large gradient among easy neighbours of its true class; a hard region is
            # large throughout. Mixing in the neighbourhood's mean keeps the second and damps the first.
            around = hood.mean(importance) if self.smoothing_statistic == "mean" else hood.median(importance)
            importance = (1 - self.smoothing) * importance + self.smoothing * around
        scaled = self._scaled(importance)
        if self.outlier_damping > 0:
            scaled = scaled * self._outlier_factor(inputs, hood)
        if self.contradiction_weight < 1:
            scaled = scaled * self._contradiction_factor(inputs)
        if self.outvoted_weight < 1:
            outvoted = state.outvoted(self._labels(inputs))
            diagnostics["outvoted"] = float(outvoted.mean())
            scaled = scaled * np.where(outvoted, self.outvoted_weight, 1.0)
        if self.selector == "sample":
            # A floor keeps every example drawable, so the budget is always filled.
            picked = np.sort(gumbel_top_k(np.maximum(scaled, 1e-3), inputs.budget, inputs.generator))
            coverage = coverage_weights(picked, state.graph.neighbors, weights) if self.weighting == "coverage" else None
        else:
            result = select_facility_location(state.graph.neighbors, weights, scaled, inputs.budget, lam=self.lam)
            picked, coverage = result.selected, result.weights
            diagnostics["uncovered"] = float(result.uncovered)
        diagnostics["selection_seconds"] = time.perf_counter() - select_began
        indices = torch.from_numpy(picked.astype(np.int64))
        training_weights = torch.from_numpy(coverage.astype(np.float32)) if self.weighting == "coverage" else None
        return Selection(indices, training_weights, diagnostics)

    def _outlier_factor(self, inputs: SelectionInput, hood: Neighbourhood) -> np.ndarray:
        """``min(1, m_i / g_i)^outlier_damping``: ``g_i`` the example's last *measured* importance, ``m_i`` its
        neighbours' (edge-weighted). Measured, not propagated: propagation pulls an unmeasured example's value
        to its neighbourhood's within a refresh, which would hide the outlier."""
        own = self._measured_importance(inputs)
        around = hood.mean(own)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(own > around, around / own, 1.0)
        return np.power(np.clip(ratio, 0.0, 1.0), self.outlier_damping)

    @staticmethod
    def _measured_signal(inputs: SelectionInput, name: str, option: str, reads: str, returns: str) -> np.ndarray:
        """The store's ``name`` array, or the error that ``option`` needs it and how a module provides it."""
        column = getattr(inputs.store, name)
        if column is None:
            raise ValueError(
                f"grace: {option} < 1 {reads}, and none was measured; the automatic signal captures provide it, a "
                f"custom `coreset_signals` must return ExampleSignals(..., {returns})."
            )
        return column.numpy()

    def _labels(self, inputs: SelectionInput) -> np.ndarray:
        """Each example's last measured class label, ``-1`` (the store's fill) where none was measured."""
        return self._measured_signal(
            inputs, "label", "outvoted_weight", "compares each example's label with its graph neighbours'", "label=targets"
        )

    def _contradiction_factor(self, inputs: SelectionInput) -> np.ndarray:
        """``contradiction_weight`` where the last measured error norm exceeds 1, else 1 (unmeasured: 1)."""
        errors = self._measured_signal(
            inputs, "error_norm", "contradiction_weight", "reads each example's error norm", "error_norm=..."
        )
        with np.errstate(invalid="ignore"):
            return np.where(errors > 1.0, self.contradiction_weight, 1.0)

    def _fit_projection(self, embeddings: np.ndarray) -> Optional[np.ndarray]:
        """The top ``graph_dim`` right singular vectors of (a fixed sample of) the measured embeddings."""
        d = embeddings.shape[1]
        if self.graph_dim is None or self.graph_dim >= d:
            return None
        rows = np.random.default_rng(0).permutation(embeddings.shape[0])[:4096]  # fixed: no draw on the run's RNG
        # Uncentered: the best rank-r approximation of the vectors themselves preserves their inner products best.
        sample = embeddings[np.sort(rows)].astype(np.float64)
        _, _, vt = np.linalg.svd(sample, full_matrices=False)
        return np.ascontiguousarray(vt[: self.graph_dim].T, dtype=np.float32)

    @staticmethod
    def _to_graph_space(embeddings: np.ndarray, state: GraceState) -> np.ndarray:
        """Unit float32 rows in the graph's space (projected by ``state.projection`` when there is one)."""
        x = embeddings.astype(np.float32)
        if state.projection is not None:
            x = x @ state.projection
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _follow_drift(
        self, store: SignalStore, state: GraceState, anchors: np.ndarray, weights: np.ndarray, began: float,
        diagnostics: dict[str, float],
    ) -> None:
        """Move the graph's nodes with the anchors' new embeddings (propagated drift) and repair what moved most."""
        # propagate_drift makes the one fp32 copy of the fp16 node embeddings; at 1M x 128 each (N, d) fp32
        # array is 512 MB, so no other is kept alive beside it and the drift.
        fresh = self._to_graph_space(store.embedding.numpy()[anchors], state)
        drift = np.zeros(state.node_embedding.shape, dtype=np.float32)
        drift[anchors] = fresh - state.node_embedding[anchors].astype(np.float32)
        moved = self._moved(anchors, drift)
        nodes = propagate_drift(state.node_embedding, drift, state.graph.neighbors, weights, anchors, mode=self.propagation)
        del drift
        nodes[anchors] = fresh
        diagnostics["propagation_seconds"] = time.perf_counter() - began
        diagnostics["moved"] = float(moved.size)
        graph_began = time.perf_counter()
        state.node_embedding = nodes.astype(np.float16)
        state.graph.update(nodes, moved)
        state.edges_changed()
        diagnostics["graph_seconds"] = time.perf_counter() - graph_began

    @property
    def _repairs(self) -> bool:
        return self.drift_threshold is not None or self.repair_share > 0

    def _moved(self, anchors: np.ndarray, drift: np.ndarray) -> np.ndarray:
        ids = anchors.nonzero()[0]
        if ids.size == 0:
            return ids.astype(np.int64)
        norms = np.linalg.norm(drift[ids], axis=1)
        if self.drift_threshold is not None:
            threshold = self.drift_threshold
        else:
            threshold = float(np.quantile(norms, 1.0 - self.repair_share))
        return ids[norms > threshold].astype(np.int64)

    @staticmethod
    def _scaled(importance: np.ndarray) -> np.ndarray:
        """Importance in [0, 1], scaled by its 99th percentile so one outlier cannot flatten the rest."""
        top = float(np.quantile(importance, 0.99)) if importance.size else 0.0
        if top <= 0:
            return np.ones_like(importance, dtype=np.float64)
        return np.clip(importance / top, 0.0, 1.0).astype(np.float64)
