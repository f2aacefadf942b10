"""Token merging (ToMe, Bolya et al. 2023): bipartite soft matching and proportional attention.

Pure tensor functions; :class:`nnlab.prune.runners.ToMeRunner` applies them inside each block,
between attention and MLP, using the attention keys (averaged over heads) as the similarity
metric. Merged tokens are size-weighted averages; their size enters the next attention as a
``log(size)`` bias on the keys (proportional attention). Training-free.

"Pruning ratio" for ToMe: as for CP-ViT, ``1 - mean_l(tokens in block l's MLP, patches) / N``:
r tokens merged per block (one more in the first blocks where needed) are chosen so that the mean
meets the ratio (each block can merge at most half of its tokens, so very high ratios are capped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nnlab.prune.tokens import add_at, add_at_reference, take, take_reference


@dataclass
class MergePlan:
    """Which tokens merge. Even tokens (set A, CLS at 0) either stay (``unmerged``) or are averaged
    into the most similar odd token (set B): ``src`` indices of A go into ``dst`` indices of B.
    unmerged (B, Ta - r), src (B, r), dst (B, r): int64 indices into A or B."""

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> MergePlan:
    """metric (B, T, C) (CLS first, never merged) -> the plan merging r tokens (r < T // 2)."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)                       # (B, Ta, Tb) cosine similarity
    scores[:, 0, :] = float("-inf")                         # protect CLS
    best, best_idx = scores.max(dim=-1)                     # (B, Ta)
    order = best.argsort(dim=-1, descending=True)
    src, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values  # CLS (index 0) stays first
    return MergePlan(unmerged=unmerged, src=src, dst=best_idx.gather(1, src))


def merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sum-merge x (B, T, C) by ``plan`` -> (B, T - r, C): [unmerged A, B (with sources added)].
    A's token j is x's token 2 j and B's token j is x's token 2 j + 1, so the rows are read from
    x directly (:mod:`nnlab.prune.tokens`; :func:`merge_reference` is the gather version)."""
    b = add_at(x[:, 1::2].contiguous(), plan.dst, take(x, 2 * plan.src))
    return torch.cat([take(x, 2 * plan.unmerged), b], dim=1)


def merge_reference(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """:func:`merge` with ``gather`` and ``scatter_reduce`` on the A and B halves."""
    a, b = x[:, ::2], x[:, 1::2]
    return torch.cat([take_reference(a, plan.unmerged),
                      add_at_reference(b, plan.dst, take_reference(a, plan.src))], dim=1)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, plan: MergePlan
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x (B, T, C), size (B, T, 1) -> (x, size) with T - r tokens."""
    x = merge(x * size, plan)
    size = merge(size, plan)
    return x / size, size


def merge_weighted_reference(x: torch.Tensor, size: torch.Tensor, plan: MergePlan
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop version of :func:`merge_weighted` (same output order), for the agreement test."""
    xs, ss = [], []
    for n in range(x.shape[0]):
        a, sa, b, sb = x[n, ::2], size[n, ::2], x[n, 1::2].clone(), size[n, 1::2].clone()
        tot, tsz = b * sb, sb.clone()
        for s, d in zip(plan.src[n].tolist(), plan.dst[n].tolist()):
            tot[d] += a[s] * sa[s]
            tsz[d] += sa[s]
        keep = plan.unmerged[n].tolist()
        xs.append(torch.cat([a[keep], tot / tsz]))
        ss.append(torch.cat([sa[keep], tsz]))
    return torch.stack(xs), torch.stack(ss)


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention: size (B, T, 1) -> additive key bias (B, 1, 1, T) = log(size)."""
    return size.log().transpose(1, 2)[:, None]


def token_schedule(num_patches: int, depth: int, r: int | Sequence[int]) -> list[int]:
    """Patches left after merging in each block, merging r (or r[l] in block l) tokens per block,
    at most half of them (set A holds ceil((1 + t) / 2) tokens including CLS, which never merges)."""
    rs = [r] * depth if isinstance(r, int) else list(r)
    out, t = [], num_patches
    for r_l in rs:
        t -= min(r_l, t // 2)
        out.append(t)
    return out


def achieved_ratio(num_patches: int, depth: int, r: int | Sequence[int]) -> float:
    """1 - mean(token_schedule) / N."""
    return 1 - sum(token_schedule(num_patches, depth, r)) / (depth * num_patches)


def r_for_ratio(ratio: float, num_patches: int, depth: int) -> int:
    """The constant r whose achieved ratio is closest to ``ratio``."""
    return min(range(num_patches + 1), key=lambda r: (abs(achieved_ratio(num_patches, depth, r) - ratio), r))


def r_schedule_for_ratio(ratio: float, num_patches: int, depth: int) -> list[int]:
    """Per-block merge counts: the largest constant r not above ``ratio``, plus one more merge in
    the first blocks, as many as needed to reach it (or the ceiling of what merging allows)."""
    r = max([k for k in range(num_patches + 1) if achieved_ratio(num_patches, depth, k) <= ratio] or [0])
    rs = [r] * depth
    for layer in range(depth):
        if achieved_ratio(num_patches, depth, rs) >= ratio - 1e-9:
            break
        rs[layer] += 1
    best = min([rs, [r] * depth], key=lambda s: abs(achieved_ratio(num_patches, depth, s) - ratio))
    return best
