"""Mixed precision and the GPU: the scoring pass in bf16, fits in bf16-mixed, and the CUDA paths of resume and overlap.

The CPU cases run everywhere (CPU autocast does bf16 too); the ``gpu`` cases run only where CUDA is visible, and
are what a device check runs (``benchmarks/gpu_check.sh``). CI has no GPU: there they are reported as skipped.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import DataLoader

from grace_lightning.signals.capture import SignalExtractor, inference_forward
from tests.harness import TopLoss, fit, load_records
from tests.test_overlap import PER_EPOCH, SpyTopLoss, _fit, _trained_per_epoch
from tests.toy import IndexedBlobs, TinyClassifier

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ACCELERATORS = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=CUDA)]
NEEDS_REFERENCE = {"group_mates", "gip"}


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator == "gpu" else "cpu")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_bf16_scoring_ranks_examples_like_fp32(accelerator):
    """Under bf16 autocast the scoring pass's signals stay float32 and rank the pool as the fp32 pass does."""
    device = _device(accelerator)
    data = IndexedBlobs(n=512, dim=32, classes=8, seed=3)
    model = TinyClassifier(dim=32, classes=8).to(device)
    batch = [t.to(device) for t in next(iter(DataLoader(data, batch_size=512)))]
    extractor = SignalExtractor.for_module(model, batch)
    with inference_forward(model):
        full = extractor.score_batch(batch)
    with inference_forward(model, lambda: torch.autocast(device.type, dtype=torch.bfloat16)):
        half = extractor.score_batch(batch)
    assert half.loss.dtype == torch.float32 and half.grad_norm.dtype == torch.float32
    assert not torch.equal(half.loss, full.loss)  # autocast did run the layers in bf16
    assert _spearman(half.loss.cpu(), full.loss.cpu()) > 0.99
    assert _spearman(half.grad_norm.cpu(), full.grad_norm.cpu()) > 0.99
    cosine = torch.nn.functional.cosine_similarity(half.embedding.float(), full.embedding.float(), dim=1)
    assert float(cosine.min()) > 0.99


@pytest.mark.parametrize("accelerator", ACCELERATORS)
@pytest.mark.parametrize("strategy", ["grace", "grip", "group_mates", "gip"])
def test_informed_strategies_train_and_select_in_bf16_mixed(tmp_path, accelerator, strategy):
    """A bf16-mixed fit scores, probes and selects: the store holds finite signals and the subset moves."""
    kwargs = {"reference": IndexedBlobs(n=32, seed=1)} if strategy in NEEDS_REFERENCE else {}
    fit(tmp_path, "bf16", strategy=strategy, max_epochs=4, accelerator=accelerator, precision="bf16-mixed", **kwargs)
    (record,) = load_records(tmp_path, "bf16", 1)
    assert record["store_measured"] == 256
    assert all(torch.isfinite(torch.tensor(record["store_loss"])))
    assert len({tuple(s) for s in record["selections"].values()}) >= 2, "the subset never changed"


@CUDA
@pytest.mark.parametrize("strategy", ["top_loss", "grace", "grip", "gip"])
def test_resume_is_bit_exact_on_the_gpu(tmp_path, strategy):
    """Resumed on the GPU, a run equals the uninterrupted one: the CUDA RNG stream (dropout) is restored too."""
    from tests.test_resume import _assert_resumed_equals_uninterrupted, _checkpoints

    kwargs = dict(schedule="step", strategy=TopLoss() if strategy == "top_loss" else strategy, accelerator="gpu")
    if strategy == "gip":
        kwargs["reference"] = IndexedBlobs(n=32, seed=1)
    fit(tmp_path, "full", save_checkpoints=True, **kwargs)
    for point, ckpt in _checkpoints(tmp_path, 1).items():
        fit(tmp_path, f"resumed_{point}", ckpt_path=ckpt, **kwargs)
        _assert_resumed_equals_uninterrupted(tmp_path, 1, point)


@CUDA
def test_overlap_on_the_gpu_hands_over_the_synchronous_selection():
    """With the model on the GPU the thread computes the subset a synchronous run computes, one refresh later."""
    sync_strategy, overlap_strategy = SpyTopLoss(), SpyTopLoss()
    overlap_strategy.overlap_by_default = True  # as grace, grip, group_mates and gip declare
    _, sync_model = _fit(sync_strategy, accelerator="gpu", overlap=False)
    callback, overlap_model = _fit(overlap_strategy, accelerator="gpu", overlap="auto")  # "auto": on, on a GPU
    assert callback.overlap is True
    assert sync_strategy.calls[0]["indices"] == overlap_strategy.calls[0]["indices"]
    first = sorted(sync_strategy.calls[0]["indices"])
    assert _trained_per_epoch(sync_model)[1] == first and _trained_per_epoch(overlap_model)[2] == first
    assert overlap_strategy.calls[0]["thread"] != threading.main_thread().name
    assert [c["step"] for c in overlap_strategy.calls] == [c["step"] for c in sync_strategy.calls]
    assert sync_strategy.calls[0]["step"] == PER_EPOCH


@CUDA
def test_grace_graph_on_the_gpu_equals_the_faiss_graph():
    """graph_device="cuda": exact search by matrix products on the GPU gives the faiss graph's rows and repairs."""
    import numpy as np

    from grace_lightning.knn import KnnGraph

    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    on_gpu, on_cpu = KnnGraph.build(x, k=10, method="flat", device="cuda"), KnnGraph.build(x, k=10, method="flat")
    assert on_gpu.device.startswith("cuda:") and type(on_gpu._index).__name__ == "TorchFlatIndex"
    assert (on_gpu.neighbors == on_cpu.neighbors).mean() > 0.999  # ties in the last bits may swap a pair
    moved = np.arange(0, 3000, 20)
    x[moved] += 0.5 * np.random.default_rng(1).standard_normal((moved.size, 32)).astype(np.float32)
    x[moved] /= np.linalg.norm(x[moved], axis=1, keepdims=True)
    on_gpu.update(x, moved)
    on_cpu.update(x, moved)
    assert (on_gpu.neighbors == on_cpu.neighbors).mean() > 0.999


@CUDA
def test_grace_with_its_graph_on_the_gpu_trains_and_resumes(tmp_path):
    """A fit whose GRACE graph lives on the GPU (overlap on: the thread builds it) selects, and resumes bit for bit."""
    from tests.test_resume import _assert_resumed_equals_uninterrupted, _checkpoints

    from grace_lightning import build_strategy

    kwargs = dict(schedule="step", accelerator="gpu", overlap=True)
    fit(tmp_path, "full", save_checkpoints=True, strategy=build_strategy("grace", graph_device="cuda"), **kwargs)
    for point, ckpt in _checkpoints(tmp_path, 1).items():
        fit(tmp_path, f"resumed_{point}", ckpt_path=ckpt, strategy=build_strategy("grace", graph_device="cuda"), **kwargs)
        _assert_resumed_equals_uninterrupted(tmp_path, 1, point)


@CUDA
def test_the_captures_device_time_is_recorded_on_the_gpu():
    """On a GPU each refresh after training records the capture's kernels' device time (CUDA events) beside its
    training-thread seconds, and the scoring pass's hint to raise `scoring_batch_size` is given once."""
    callback, _ = _fit(TopLoss(), accelerator="gpu", overlap=False)
    records = callback.history[1:]  # the first selection comes before any training batch
    assert records and all(r["capture_gpu_seconds"] > 0.0 and r["capture_seconds"] > 0.0 for r in records)
    assert callback._measure.batch_hint_given is True
