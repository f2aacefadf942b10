"""Batch transforms as torch ops on (B, C, H, W) float tensors.

Each transform is a callable ``t(x, generator) -> x``; random ones draw only from ``generator``
so augmentation is reproducible (see :class:`nnlab.data.base.BatchLoader`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nnlab.data.base import Transform
from nnlab.data.trivialaugment import TrivialAugment


@dataclass
class Normalize:
    """(x - mean) / std per channel; mean and std in [0, 1] units."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass
class RandomCrop:
    """Zero-pad by ``padding`` then take a random ``size`` x ``size`` crop per image:
    (B, C, H, W) -> (B, C, size, size). Reference: :func:`random_crop_reference`."""

    size: int
    padding: int = 4

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.padding
        xp = F.pad(x, (p, p, p, p))
        top = torch.randint(0, h + 2 * p - self.size + 1, (b,), generator=generator)
        left = torch.randint(0, w + 2 * p - self.size + 1, (b,), generator=generator)
        # Gather crops with one advanced-indexing op: rows (B, size, 1), cols (B, 1, size).
        ar = torch.arange(self.size)
        rows = (top[:, None] + ar)[:, :, None]
        cols = (left[:, None] + ar)[:, None, :]
        bidx = torch.arange(b)[:, None, None]
        return xp.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop_reference(x: torch.Tensor, generator: torch.Generator, size: int,
                          padding: int) -> torch.Tensor:
    """Plain per-image loop doing what :class:`RandomCrop` does (same random draws), kept as the
    reference that the vectorised version is tested against. (B, C, H, W) -> (B, C, size, size)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    top = torch.randint(0, h + 2 * padding - size + 1, (b,), generator=generator)
    left = torch.randint(0, w + 2 * padding - size + 1, (b,), generator=generator)
    return torch.stack([xp[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(top, left))])


@dataclass
class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``."""

    p: float = 0.5

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=generator) < self.p
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass
class Resize:
    """Bilinear (antialiased) resize to ``size`` x ``size``."""

    size: int

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                             align_corners=False, antialias=True)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x


def train_transform(mean, std, *, image_size: int, augment: bool, flip: bool,
                    padding: int | None = None, trivial: bool = False) -> Transform:
    """Standard classifier training transform: [random crop + optional flip + optional
    TrivialAugment] + normalise.

    The crop pads by ``padding`` pixels (default: 4 for images of 28 pixels or more, else 2)."""
    steps: list[Transform] = []
    if augment:
        pad = (4 if image_size >= 28 else 2) if padding is None else padding
        steps.append(RandomCrop(image_size, padding=pad))
        if flip:
            steps.append(RandomHorizontalFlip())
        if trivial:
            steps.append(TrivialAugment())
    steps.append(Normalize(mean, std))
    return Compose(steps)
