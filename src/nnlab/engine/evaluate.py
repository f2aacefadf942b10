"""Evaluation of a classifier: loss and top-k accuracy over a loader (reduced over ranks under
torchrun), with the plain top-k reference beside the fast count."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nnlab.data import BatchLoader
from nnlab.engine import distributed as D
from nnlab.engine.precision import bf16_autocast


@dataclass
class EvalResult:
    """Mean cross-entropy loss and top-1 / top-5 accuracy (fractions in [0, 1]) over ``count`` images."""

    loss: float
    top1: float
    top5: float
    count: int


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """Number of rows of logits (B, K) whose label y (B,) is among the top-k scores, for each k
    (k is clamped to K). Ties are broken by ``torch.topk``'s order."""
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(y[:, None])  # (B, kmax)
    cum = hit.cumsum(1).clamp_(max=1).sum(0)  # (kmax,) rows hit within the first j+1
    return [int(cum[min(k, kmax) - 1]) for k in ks]


def topk_correct_reference(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """Plain reference of :func:`topk_correct`: per row, count classes scoring above the label."""
    out = []
    for k in ks:
        k = min(k, logits.shape[1])
        n = 0
        for row, label in zip(logits, y):
            n += int((row > row[label]).sum()) < k
        out.append(n)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: str | torch.device = "cpu", *,
             reduce: bool = True, autocast: bool = False) -> EvalResult:
    """Loss and accuracy of ``model`` (eval mode, restored after) over ``loader``'s (x (B, C, H, W),
    y (B,)) batches. Under torchrun with ``reduce``, sums are added over ranks first (each rank
    passing its own shard), so every rank gets the result over the whole set."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, count
    ctx = bf16_autocast(autocast, device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx:
            logits = model(x)
        logits = logits.float()
        c1, c5 = topk_correct(logits, y, (1, 5))
        loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
        sums += torch.tensor([loss, c1, c5, len(y)], dtype=torch.float64)
    model.train(was_training)
    if reduce:
        D.all_reduce_sum(sums)
    n = max(1.0, float(sums[3]))
    return EvalResult(float(sums[0]) / n, float(sums[1]) / n, float(sums[2]) / n, int(sums[3]))
