"""The cache folder (``$NNLAB_DATA`` or ``~/.cache/nnlab``): downloads, and decoded data sets.

Decoding 60,000 JPEGs takes a minute; a decoded data set is stored once as safetensors
(``decoded/<name>-<key>.safetensors``: uint8 images, int64 labels, and the classes and stats as
metadata), keyed by the source's path, size and mtime plus the loader options, and written
atomically so concurrent runs never see half a file. Loading it takes well under a second.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from nnlab.data.base import DatasetSplits, ImageSet

CACHE_FORMAT = 1  # bump when decoding changes, so old entries are not reused
SHARED_MODE = 0o644  # cache files are readable by other users of a shared cache folder


def cache_dir() -> Path:
    """``$NNLAB_DATA`` if set, else ``~/.cache/nnlab``."""
    return Path(os.environ.get("NNLAB_DATA") or Path.home() / ".cache" / "nnlab").expanduser()


def decoded_path(name: str, fingerprint: str, options: dict) -> Path:
    """Where the decoded data set ``name`` from a source with ``fingerprint`` is cached."""
    blob = json.dumps({"format": CACHE_FORMAT, "name": name, "source": fingerprint,
                       "options": options}, sort_keys=True)
    return cache_dir() / "decoded" / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.safetensors"


def save_splits(path: Path, splits: DatasetSplits) -> None:
    """Write ``splits`` atomically as safetensors."""
    from safetensors.torch import save_file

    from nnlab.engine.io import atomic_write

    tensors = {"train_images": splits.train.images.contiguous(), "train_labels": splits.train.labels,
               "test_images": splits.test.images.contiguous(), "test_labels": splits.test.labels}
    meta = {"name": splits.name, "classes": json.dumps(splits.train.classes),
            "mean": json.dumps(list(splits.mean)), "std": json.dumps(list(splits.std)),
            "description": splits.description}
    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, SHARED_MODE)

    atomic_write(path, write)


def load_splits(path: Path) -> DatasetSplits | None:
    """The cached splits at ``path``, or None when absent or unreadable (then it is rebuilt)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        classes = json.loads(meta["classes"])
        return DatasetSplits(
            name=meta["name"], train=ImageSet(t["train_images"], t["train_labels"], classes),
            test=ImageSet(t["test_images"], t["test_labels"], classes),
            mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"])),
            description=meta.get("description", ""))
    except MemoryError:
        raise
    except Exception:  # a corrupt or foreign entry is rebuilt, never trusted
        return None


def cached(name: str, fingerprint: str, options: dict, build: Callable[[], DatasetSplits],
           use_cache: bool = True) -> DatasetSplits:
    """``build()`` once per (source fingerprint, options); later calls read the cache."""
    if not use_cache:
        return build()
    path = decoded_path(name, fingerprint, options)
    splits = load_splits(path)
    if splits is None:
        splits = build()
        try:
            save_splits(path, splits)
        except OSError as exc:
            import warnings

            warnings.warn(f"could not write the data cache {path} ({exc}); set NNLAB_DATA to a "
                          f"writable folder to avoid decoding again", stacklevel=2)
    return splits


def stats_chunked(images: torch.Tensor, chunk: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, C, H, W) uint8 images, in float64 chunks
    of ``chunk`` images (default: about 2M values, 16 MB), not a float copy of the whole set.
    Agrees with :func:`nnlab.data.base.channel_stats`, the plain reference."""
    c = images.shape[1]
    chunk = chunk or max(1, (1 << 21) // max(1, images[0].numel()))
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)  # (C, n*H*W)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images.numel() // c
    mean = total / count
    var = (total_sq - count * mean * mean) / max(count - 1, 1)  # unbiased, like torch.std
    return tuple((mean / 255).tolist()), tuple((var.clamp_min(0).sqrt() / 255).tolist())
