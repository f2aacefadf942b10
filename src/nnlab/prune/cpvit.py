"""CP-ViT (Song et al. 2022): cascade pruning of patches and heads from cumulative attention scores.

Pure tensor functions; :class:`nnlab.prune.runners.CPViTRunner` applies them to a ViT.

* Patch score of one layer: the attention *column mass* of each key token, summed over queries
  and heads (how much the layer reads from that token). Scores accumulate over layers and a
  pruned patch stays pruned (it is removed; its score goes with it).
* Head score: how much of a head's attention lands on informative (high-score) patches, the
  patches weighted by their cumulative score; the heads of the PH-region are the best-scoring
  ones. Heads follow a layer-aware cascade like the patches (:func:`cascade_ratios` with the
  heads' own target, :func:`head_keep_counts`).

  Where nnlab differs from the paper: CP-ViT picks heads per input, at run time. nnlab picks them
  per model, from the head scores summed over calibration images (:func:`select_heads`), so that
  a removed head's q/k/v rows and output-projection columns leave the weights and every image of
  a batch shares one smaller matrix product (a per-image head set would need a per-image GEMM).
  Heads of different blocks are different units, so their scores accumulate over images and,
  through the patch weights, over layers, not by head index across blocks.
* Layer-aware cascade: the fraction of patches removed by layer l, r_l, is non-decreasing in l,
  grows with depth and is larger where the layer's attention range is narrow (attention
  concentrated on few patches); a global factor makes the mean of r_l meet the target ratio.

"Pruning ratio" for CP-ViT: the fraction of patch tokens removed, averaged over the blocks' MLPs,
i.e. ``1 - mean_l(patches kept in block l) / N``. Pruning happens inside each block between
attention (which must see the tokens to score them) and the MLP.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nnlab.prune.tokens import take


def column_mass(probs: torch.Tensor) -> torch.Tensor:
    """probs (B, H, T, T) -> (B, T): attention received by each key, summed over queries and heads."""
    return probs.sum(dim=(1, 2))


def head_scores(probs: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
    """Head importance (B, H): attention mass each head puts on patches, weighted by their
    normalised cumulative score. probs (B, H, T, T); patch_scores (B, T) (CLS included)."""
    w = patch_scores / patch_scores.sum(-1, keepdim=True).clamp_min(1e-12)
    return (probs.mean(2) * w[:, None, :]).sum(-1)


def attention_range(mass: torch.Tensor, cover: float = 0.9) -> torch.Tensor:
    """Fraction of patches needed to hold ``cover`` of a layer's attention mass, per image.

    mass (B, N) column mass over patch tokens (CLS excluded) -> (B,) in (0, 1]: small when the
    layer attends to few patches (it tolerates more pruning).
    """
    p = mass.sort(-1, descending=True).values
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    needed = (p.cumsum(-1) < cover).sum(-1) + 1
    return needed.float() / mass.shape[-1]


def _ratios_for(alpha: float, weights: Sequence[float], r_max: float) -> list[float]:
    out, prev = [], 0.0
    for w in weights:
        prev = max(prev, min(r_max, alpha * w))  # non-decreasing: pruned patches stay pruned
        out.append(prev)
    return out


def cascade_ratios(target: float, ranges: Sequence[float], r_max: float) -> list[float]:
    """Per-layer cumulative prune fractions r_l (non-decreasing, each <= r_max, mean = target).

    ranges: each layer's mean attention range in (0, 1] (:func:`attention_range`). Layer weight
    ``w_l = (l + 1) / L * (2 - range_l)``; r_l = min(r_max, alpha * w_l) with a running maximum,
    alpha found by bisection. A target above what r_max allows gives r_l = r_max everywhere.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target ratio must be in [0, 1), got {target}")
    depth = len(ranges)
    weights = [(l + 1) / depth * (2.0 - float(r)) for l, r in enumerate(ranges)]
    lo, hi = 0.0, 1.0
    while sum(_ratios_for(hi, weights, r_max)) / depth < target and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(_ratios_for(mid, weights, r_max)) / depth < target:
            lo = mid
        else:
            hi = mid
    return _ratios_for(hi, weights, r_max)


def keep_counts(ratios: Sequence[float], num_patches: int) -> list[int]:
    """Patches kept in each layer's MLP: round((1 - r_l) * N), at least 1, non-increasing."""
    out, prev = [], num_patches
    for r in ratios:
        prev = min(prev, max(1, round((1.0 - r) * num_patches)))
        out.append(prev)
    return out


def top_patches(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores (B, T) -> positions (B, 1 + keep) of CLS (first) and the ``keep`` best patches."""
    idx = scores[:, 1:].topk(keep, dim=-1, sorted=False).indices + 1
    return torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)


def select_patches(x: torch.Tensor, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep CLS and the ``keep`` highest-scoring patches. x (B, T, D), scores (B, T) ->
    (x (B, 1 + keep, D), scores (B, 1 + keep)); CLS stays first."""
    idx = top_patches(scores, keep)
    return take(x, idx), scores.gather(1, idx)


def select_patches_reference(x: torch.Tensor, scores: torch.Tensor, keep: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop-per-image version of :func:`select_patches` (same set of kept tokens, sorted order)."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        order = sorted(range(1, x.shape[1]), key=lambda j: -float(scores[b, j]))[:keep]
        idx = [0] + sorted(order)
        xs.append(x[b, idx])
        ss.append(scores[b, idx])
    return torch.stack(xs), torch.stack(ss)


def head_keep_counts(ratios: Sequence[float], heads: int) -> list[int]:
    """Heads kept in each block: round((1 - r_l) * heads), at least 1."""
    return [max(1, round((1.0 - r) * heads)) for r in ratios]


def select_heads(scores: torch.Tensor, keep: int) -> list[int]:
    """scores (H,) summed head scores of one block -> the ``keep`` best heads, ascending ids."""
    return sorted(scores.topk(min(keep, scores.numel())).indices.tolist())


def select_heads_reference(scores: torch.Tensor, keep: int) -> list[int]:
    """Plain-sort version of :func:`select_heads` (ties to the lower head id)."""
    order = sorted(range(scores.numel()), key=lambda h: (-float(scores[h]), h))
    return sorted(order[:keep])
