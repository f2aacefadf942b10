"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) as pure tensor functions.

The batch is mixed with a permutation of itself, as DeiT and timm do: image ``i`` is combined with image
``perm[i]``. Mixup blends whole images, ``lam * x_i + (1 - lam) * x_perm[i]``; CutMix pastes a box of
``x_perm[i]`` into ``x_i``. The target is the same blend of one-hot labels, ``lam * e(y_i) + (1 - lam) *
e(y_perm[i])``, where for CutMix ``lam`` is the share of pixels that the box left to image ``i`` (after
clipping the box to the image, as timm's ``correct_lam``). With both alphas set, each batch uses one of the two,
chosen with probability 1/2 (DeiT's ``switch_prob`` 0.5; nnlab mixes every batch, DeiT's ``mixup_prob`` 1).
``lam`` is drawn from Beta(alpha, alpha), once per batch (timm's ``mode='batch'``).

:func:`mix_batch` is the fast path; :func:`mix_batch_reference` is a per-image loop from the papers'
equations that a test checks it against, with the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixDraw:
    """The random choices for one batch: which method, ``lam`` and the permutation; for CutMix the box
    (top, left, height, width) in pixels, already clipped to the image."""

    method: str                              # "mixup" or "cutmix"
    lam: float                               # share of image i in its mixed image (CutMix: after clipping)
    perm: torch.Tensor                       # (B,) int64, image i is mixed with image perm[i]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class MixedBatch:
    x: torch.Tensor                          # (B, C, H, W) mixed images
    target: torch.Tensor                     # (B, K) class probabilities, rows sum to 1
    draw: MixDraw


def draw_mix(batch: int, height: int, width: int, mixup_alpha: float, cutmix_alpha: float,
             generator: torch.Generator) -> MixDraw:
    """Draw one batch's choices (at least one alpha > 0). The CutMix box has area ``(1 - lam) * H * W``
    before clipping, centred at a uniform pixel, as in the CutMix paper."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("draw_mix needs mixup_alpha > 0 or cutmix_alpha > 0")
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # torch's Beta sampler takes no generator
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(batch, generator=generator)
    if not use_cutmix:
        return MixDraw("mixup", lam, perm)
    cut = math.sqrt(1.0 - lam)
    bh, bw = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(cy - bh // 2, 0), min(cy + bh // 2, height)
    left, right = max(cx - bw // 2, 0), min(cx + bw // 2, width)
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return MixDraw("cutmix", lam, perm, (top, left, bottom - top, right - left))


def apply_mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, draw: MixDraw) -> MixedBatch:
    """Mix images x (B, C, H, W) and integer labels y (B,) as ``draw`` says; returns soft targets (B, K)."""
    perm = draw.perm.to(x.device)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    target = draw.lam * onehot + (1.0 - draw.lam) * onehot[perm]
    if draw.method == "mixup":
        return MixedBatch(draw.lam * x + (1.0 - draw.lam) * x[perm], target, draw)
    top, left, h, w = draw.box
    mixed = x.clone()
    mixed[:, :, top:top + h, left:left + w] = x[perm, :, top:top + h, left:left + w]
    return MixedBatch(mixed, target, draw)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator) -> MixedBatch:
    """Draw and apply one batch's Mixup or CutMix: x (B, C, H, W), y (B,) -> MixedBatch."""
    draw = draw_mix(x.shape[0], x.shape[2], x.shape[3], mixup_alpha, cutmix_alpha, generator)
    return apply_mix(x, y, num_classes, draw)


def mix_batch_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int, draw: MixDraw) -> MixedBatch:
    """Plain per-image, per-pixel loop of the papers' equations (slow; for tests)."""
    out, target = torch.empty_like(x), torch.zeros(x.shape[0], num_classes, dtype=x.dtype)
    top, left, h, w = draw.box
    for i in range(x.shape[0]):
        j = int(draw.perm[i])
        target[i, int(y[i])] += draw.lam
        target[i, int(y[j])] += 1.0 - draw.lam
        if draw.method == "mixup":
            out[i] = draw.lam * x[i] + (1.0 - draw.lam) * x[j]
            continue
        for r in range(x.shape[2]):
            for c in range(x.shape[3]):
                inside = top <= r < top + h and left <= c < left + w
                out[i, :, r, c] = x[j, :, r, c] if inside else x[i, :, r, c]
    return MixedBatch(out, target, draw)
