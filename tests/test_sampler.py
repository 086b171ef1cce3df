"""CoresetSampler on its own, without Lightning: the training loop is simulated with ``bind`` + ``LoaderPosition``."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch

from grace_lightning import CoresetSampler
from grace_lightning.sampler import LoaderPosition


class Pool:
    """A sized stand-in for a dataset: the sampler only needs ``len``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:  # pragma: no cover - never read by the sampler
        raise AssertionError("the sampler must not read examples")


def at(sampler: CoresetSampler, batches_done: int, batch_size: int, drop_last: bool = False, rank: int = 0, world: int = 1):
    """Bind the sampler as if the loop had trained ``batches_done`` batches; return the stream it yields now."""
    sampler.bind(rank, world, lambda: LoaderPosition(batches_done, batch_size, drop_last))
    return list(sampler)


def epoch_stream(sampler: CoresetSampler, epoch: int, batch_size: int, drop_last: bool = False, rank: int = 0, world: int = 1):
    sampler.bind(rank, world)  # resets num_samples before batches_per_epoch is read
    nb = sampler.batches_per_epoch(batch_size, drop_last)
    return at(sampler, epoch * nb, batch_size, drop_last, rank, world)


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------- epoch length


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("selection_size", [5, 20, 37, None])  # smaller, equal, larger than the budget; whole pool
def test_epoch_length_is_ceil_budget_over_world_whatever_the_selection_size(world, selection_size):
    sampler = CoresetSampler(Pool(50), size=20, seed=1)
    if selection_size is not None:
        sampler.set_selection(torch.arange(selection_size) * 50 // selection_size)
    expected = math.ceil(20 / world)
    for rank in range(world):
        sampler.bind(rank, world)
        assert len(sampler) == expected
        for epoch in range(3):
            assert len(epoch_stream(sampler, epoch, 4, rank=rank, world=world)) == expected


# ---------------------------------------------------------------------- rank shards


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_equal_and_cover_the_selection_when_budget_divisible(world):
    budget = 12
    selection = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:budget]
    for epoch in range(2):
        shards = []
        for rank in range(world):
            sampler = CoresetSampler(Pool(40), size=budget, seed=5)
            sampler.set_selection(selection)
            shards.append(epoch_stream(sampler, epoch, 2, rank=rank, world=world))
            assert sampler.padding == 0
        assert {len(s) for s in shards} == {budget // world}
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)), "shards overlap"
        assert set(flat) == set(selection.tolist())


@pytest.mark.parametrize("world,budget", [(2, 13), (3, 13), (3, 14)])
def test_padding_is_reported_and_union_is_the_selection_when_budget_not_divisible(world, budget):
    selection = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:budget]
    shards = []
    for rank in range(world):
        sampler = CoresetSampler(Pool(40), size=budget, seed=5)
        sampler.set_selection(selection)
        sampler.bind(rank, world)
        assert sampler.padding == world * math.ceil(budget / world) - budget > 0
        shards.append(epoch_stream(sampler, 0, 3, rank=rank, world=world))
    assert {len(s) for s in shards} == {math.ceil(budget / world)}
    flat = [i for s in shards for i in s]
    assert set(flat) == set(selection.tolist())
    assert len(flat) - len(set(flat)) == sampler.padding  # only the padding repeats


# ---------------------------------------------------------------------- streaming and wrapping


