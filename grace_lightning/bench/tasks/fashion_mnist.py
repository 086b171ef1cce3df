"""Task ``fashion-mnist``: Fashion-MNIST image classification with a small CNN; metric: accuracy.

Data: Fashion-MNIST (Zalando Research, MIT licence), 60,000 training and 10,000 test images of 28x28
greyscale clothing in 10 balanced classes, read from the IDX files of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or from the directory named by the
environment variable ``GRACE_LIGHTNING_FASHION_MNIST`` (files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
gzipped or not, e.g. a torchvision ``FashionMNIST/raw`` folder). Nothing is downloaded.

Split: the training pool is a subset of the 60,000 training images (256 of which are held out as the
reference set of ``group_mates`` / ``gip``, so the full pool is 59,744) and the validation set a subset of the
10,000 test images, all drawn from a fixed data seed (never the run seed), so every run of a comparison
trains from the same pool and is evaluated on the same images.

Model: two stride-2 3x3 convolutions (no pooling, cheap on CPU), a hidden linear layer and a linear ``head``;
no dropout or BatchNorm, so training and scoring passes see the same function.

Option ``embedding`` (``model``, the default, or ``pixels``): with ``pixels`` the strategies that read embeddings
get fixed ones computed before training, the pool's flattened normalised pixels projected on their first
``PIXEL_DIMS`` principal components (faiss' ``PCAMatrix`` fitted on the pool, about a second; the reference set goes
through the same projection), instead of the CNN's hidden layer; training is unchanged. It stands for what a user
with inputs of meaningful geometry can hand ``CoresetCallback(embeddings=...)`` at no forward pass.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
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
    seeded_init,
    with_flipped_labels,
)

__all__ = ["ENV_VAR", "FashionCNN", "FashionMNISTTask", "NoisyFashionMNISTTask", "data_dir", "load_fashion_mnist"]

ENV_VAR = "GRACE_LIGHTNING_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
INSTALL_HINT = (
    "install the Debian package (as root): `apt-get update && apt-get install -y dataset-fashion-mnist`, "
    f"or set {ENV_VAR} to a directory holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"
)
NUM_CLASSES = 10
DATA_SEED = 20_240_501  # fixed: the pool and validation subsets never depend on the run seed
# Mean and standard deviation of the training pixels (in [0, 1]), the usual Fashion-MNIST constants.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
PIXEL_DIMS = 64  # principal components of the ``pixels`` embeddings: 88% of the pixels' variance on the full pool


def data_dir() -> Path:
    """Where the IDX files are read from: ``$GRACE_LIGHTNING_FASHION_MNIST`` if set, else the Debian path."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEBIAN_DIR


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise TaskUnavailable(f"fashion-mnist: {directory / stem}[.gz] not found; {INSTALL_HINT}.")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array: 2 zero bytes, a type byte (0x08 = uint8), the number of dims, big-endian int32 dims, data."""
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise TaskUnavailable(f"fashion-mnist: {path} is not a uint8 IDX file; {INSTALL_HINT}.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise TaskUnavailable(f"fashion-mnist: {path} is truncated ({data.size} values for dims {dims}).")
    return data.reshape(dims)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(directory: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: ``x`` float32 ``(N, 1, 28, 28)`` normalised, ``y`` int64 ``(N,)``.

    Parsed once per directory and process (about a second); callers index into the cached tensors.
    """
    d = Path(directory)
    arrays = {key: _read_idx(_find(d, stem)) for key, stem in _FILES.items()}

    def images(a: np.ndarray) -> Tensor:
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - PIXEL_MEAN) / PIXEL_STD

    out = (
        images(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        images(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    for x, y in (out[:2], out[2:]):
        if x.shape[1:] != (1, 28, 28) or x.shape[0] != y.shape[0]:
            raise TaskUnavailable(f"fashion-mnist: unexpected shapes {tuple(x.shape)} / {tuple(y.shape)} in {d}.")
    return out


def _fixed_subset(n_total: int, n: int | None, salt: int, skip: int = 0) -> Tensor:
    """Entries ``skip : skip + n`` of a fixed permutation, sorted (a smaller size's subset is inside a larger one's)."""
    gen = torch.Generator().manual_seed(DATA_SEED + salt)
    order = torch.randperm(n_total, generator=gen)[skip:]
    return order[:n].sort().values  # [:None] = all


_PROJECTED: dict[bytes, tuple[Tensor, Tensor]] = {}  # (pool rows, reference rows) -> their embeddings: once a suite


def pixel_embeddings(train_x: Tensor, pool: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """``(len(pool), PIXEL_DIMS)`` and ``(len(reference), PIXEL_DIMS)`` float32 projections of the flattened
    images ``train_x[pool]`` and ``train_x[reference]`` on the pool's first principal components."""
    import faiss

    key = pool.numpy().tobytes() + b"|" + reference.numpy().tobytes()
    if key not in _PROJECTED:
        flat = train_x.reshape(len(train_x), -1).numpy()
        pool_x = np.ascontiguousarray(flat[pool.numpy()])
        pca = faiss.PCAMatrix(pool_x.shape[1], PIXEL_DIMS)
        pca.train(pool_x)
        ref_x = np.ascontiguousarray(flat[reference.numpy()])
        _PROJECTED[key] = (torch.from_numpy(pca.apply(pool_x)), torch.from_numpy(pca.apply(ref_x)))
    return _PROJECTED[key]


class FashionCNN(ClassifierModule):
    """Conv(1->c1, 3x3, stride 2) -> ReLU -> Conv(c1->c2, 3x3, stride 2) -> ReLU -> Linear -> ReLU -> ``head``."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 128, lr: float = 2e-3) -> None:
        super().__init__(NUM_CLASSES, lr=lr)
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class FashionMNISTTask(BenchTask):
    """Fashion-MNIST (Debian ``dataset-fashion-mnist`` or ``$GRACE_LIGHTNING_FASHION_MNIST``), small CNN, accuracy."""

    name = "fashion-mnist"
    description = "Fashion-MNIST 28x28 clothing images, 10 classes; 2-conv CNN; accuracy"
    metric = "accuracy"
    higher_is_better = True
    tolerance = 0.005
    batch_size = 128
    val_batch_size = 1000
    sizes = {
        "quick": TaskSize(train_examples=20_000, val_examples=5_000, epochs=3),
        "default": TaskSize(train_examples=None, val_examples=None, epochs=5),
        # Long enough that full data saturates (its best evaluation comes before the last one without a schedule).
        "long": TaskSize(train_examples=None, val_examples=None, epochs=20),
    }
    options = {"embedding": embedding_option("the CNN's hidden layer", "pixels", f"the pixels' first {PIXEL_DIMS} principal components")}

    def check_available(self) -> None:
        d = data_dir()
        if not d.is_dir():
            raise TaskUnavailable(f"fashion-mnist: data directory {d} does not exist; {INSTALL_HINT}.")
        for stem in _FILES.values():
            _find(d, stem)

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        """The pool and validation set of ``size``; ``seed`` is unused (the subsets come from a fixed seed)."""
        self.check_available()
        train_x, train_y, test_x, test_y = load_fashion_mnist(str(data_dir().resolve()))
        reference_idx = _fixed_subset(len(train_y), self.reference_examples, salt=0)
        train_idx = _fixed_subset(len(train_y), size.train_examples, salt=0, skip=self.reference_examples)
        val_idx = _fixed_subset(len(test_y), size.val_examples, salt=1)
        encoded = {}
        if self.settings["embedding"] == "pixels":
            pool_e, reference_e = pixel_embeddings(train_x, train_idx, reference_idx)
            encoded = {"embeddings": pool_e, "reference_embeddings": reference_e}
        return TaskData(
            train=TensorDataset(train_x[train_idx], train_y[train_idx]),
            val=TensorDataset(test_x[val_idx], test_y[val_idx]),
            reference=TensorDataset(train_x[reference_idx], train_y[reference_idx]),
            info={
                "num_classes": NUM_CLASSES, "input_shape": (1, 28, 28),
                # rows of the IDX files (validation: of the test file)
                "source_ids": {"train": train_idx, "val": val_idx, "reference": reference_idx},
            },
            **encoded,
        )

    def build_model(self, data: TaskData, seed: int) -> FashionCNN:
        return seeded_init(seed, FashionCNN)  # type: ignore[return-value]


class NoisyFashionMNISTTask(FashionMNISTTask):
    """:class:`FashionMNISTTask` with a fixed share of the pool's labels flipped; validation and reference stay clean.

    Option ``noise`` (default 0.3): the share of pool labels flipped, each uniformly to one of the 9 other
    classes. The flipped examples are drawn from a fixed data seed (never the run seed), so every run of a
    comparison trains from the same noisy pool; they are the task's ``marked`` examples, and the bench reports
    the share of noisy examples each strategy trained on. The reference set (``group_mates``, ``gip``) is clean:
    it stands for the small trusted set a user has.
    """

    name = "fashion-mnist-noisy"
    description = "Fashion-MNIST with a share of the pool's labels flipped (option noise, default 0.3); accuracy"
    options = {
        **FashionMNISTTask.options,
        "noise": TaskOption(0.3, "share of pool labels flipped to another class", fraction_option("noise")),
    }

    def make_data(self, size: TaskSize, seed: int) -> TaskData:
        return with_flipped_labels(super().make_data(size, seed), self.settings["noise"], NUM_CLASSES, DATA_SEED + 7)
