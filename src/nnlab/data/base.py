"""Core data types: image sets held in memory as uint8 tensors, and a batch loader over them.

All data sets in nnlab fit in memory (MNIST 47 MB, CIFAR-10 180 MB, CelebA-64 123 MB as uint8), so
batches are sliced from one tensor: no worker processes, deterministic order from (seed, epoch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from nnlab.errors import DataError

# A batch transform: (B, C, H, W) float images and a generator for its randomness -> images.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class ImageSet:
    """One split of an image data set.

    images: (N, C, H, W) uint8 in [0, 255].
    labels: (N,) int64 class indices; -1 where the data set has no labels.
    classes: class names, ``classes[i]`` naming label i (empty when unlabelled).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be a (N, C, H, W) uint8 tensor, got {self.images.dtype} "
                            f"of shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | slice) -> "ImageSet":
        """The images at ``index`` (a slice, or a (K,) index tensor)."""
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def random_subset(self, limit: int | None, seed: int = 0) -> "ImageSet":
        """A seeded random ``limit`` of the images, in their original order (all when None or
        too large). Random, not the first ``limit``: data sets stored by class would give one class."""
        if limit is None or limit >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit]
        return self.subset(idx.sort().values)


@dataclass
class DatasetSplits:
    """A data set's train and test splits plus what a model needs to know about it.

    mean, std: per-channel statistics of the train split in [0, 1] units, for normalisation.
    """

    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    def info(self) -> dict:
        """What ``nnlab data info`` prints."""
        return {"name": self.name, "train_size": len(self.train), "test_size": len(self.test),
                "shape": list(self.shape), "num_classes": self.num_classes, "classes": self.train.classes,
                "description": self.description}

    def replace(self, **changes) -> "DatasetSplits":
        return dataclasses.replace(self, **changes)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, C, H, W) uint8 images."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def epoch_key(seed: int, epoch: int) -> int:
    """The seed of an epoch's batch order."""
    return seed * 1_000_003 + epoch


def batch_key(seed: int, epoch: int, batch: int) -> int:
    """The seed of global batch ``batch`` of ``epoch``'s augmentation; other per-batch draws (Mixup /
    CutMix in the trainer) derive theirs from it, so every draw is a function of (seed, epoch, batch)."""
    return epoch_key(seed, epoch) * 100_003 + batch


class BatchLoader:
    """Iterates ``(x, y)`` batches of an :class:`ImageSet`.

    x: (B, C, H, W) float32, images scaled to [0, 1] then passed through ``transform``.
    y: (B,) int64 labels.

    The order is a function of ``(seed, epoch)`` only (call :meth:`set_epoch`), and each batch's
    augmentation randomness of ``(seed, epoch, batch index)``, so a resumed run sees exactly the
    batches an uninterrupted one would. With ``world_size > 1`` each rank takes every
    ``world_size``-th batch of the shared order (equal counts per rank: ``drop_last`` applies).
    """

    def __init__(self, data: ImageSet, batch_size: int, *, shuffle: bool = False,
                 transform: Transform | None = None, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.transform, self.drop_last, self.seed = transform, drop_last, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self._cached: tuple = (None, None)   # ((epoch, size), that epoch's order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        """This epoch's permutation of the data set, drawn once per epoch (``indices`` asks every step)."""
        key = (self.epoch, len(self.data))
        if self._cached[0] != key:
            n = len(self.data)
            g = torch.Generator().manual_seed(epoch_key(self.seed, self.epoch))
            self._cached = (key, torch.randperm(n, generator=g) if self.shuffle else torch.arange(n))
        return self._cached[1]

    def __len__(self) -> int:
        n = len(self.data)
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches // self.world_size if self.world_size > 1 else batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def indices(self, i: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """The data set indices (b,) of this process's batch ``i`` of this epoch."""
        order = self._order() if order is None else order
        b = i * self.world_size + self.rank
        return order[b * self.batch_size:(b + 1) * self.batch_size]

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start+1, ...`` of this epoch (to resume mid-epoch)."""
        order = self._order()
        for i in range(start, len(self)):
            b = i * self.world_size + self.rank
            idx = self.indices(i, order)
            x = self.data.images[idx].float().div_(255)
            if self.transform is not None:
                g = torch.Generator().manual_seed(batch_key(self.seed, self.epoch, b))
                x = self.transform(x, g)
            yield x, self.data.labels[idx]