@pytest.mark.parametrize("world", [1, 2])
def test_whole_pool_streams_every_index_once_over_pool_over_budget_epochs(world):
    pool = 64
    visited = []
    for rank in range(world):
        sampler = CoresetSampler(Pool(pool), size=pool // 4, seed=3)
        sampler.set_selection(None)
        sampler.bind(rank, world)
        nb = sampler.batches_per_epoch(4)
        for epoch in range(4):
            visited += at(sampler, epoch * nb, 4, rank=rank, world=world)
    assert sorted(visited) == list(range(pool))


def test_streaming_epochs_differ_and_the_next_pass_is_reshuffled():
    sampler = CoresetSampler(Pool(32), size=8, seed=3)
    epochs = [epoch_stream(sampler, e, 4) for e in range(8)]
    first_pass, second_pass = sum(epochs[:4], []), sum(epochs[4:], [])
    assert sorted(first_pass) == sorted(second_pass) == list(range(32))
    assert first_pass != second_pass


def test_selection_smaller_than_budget_wraps_and_every_selected_index_appears():
    sampler = CoresetSampler(Pool(100), size=16, seed=0)
    selection = [3, 17, 42, 77, 99]
    sampler.set_selection(torch.tensor(selection))
    stream = epoch_stream(sampler, 0, 4)
    assert len(stream) == 16
    counts = Counter(stream)
    assert set(counts) == set(selection)
    assert max(counts.values()) - min(counts.values()) <= 1  # wrapping is whole passes, not a biased repeat


# ---------------------------------------------------------------------- order


def test_same_seed_and_selection_give_the_same_stream():
    a, b = CoresetSampler(Pool(200), size=40, seed=11), CoresetSampler(Pool(200), size=40, seed=11)
    sel = torch.arange(0, 200, 3)
    a.set_selection(sel)
    b.set_selection(sel.clone())
    assert [epoch_stream(a, e, 8) for e in range(3)] == [epoch_stream(b, e, 8) for e in range(3)]


def test_different_seed_gives_a_different_order():
    a, b = CoresetSampler(Pool(200), size=40, seed=11), CoresetSampler(Pool(200), size=40, seed=12)
    sel = torch.arange(0, 200, 5)  # exactly the budget: same set, so only the order can differ
    a.set_selection(sel)
    b.set_selection(sel)
    sa, sb = epoch_stream(a, 0, 8), epoch_stream(b, 0, 8)
    assert sorted(sa) == sorted(sb)
    assert sa != sb


def test_consecutive_epochs_of_a_fixed_selection_are_reshuffled():
    sampler = CoresetSampler(Pool(200), size=40, seed=11)
    sampler.set_selection(torch.arange(40))
    assert epoch_stream(sampler, 0, 8) != epoch_stream(sampler, 1, 8)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_batch_indices_equal_the_slices_of_the_iterated_stream(drop_last, world, rank):
    sampler = CoresetSampler(Pool(60), size=46, seed=2)  # 23 per rank at world 2, 46 at world 1: ragged at bs=5
    weights = torch.linspace(0.1, 2.0, 30)
    selection = torch.arange(0, 60, 2)
    sampler.set_selection(selection, weights)
    weight_of = dict(zip(selection.tolist(), weights.tolist()))
    bs = 5
    sampler.bind(rank, world)
    nb = sampler.batches_per_epoch(bs, drop_last)
    assert nb == (len(sampler) // bs if drop_last else math.ceil(len(sampler) / bs))
    assert len(sampler) % bs != 0  # there is a ragged last batch
    for epoch in range(3):
        stream = at(sampler, epoch * nb, bs, drop_last, rank, world)
        assert len(stream) == len(sampler)
        for k in range(nb):
            idx, w = sampler.batch_indices(epoch * nb + k, bs, drop_last)
            assert idx.dtype == torch.int64 and w.dtype == torch.float32
            assert idx.tolist() == stream[k * bs : (k + 1) * bs]
            assert w.tolist() == [weight_of[i] for i in idx.tolist()]
        if not drop_last:
            assert idx.numel() == len(sampler) % bs  # the last batch is the ragged one


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("done_in_epoch", [0, 1, 3])
def test_mid_epoch_start_yields_exactly_the_suffix_after_the_batches_done(drop_last, done_in_epoch):
    bs = 4
    sampler = CoresetSampler(Pool(80), size=18, seed=9)
    sampler.set_selection(torch.arange(5, 75, 3))
    nb = sampler.batches_per_epoch(bs, drop_last)
    for epoch in range(2):
        full = epoch_stream(sampler, epoch, bs, drop_last)
        assert at(sampler, epoch * nb + done_in_epoch, bs, drop_last) == full[done_in_epoch * bs :]


def test_selection_set_mid_epoch_changes_only_the_batches_at_or_after_its_start():
    bs = 4
    sampler = CoresetSampler(Pool(100), size=20, seed=4)
    old, new = torch.arange(0, 20), torch.arange(50, 70)
    sampler.set_selection(old)
    nb = sampler.batches_per_epoch(bs)
    epoch, k = 1, 2
    before = epoch_stream(sampler, epoch, bs)
    before_batches = [sampler.batch_indices(epoch * nb + j, bs)[0].tolist() for j in range(nb)]

    sampler.bind(0, 1, lambda: LoaderPosition(epoch * nb, bs, False))
    it = iter(sampler)
    head = [next(it) for _ in range(k * bs)]  # the loader has drawn k batches, one ahead of training
    sampler.set_selection(new, start_batch=epoch * nb + k, now_batch=epoch * nb + k - 1)
    tail = list(it)  # the same, already created iterator

    assert head == before[: k * bs]
    assert len(head) + len(tail) == len(sampler)
    assert set(tail) <= set(new.tolist()) and len(set(tail)) == len(tail)
    after_batches = [sampler.batch_indices(epoch * nb + j, bs)[0].tolist() for j in range(nb)]
    assert after_batches[:k] == before_batches[:k]
    assert sum(after_batches[k:], []) == tail
    assert all(set(b) <= set(new.tolist()) for b in after_batches[k:])
    # the batch just before the new start keeps the old selection
    assert sampler.batch_indices(epoch * nb + k - 1, bs)[0].tolist() == before_batches[k - 1]


# ---------------------------------------------------------------------- set_selection validation


@pytest.mark.parametrize(
    "indices,weights,error,match",
    [
        (torch.tensor([1.0, 2.0]), None, TypeError, "integers"),
        (torch.tensor([0, 10]), None, ValueError, r"\[0, 10\)"),
        (torch.tensor([-1, 3]), None, ValueError, r"\[0, 10\)"),
        (torch.tensor([], dtype=torch.int64), None, ValueError, "empty"),
        (torch.tensor([1, 2, 3]), torch.ones(2), ValueError, "2 weights for 3"),
        (None, torch.ones(3), ValueError, "3 weights for 10"),
        (torch.tensor([1, 2]), torch.tensor([1.0, -0.5]), ValueError, "non-negative"),
        (torch.tensor([1, 2]), torch.tensor([1.0, float("nan")]), ValueError, "finite"),
        (torch.tensor([1, 2]), torch.tensor([float("inf"), 1.0]), ValueError, "finite"),
    ],
    ids=["float", "too-large", "negative", "empty", "weight-count", "weight-count-pool", "neg-weight", "nan-weight", "inf-weight"],
)
def test_set_selection_rejects_bad_selections(indices, weights, error, match):
    sampler = CoresetSampler(Pool(10), size=4)
    sampler.set_selection(torch.tensor([1, 2, 3]))
    before = epoch_stream(sampler, 0, 2)
    with pytest.raises(error, match=match):
        sampler.set_selection(indices, weights)
    assert sampler.selection.tolist() == [1, 2, 3]  # a rejected selection changes nothing
    assert epoch_stream(sampler, 0, 2) == before


def test_set_selection_rejects_negative_start_batch():
    sampler = CoresetSampler(Pool(10), size=4)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_selection(torch.tensor([1]), start_batch=-1)


# ---------------------------------------------------------------------- checkpoint state


def test_state_dict_round_trip_under_weights_only_reproduces_the_stream():
    bs = 3
    src = CoresetSampler(Pool(90), size=20, seed=7)
    nb = src.batches_per_epoch(bs)
    src.set_selection(torch.arange(0, 90, 4), torch.rand(23, generator=torch.Generator().manual_seed(0)))
    src.set_selection(torch.arange(1, 60, 2), start_batch=nb + 2, now_batch=nb)
    src.set_selection(None, start_batch=3 * nb, now_batch=nb + 1)
    expected = [epoch_stream(src, e, bs) for e in range(1, 5)]
    expected_batches = [src.batch_indices(b, bs) for b in range(nb, 5 * nb)]

    state = save_load(src.state_dict())
    dst = CoresetSampler(Pool(90), size=20, seed=7)
    dst.load_state_dict(state)
    assert dst.version_starts == src.version_starts
    assert [epoch_stream(dst, e, bs) for e in range(1, 5)] == expected
    for (i1, w1), (i2, w2) in zip(expected_batches, (dst.batch_indices(b, bs) for b in range(nb, 5 * nb))):
        assert torch.equal(i1, i2) and torch.equal(w1, w2)
    assert at(dst, nb + 3, bs) == expected[0][3 * bs :]  # resume mid-epoch after the load


@pytest.mark.parametrize(
    "kwargs,pool,match",
    [
        (dict(size=21, seed=7), 90, "budget=20.*budget=21"),
        (dict(size=20, seed=7), 91, "pool_size=90.*pool_size=91"),
        (dict(size=20, seed=8), 90, "seed=7.*seed=8"),
    ],
    ids=["budget", "pool", "seed"],
)
def test_load_state_dict_refuses_a_different_budget_pool_or_seed(kwargs, pool, match):
    src = CoresetSampler(Pool(90), size=20, seed=7)
    src.set_selection(torch.arange(30))
    state = save_load(src.state_dict())
    dst = CoresetSampler(Pool(pool), **kwargs)
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(state)


# ---------------------------------------------------------------------- large indices


def test_indices_beyond_2_pow_24_are_exact_through_iteration_batches_and_checkpoints():
    big = [2**24 + 1, 2**25 + 7, 3, 2**25 + 9]
    assert float(torch.tensor(2**24 + 1, dtype=torch.float32)) != 2**24 + 1  # the premise: float32 would round
    sampler = CoresetSampler(Pool(2**25 + 10), size=4, seed=0)
    sampler.set_selection(torch.tensor(big))
    assert sampler.selection.dtype == torch.int64

    stream = epoch_stream(sampler, 0, 2) + epoch_stream(sampler, 1, 2)
    assert sorted(stream[:4]) == sorted(big) and sorted(stream[4:]) == sorted(big)
    batches = [sampler.batch_indices(b, 2)[0] for b in range(4)]
    assert all(b.dtype == torch.int64 for b in batches)
    assert sum((b.tolist() for b in batches), []) == stream

    state = save_load(sampler.state_dict())
    saved = state["versions"][-1]["indices"]
    assert saved.dtype == torch.int64 and saved.tolist() == big
    restored = CoresetSampler(Pool(2**25 + 10), size=4, seed=0)
    restored.load_state_dict(state)
    assert restored.selection.tolist() == big
    assert epoch_stream(restored, 0, 2) + epoch_stream(restored, 1, 2) == stream
    assert 2**24 + 1 in restored.batch_indices(0, 2)[0].tolist() + restored.batch_indices(1, 2)[0].tolist()
