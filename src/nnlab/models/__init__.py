"""Model zoo. One family per file; each registers its factories in :data:`MODELS`.

Every factory has the signature ``factory(*, num_classes: int, in_chans: int, image_size: int,
**options) -> nn.Module`` so the CLI and the tests can build any model for any data set.
Submodules are imported automatically, so a new family file needs no edit here.
"""
from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from nnlab.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 1, image_size: int = 28,
                 **options) -> nn.Module:
    """Build model ``name`` (one of ``MODELS.names()``) for images of (in_chans, image_size, image_size)."""
    return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MODELS", "create_model", "count_parameters"]
