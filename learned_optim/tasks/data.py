"""Datasets for the MLP tasks: MNIST from IDX files in a directory the user names, and an
embedded synthetic classification set that needs no files."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ClassificationData", "load_mnist", "download_mnist", "synthetic_classification", "data_root"]

DATA_ENV = "LEARNED_OPTIM_DATA"

# Official MNIST files: name -> md5 of the .gz (LeCun, Cortes and Burges).
MNIST_FILES = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@dataclass(frozen=True)
class ClassificationData:
    """Inputs (N × D, float32) and integer labels (N) of a classification set."""

    inputs: Tensor
    labels: Tensor
    num_classes: int
    name: str = "data"

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.name}: {self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def split(self, first: int, seed: int = 0) -> tuple[ClassificationData, ClassificationData]:
        """A fixed random split into ``first`` examples and the rest."""
        if not 0 < first < len(self):
            raise ValueError(f"split size must be in (0, {len(self)}), got {first}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        a, b = perm[:first], perm[first:]
        return (
            ClassificationData(self.inputs[a], self.labels[a], self.num_classes, f"{self.name}[:{first}]"),
            ClassificationData(self.inputs[b], self.labels[b], self.num_classes, f"{self.name}[{first}:]"),
        )


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data directory: ``root`` if given, else $LEARNED_OPTIM_DATA."""
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise FileNotFoundError(
                f"no data directory given: pass root=... or set {DATA_ENV} to a directory "
                "holding mnist/t10k-images-idx3-ubyte.gz (learned_optim.tasks.download_mnist "
                "fetches it when online)"
            )
    return Path(root)


def _find(root: Path, name: str) -> Path:
    for folder in (root / "mnist", root):
        for candidate in (folder / name, folder / name.removesuffix(".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"MNIST file {name} (or its unzipped form) not found in {root} or {root / 'mnist'}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says {dims} ({count} bytes) but holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist(root: str | os.PathLike | None = None, split: str = "t10k") -> ClassificationData:
    """MNIST ``split`` ("t10k" or "train") from IDX files under ``root`` (or $LEARNED_OPTIM_DATA).

    Looks in ``root/mnist/`` then ``root/``, gzipped or not. Pixels are scaled to [0, 1] and
    flattened to 784 features.
    """
    if split not in ("t10k", "train"):
        raise ValueError(f"split must be 't10k' or 'train', got {split!r}")
    base = data_root(root)
    images = _read_idx(_find(base, f"{split}-images-idx3-ubyte.gz"))
    labels = _read_idx(_find(base, f"{split}-labels-idx1-ubyte.gz"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return ClassificationData(x, y, 10, f"mnist-{split}")


def download_mnist(root: str | os.PathLike, split: str = "t10k") -> Path:
    """Download an MNIST split's files into ``root/mnist`` and check their MD5s (needs internet)."""
    folder = Path(root) / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{split}-{kind}-ubyte.gz"
        target = folder / name
        if not target.is_file():
            tmp = target.with_suffix(".part")
            urllib.request.urlretrieve(MNIST_MIRROR + name, tmp)
            tmp.rename(target)
        digest = hashlib.md5(target.read_bytes()).hexdigest()
        if digest != MNIST_FILES[name]:
            target.unlink()
            raise ValueError(f"{name}: md5 {digest} does not match {MNIST_FILES[name]}; file removed")
    return folder


def synthetic_classification(
    n: int = 4096, dim: int = 32, num_classes: int = 10, label_noise: float = 0.1, seed: int = 0
) -> ClassificationData:
    """An embedded classification set: Gaussian inputs labelled by a random tanh teacher
    network, with ``label_noise`` of the labels replaced at random. Needs no files."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / dim**0.5
    w2 = torch.randn(64, num_classes, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(n, generator=g) < label_noise
    y[flip] = torch.randint(num_classes, (int(flip.sum()),), generator=g)
    return ClassificationData(x, y, num_classes, f"synthetic-{n}x{dim}")
