"""P-ViT (Vision Transformer Pruning, Zhu et al. 2021): gate scores and the global threshold.

Pure functions. Each block gets two gate vectors (module side: :mod:`nnlab.prune.slim`):

* ``attn`` (head_dim,): one gate per q/k/v dimension, shared by q, k, v and by all heads, so the
  slimmed block keeps a uniform (smaller) head width and batched attention;
* ``mlp`` (mlp_dim,): one gate per MLP hidden unit (applied after GELU).

Gates train with the task loss plus ``l1_weight * sum |g|``; a single global threshold on |g|,
the ``ratio``-quantile of all gates pooled, decides which dimensions go ("pruning ratio" =
fraction of all gates removed).
"""
from __future__ import annotations

from typing import Sequence

import torch


def l1_penalty(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of |g| over all gate vectors (a 0-d tensor)."""
    return sum(g.abs().sum() for g in gates)  # type: ignore[return-value]


def global_threshold(gates: Sequence[torch.Tensor], ratio: float) -> float:
    """The |g| value below which ``ratio`` of all pooled gates fall (ratio in [0, 1))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    pooled = torch.cat([g.detach().abs().flatten() for g in gates])
    k = int(round(ratio * pooled.numel()))
    if k == 0:
        return float("-inf")
    return float(pooled.sort().values[k - 1])


def kept_indices(gate: torch.Tensor, threshold: float, min_keep: int = 1) -> torch.Tensor:
    """Indices (K,) of gate (D,) entries with |g| > threshold, ascending; at least the
    ``min_keep`` largest."""
    mag = gate.detach().abs()
    idx = torch.nonzero(mag > threshold).flatten()
    if idx.numel() < min_keep:
        idx = mag.topk(min_keep).indices
    return idx.sort().values


def select(gates_attn: Sequence[torch.Tensor], gates_mlp: Sequence[torch.Tensor], ratio: float
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept indices per block for attention dims and MLP units under one global threshold."""
    t = global_threshold(list(gates_attn) + list(gates_mlp), ratio)
    return [kept_indices(g, t) for g in gates_attn], [kept_indices(g, t) for g in gates_mlp]
