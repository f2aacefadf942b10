"""``mnist``: the full MNIST (60,000 train + 10,000 test, 28x28 grey) from the four standard IDX
files, gzipped or not (detected from the bytes, not the name):

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

(``train-images.idx3-ubyte`` with a dot, as some mirrors name them, works too.) Every file is
checked: gzip integrity, magic number (0x00000803 images, 0x00000801 labels), the counts and
sizes the header promises against the bytes present, matching image/label counts, labels 0-9.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from nnlab.data.base import DatasetSplits, ImageSet
from nnlab.data.cache import stats_chunked
from nnlab.data.embedded import MNIST_CLASSES
from nnlab.data.source import Source
from nnlab.errors import DataError

MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MNIST_LAYOUT = ("the four MNIST IDX files (" + ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
                + ") in one folder or .tar.gz")
IDX_UBYTE = 0x08


def _variants(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")
    return [stem + ".gz", stem, dotted + ".gz", dotted]


def find_mnist_files(names: list[str]) -> tuple[str, dict[str, str]] | None:
    """``(prefix, {role: name})`` for the folder in ``names`` holding all four files, else None."""
    by_dir: dict[str, dict[str, str]] = {}
    for name in names:
        folder, _, base = name.rpartition("/")
        for role, stem in MNIST_FILES.items():
            if base in _variants(stem):
                by_dir.setdefault(folder + "/" if folder else "", {}).setdefault(role, name)
    complete = [(p, f) for p, f in sorted(by_dir.items(), key=lambda kv: len(kv[0])) if len(f) == 4]
    if not complete:
        return None
    prefix, files = complete[0]
    return prefix, {role: name[len(prefix):] for role, name in files.items()}


def accept_mnist(names: list[str]) -> str | None:
    found = find_mnist_files(names)
    return None if found is None else found[0]


def parse_idx(data: bytes, where: str, ndim: int) -> np.ndarray:
    """Decode one IDX file of unsigned bytes (gzipped or raw) into an array of ``ndim`` dims:
    images (N, H, W) uint8 for ``ndim=3``, labels (N,) uint8 for ``ndim=1``."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{where}: the gzip stream is truncated or corrupt ({exc}); "
                            f"download the file again") from None
    kind = "images" if ndim == 3 else "labels"
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    want = (IDX_UBYTE << 8) | ndim
    if magic != want:
        got = "no header (file shorter than 4 bytes)" if magic is None else f"0x{magic:08x}"
        raise DataError(f"{where}: wrong magic number {got}, expected 0x{want:08x} (IDX {kind}); "
                        f"is this the right file? MNIST needs {MNIST_LAYOUT}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated IDX header ({len(data)} bytes); download the file again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if dims[0] == 0:
        raise DataError(f"{where}: the header says 0 {kind}; the file holds no data, download it again")
    size = math.prod(dims)  # exact: numpy's product would wrap around for absurd header dims
    if len(data) - header != size:
        problem = "truncated" if len(data) - header < size else "has trailing bytes"
        raise DataError(f"{where}: {problem}: the header promises {' x '.join(map(str, dims))} = "
                        f"{size} bytes of data, the file has {len(data) - header}; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _split(source: Source, images: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> ImageSet:
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{source.describe(names[0])} has {images.shape[0]} images but "
                        f"{source.describe(names[1])} has {labels.shape[0]} labels; the files "
                        f"do not belong together")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{source.describe(names[0])}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"MNIST images are 28x28; use the 'imagefolder' data set for other images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{source.describe(names[1])}: label {int(labels.max())} is out of range 0-9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), MNIST_CLASSES)


def read_mnist(source: Source) -> DatasetSplits:
    """Train (60000, 1, 28, 28) and test (10000, 1, 28, 28) uint8 splits from ``source``."""
    found = find_mnist_files(source.names())
    if found is None:
        raise DataError(f"{source.describe()} lacks some MNIST files: expected {MNIST_LAYOUT}")
    files = found[1]
    raw = dict(source.iter_read(files.values()))
    arr = {role: parse_idx(raw[name], source.describe(name), 3 if role.endswith("images") else 1)
           for role, name in files.items()}
    train = _split(source, arr["train_images"], arr["train_labels"],
                   (files["train_images"], files["train_labels"]))
    test = _split(source, arr["test_images"], arr["test_labels"],
                  (files["test_images"], files["test_labels"]))
    mean, std = stats_chunked(train.images)
    return DatasetSplits("mnist", train, test, mean, std,
                         description=f"MNIST from IDX files in {source.describe()}")


def load_mnist(data_dir: Path | None = None, *, download: bool = False, **_) -> DatasetSplits:
    """Full MNIST, 60,000 train + 10,000 test 28x28 grey digits, from the four IDX files.

    Looks in ``data_dir`` (folder, .tar.gz, or their parent), else the cache folder;
    ``download=True`` fetches missing files from the canonical mirrors first.
    Train (60000, 1, 28, 28) and test (10000, 1, 28, 28) uint8, 10 classes.
    """
    from nnlab.data.download import find_source

    return read_mnist(find_source("mnist", data_dir, download, accept_mnist, "MNIST", MNIST_LAYOUT))
