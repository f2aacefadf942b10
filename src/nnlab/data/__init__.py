"""Data sets as in-memory uint8 image tensors, loaders over them, and batch transforms.

Use :func:`load_dataset` with a name from :data:`DATASETS` (the CLI's ``--data`` choices):
``mnist-5k`` (embedded, no download), ``mnist``, ``cifar10``, ``celeba64``, ``imagefolder``.
"""
from __future__ import annotations

from pathlib import Path

from nnlab.data.base import BatchLoader, DatasetSplits, ImageSet, Transform, channel_stats
from nnlab.data.embedded import load_mnist5k
from nnlab.data.cifar import load_cifar10
from nnlab.data.idx import load_mnist
from nnlab.data.imagefolder import load_celeba64, load_imagefolder
from nnlab.errors import ConfigError
from nnlab.registry import Registry

# name -> loader(data_dir: Path | None, **options) -> DatasetSplits
DATASETS: Registry = Registry("data set")
DATASETS.register("mnist-5k", load_mnist5k)
DATASETS.register("mnist", load_mnist)
DATASETS.register("cifar10", load_cifar10)
DATASETS.register("celeba64", load_celeba64)
DATASETS.register("imagefolder", load_imagefolder)


def load_dataset(name: str, data_dir: str | Path | None = None, **options) -> DatasetSplits:
    """Load data set ``name`` (see :data:`DATASETS`) from ``data_dir`` (a folder or ``.tar.gz``).

    Options are passed to the loader (e.g. ``image_size`` for ``celeba64``, ``download``).
    """
    loader = DATASETS.get(name)
    _check_options(name, loader, options)
    return loader(Path(data_dir) if data_dir is not None else None, **options)


GENERIC_OPTIONS = ("download", "cache")  # any loader takes these (a no-op where they do not apply)


def _check_options(name: str, loader, options: dict) -> None:
    """A one-line ConfigError for an option the loader does not take (its ``**_`` would drop it silently)."""
    import inspect

    takes = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(takes) - set(GENERIC_OPTIONS))
    if unknown:
        valid = sorted(set(takes) | set(GENERIC_OPTIONS))
        raise ConfigError(f"data set {name} has no option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")


def dataset_summary(name: str) -> str:
    """One line describing data set ``name`` (the first line of its loader's docstring)."""
    doc = DATASETS.get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


__all__ = ["BatchLoader", "DATASETS", "DatasetSplits", "ImageSet", "Transform", "channel_stats",
           "dataset_summary", "load_dataset"]
