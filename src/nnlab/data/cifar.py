"""``cifar10``: CIFAR-10 (50,000 train + 10,000 test, 32x32 RGB, 10 classes) in either form:

* the official python batches: a folder ``cifar-10-batches-py/`` (or ``cifar-10-python.tar.gz``)
  with ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and ``batches.meta``. They are
  pickles, read with :class:`RestrictedUnpickler`, which builds only plain containers, bytes,
  ints and uint8/numeric NumPy arrays: any other global (a class, a function such as
  ``os.system``) is refused, so a malicious file cannot run code.
* an image folder ``train/<class>/*.png|jpg`` and ``test/<class>/*`` (decoded once, cached).

Classes are in the official order, which is also the sorted order of the folder names.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from nnlab.data.base import DatasetSplits, ImageSet
from nnlab.data.cache import stats_chunked
from nnlab.data.imagefolder import accept_images, image_layout, is_image, load_images
from nnlab.data.source import Source
from nnlab.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR_LAYOUT = ("the python batches (cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta) "
                "or an image folder train/<class>/*.png|jpg + test/<class>/*, as a folder or .tar.gz")


class Forbidden(pickle.UnpicklingError):
    """A pickle asked for something the restricted unpickler does not build."""


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """What protocol-2 pickles of ``bytes`` call (``_codecs.encode(str, 'latin1')``); nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise Forbidden(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _plain_dtype(*args):
    """``numpy.dtype`` limited to plain numeric types (object arrays could hold anything)."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise Forbidden("refusing a NumPy object array in a data file")
    return dt


def _numpy_core(module: str, name: str):
    for mod in (module.replace("numpy.core", "numpy._core"), module):  # NumPy 2 renamed core
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this NumPy")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain: dicts, lists, str, bytes, ints and NumPy arrays.

    ``find_class`` allows NumPy's array reconstructors, ``numpy.ndarray``, a non-object
    ``numpy.dtype`` and latin-1 ``_codecs.encode``; everything else raises UnpicklingError.
    """

    NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) in self.NUMPY:
            return _numpy_core(module, name)
        raise Forbidden(f"forbidden global {module}.{name}")


def safe_unpickle(data: bytes, where: str):
    """Unpickle ``data`` (Python 2 or 3 pickles; py2 str becomes bytes) without running code."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Forbidden as exc:
        raise DataError(f"{where}: refused to unpickle ({exc}); this is not an official CIFAR-10 batch "
                        f"file, download it again from https://www.cs.toronto.edu/~kriz/cifar.html") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as exc:
        raise DataError(f"{where}: truncated or corrupt pickle ({type(exc).__name__}: {exc}); "
                        f"download it again") from None


def _get(d: dict, key: str):
    return d.get(key.encode(), d.get(key)) if isinstance(d, dict) else None


def parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    batch = safe_unpickle(data, where)
    images, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(images, np.ndarray) or labels is None:
        raise DataError(f"{where}: not a CIFAR-10 batch (needs 'data' and 'labels' entries)")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: 'data' is {images.dtype} {images.shape}, expected uint8 (N, 3072)")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: label {int(labels.max())} is out of range 0-9")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _batch_prefix(names: list[str]) -> str | None:
    dirs: dict[str, set[str]] = {}
    for n in names:
        folder, _, base = n.rpartition("/")
        dirs.setdefault(folder + "/" if folder else "", set()).add(base)
    found = sorted((p for p, files in dirs.items() if set(BATCHES) <= files), key=len)
    return found[0] if found else None


def _folder_prefix(names: list[str]) -> str | None:
    prefix = accept_images(names)
    if prefix is None:
        return None
    rel = [n[len(prefix):] for n in names if n.startswith(prefix) and is_image(n)]
    tops = {n.split("/")[0] for n in rel}
    return prefix if "train" in tops and tops & {"test", "val"} else None


def accept_cifar(names: list[str]) -> str | None:
    """Root of the python batches (preferred) or of a train/test image folder."""
    found = _batch_prefix(names)
    return found if found is not None else _folder_prefix(names)


def read_batches(source: Source) -> DatasetSplits:
    """CIFAR-10 from the python batches at ``source``: (50000, 3, 32, 32) + (10000, 3, 32, 32)."""
    raw = dict(source.iter_read(BATCHES + ["batches.meta"]))
    missing = [b for b in BATCHES if b not in raw]
    if missing:
        raise DataError(f"{source.describe()} lacks {', '.join(missing)}; expected {CIFAR_LAYOUT}")
    parts = [parse_batch(raw[b], source.describe(b)) for b in BATCHES]
    classes = CIFAR10_CLASSES
    if "batches.meta" in raw:
        names = _get(safe_unpickle(raw["batches.meta"], source.describe("batches.meta")), "label_names")
        if names and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    train = ImageSet(train_x, train_y, classes)
    test = ImageSet(torch.from_numpy(parts[5][0].copy()), torch.from_numpy(parts[5][1]), classes)
    mean, std = stats_chunked(train.images)
    return DatasetSplits("cifar10", train, test, mean, std,
                         description=f"CIFAR-10 python batches in {source.describe()}")


def read_cifar_folder(source: Source, use_cache: bool = True) -> DatasetSplits:
    """CIFAR-10 from a ``train/<class>/``, ``test/<class>/`` image folder, checked to be
    10 classes of 32x32 RGB images."""
    names, layout = found = image_layout(source)
    if len(layout.classes) != 10:
        raise DataError(f"{source.describe()}: CIFAR-10 needs 10 class folders in train/, found "
                        f"{len(layout.classes)} ({', '.join(layout.classes[:12])}); use the "
                        f"'imagefolder' data set for other folders")
    splits = load_images(source, name="cifar10", what="CIFAR-10", use_cache=use_cache, found=found)
    if splits.shape != (3, 32, 32):
        raise DataError(f"{source.describe()}: images are {splits.shape}, CIFAR-10 images are 3x32x32; "
                        f"use the 'imagefolder' data set for other images")
    return splits


def load_cifar10(data_dir: Path | None = None, *, download: bool = False, cache: bool = True,
                 **_) -> DatasetSplits:
    """CIFAR-10, 50,000 train + 10,000 test 32x32 RGB, from the python batches or a JPEG/PNG folder.

    Looks in ``data_dir`` (folder, .tar.gz, or their parent), else ``$NNLAB_DATA/cifar10``;
    ``download=True`` fetches the official python batches there first.
    Train (50000, 3, 32, 32) and test (10000, 3, 32, 32) uint8, 10 classes.
    """
    from nnlab.data.download import find_source

    source = find_source("cifar10", data_dir, download, accept_cifar, "CIFAR-10", CIFAR_LAYOUT)
    if _batch_prefix(source.names()) == "":  # the root holds the batches, else it is a folder
        return read_batches(source)
    return read_cifar_folder(source, use_cache=cache)
