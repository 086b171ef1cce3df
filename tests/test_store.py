"""SignalStore: fp16 unit embeddings, fixed projection, memmap mode, exact checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grace_lightning import ExampleSignals, SignalStore


def _signals(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ExampleSignals(loss=torch.rand(n, generator=g), grad_norm=torch.rand(n, generator=g),
                          embedding=torch.randn(n, dim, generator=g), length=torch.randint(1, 9, (n,), generator=g),
                          error_norm=torch.rand(n, generator=g))


def test_embeddings_are_stored_as_fp16_unit_rows_and_memory_stays_near_the_budget():
    store = SignalStore(1000, max_embedding_dim=None)
    store.update(torch.arange(1000), _signals(1000, 32), step=3)
    assert store.embedding.dtype == torch.float16
    assert torch.allclose(store.embedding.float().norm(dim=1), torch.ones(1000), atol=1e-3)
    arrays = [store.loss, store.grad_norm, store.length, store.last_step, store.embedding, store.error_norm]
    assert sum(a.numel() * a.element_size() for a in arrays) == 1000 * (2 * 32 + 20)


def test_wide_embeddings_are_projected_by_a_fixed_seeded_matrix_that_keeps_cosines():
    a, b = SignalStore(200, max_embedding_dim=64, seed=5), SignalStore(200, max_embedding_dim=64, seed=5)
    s = _signals(200, 512)
    a.update(torch.arange(200), s, step=0)
    b.update(torch.arange(100, 200), ExampleSignals(s.loss[100:], s.grad_norm[100:], s.embedding[100:]), step=0)
    assert a.embedding.shape == (200, 64)
    assert torch.equal(a.embedding[100:], b.embedding[100:])  # same seed, same projection, whatever the batch
    unit = torch.nn.functional.normalize(s.embedding, dim=1)
    original = unit @ unit.T
    projected = a.embedding.float() @ a.embedding.float().T
    assert float((original - projected).abs().mean()) < 0.12  # Johnson-Lindenstrauss at 64 dims
    near = ExampleSignals(torch.ones(2), torch.ones(2), torch.stack([s.embedding[0], s.embedding[0] + 0.05 * s.embedding[1]]))
    a.update(torch.tensor([0, 1]), near, step=1)
    assert float(a.embedding[0].float() @ a.embedding[1].float()) > 0.95  # near-duplicates stay neighbours


def test_memmap_mode_keeps_arrays_in_files_and_matches_ram_mode(tmp_path):
    ram, mapped = SignalStore(300, max_embedding_dim=None), SignalStore(300, max_embedding_dim=None, memmap_dir=tmp_path)
    for store in (ram, mapped):
        store.update(torch.arange(0, 300, 2), _signals(150, 16), step=7)
    assert (tmp_path / "embedding.npy").exists() and (tmp_path / "loss.npy").exists()
    on_disk = np.load(tmp_path / "loss.npy", mmap_mode="r")
    assert np.array_equal(on_disk, mapped.loss.numpy())
    for name in ("loss", "grad_norm", "length", "last_step", "embedding", "error_norm"):
        assert torch.equal(getattr(ram, name), getattr(mapped, name))


def test_checkpoint_round_trip_is_exact_under_weights_only_load(tmp_path):
    store = SignalStore(64, max_embedding_dim=8, seed=1)
    store.update(torch.arange(64), _signals(64, 20), step=2)
    store.update(torch.tensor([3, 4]), ExampleSignals(torch.tensor([float("nan"), 1.0]), torch.ones(2), torch.ones(2, 20)), step=5)
    before = store.error_norm[5].clone()
    bad_error = ExampleSignals(torch.ones(1), torch.ones(1), error_norm=torch.tensor([float("inf")]))
    assert store.update(torch.tensor([5]), bad_error, step=5) == 1  # a non-finite EL2N rejects the whole row
    assert store.error_norm[5] == before and store.last_step[5] == 2
    torch.save(store.state_dict(), tmp_path / "store.pt")
    restored = SignalStore(64, max_embedding_dim=8, seed=1, memmap_dir=tmp_path / "mm")
    restored.load_state_dict(torch.load(tmp_path / "store.pt", weights_only=True))
    for name in ("loss", "grad_norm", "length", "last_step", "embedding", "error_norm"):
        assert torch.equal(getattr(store, name), getattr(restored, name)), name
    assert restored.invalid_count == store.invalid_count == 2
    # The projection is rebuilt from the seed, so later updates project identically.
    more = _signals(4, 20, seed=9)
    store.update(torch.arange(4), more, step=6)
    restored.update(torch.arange(4), more, step=6)
    assert torch.equal(store.embedding, restored.embedding)


def test_error_norm_is_absent_until_measured_and_round_trips_as_absent(tmp_path):
    store = SignalStore(8)
    store.update(torch.arange(4), ExampleSignals(torch.rand(4), torch.rand(4)), step=0)  # a capture without EL2N
    assert store.error_norm is None
    torch.save(store.state_dict(), tmp_path / "store.pt")
    restored = SignalStore(8)
    restored.update(torch.arange(2), ExampleSignals(torch.ones(2), torch.ones(2), error_norm=torch.ones(2)), step=0)
    restored.load_state_dict(torch.load(tmp_path / "store.pt", weights_only=True))
    assert restored.error_norm is None  # the checkpoint's state wins, including "never measured"
    store.update(torch.tensor([6, 1]), ExampleSignals(torch.ones(2), torch.ones(2), error_norm=torch.tensor([0.5, 0.25])), step=1)
    assert store.error_norm.tolist() == [0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]


def test_a_store_keeping_some_signals_drops_the_others_on_arrival_and_their_bad_values_reject_nothing():
    store = SignalStore(6, signals={"error_norm"})
    signals = _signals(6, 4)
    signals.embedding[2, 0] = float("nan")  # not kept: it must not reject example 2
    assert store.update(torch.arange(6), signals, step=1) == 0
    assert store.embedding is None and store.label is None
    assert torch.equal(store.error_norm, signals.error_norm) and torch.equal(store.loss, signals.loss)
    assert store.keeping(signals).embedding is None and store.keeping(signals).error_norm is not None
    everything = SignalStore(6)
    assert everything.update(torch.arange(6), signals, step=1) == 1  # keeping all: the NaN row is rejected
    assert everything.keeping(signals) is signals


def test_a_store_refuses_an_unknown_signal_name_and_names_the_known_ones():
    with pytest.raises(ValueError, match=r"\['embeddings'\].*'embedding'"):
        SignalStore(4, signals={"loss", "embeddings"})
