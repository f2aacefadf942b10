"""AP-ViT: small keep/prune agents that drop tokens, trained from the reward of dropping one.

Agents sit in front of chosen blocks (:func:`agent_positions`, three spread over the depth by
default). An agent reads every token (with the CLS token as context) and outputs the probability
that dropping the token is harmless. It is trained offline on a frozen ViT: the reward of dropping
token j at position p is ``P(true class | j removed from block p on) - P(true class | all tokens)``
(:func:`drop_rewards`), turned into a target in [0, 1] by its rank among all measured rewards
(:func:`rank_targets`; ``soft_targets`` is the sigmoid alternative). At inference a token
goes when its probability exceeds a threshold; :func:`threshold_for_ratio` picks the threshold
that meets a target ratio from a measured threshold -> ratio table.

"Pruning ratio" for AP-ViT: the fraction of patch tokens removed, averaged over the blocks, as for
the other token methods. Two ways to batch (``APViTOptions.fixed_count``):

* per image by threshold, as in APT: the number of kept tokens varies, batches are gathered to
  the largest count and padding is masked out of attention (:func:`compact`, :func:`padding_bias`),
  so the padding is computed (and counted in the FLOPs);
* fixed count (nnlab's default): after each agent every image keeps the same number of patches,
  its lowest-probability ones (:func:`keep_lowest`), the count being the mean the calibrated
  threshold keeps on the calibration images. Which tokens go still differs per image; how many
  does not, so there is no padding and no mask, and the fused attention kernel runs: AP-ViT is then
  never slower than the unpruned model for want of batching.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnlab.prune.tokens import take


class Agent(nn.Module):
    """Tokens (B, T, D), CLS first -> prune logits (B, T) (sigmoid = probability of dropping).

    fc1 reads [token, CLS] (2D inputs); it is computed as ``token @ W_tok + CLS @ W_cls`` so that the
    CLS half is one product per image, not per token (:meth:`forward_reference` is the concat form)."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(2 * dim, hidden), nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        d = h.shape[-1]
        z = F.linear(h, self.fc1.weight[:, :d], self.fc1.bias) + F.linear(h[:, :1], self.fc1.weight[:, d:])
        return self.fc2(F.gelu(z)).squeeze(-1)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain form: fc1 on the concatenation [token, CLS] of every token."""
        h = self.norm(x)
        h = torch.cat([h, h[:, :1].expand_as(h)], dim=-1)
        return self.fc2(F.gelu(self.fc1(h))).squeeze(-1)

    def macs(self, tokens: float, images: float) -> float:
        """MACs of :meth:`forward` on ``tokens`` tokens of ``images`` images (CLS half once per image)."""
        hidden, d = self.fc1.out_features, self.fc1.in_features // 2
        return tokens * (d * hidden + hidden) + images * d * hidden


def new_agents(dim: int, hidden: int, count: int, device: torch.device | str = "cpu") -> nn.ModuleList:
    """``count`` freshly initialised agents for tokens of width ``dim``, on ``device``."""
    return nn.ModuleList(Agent(dim, hidden) for _ in range(count)).to(device)


def agent_positions(depth: int, count: int = 3) -> list[int]:
    """Blocks the agents sit in front of: ``count`` spread from block 1 to the last block."""
    if depth < 2:
        return []
    if count == 1:
        return [1]
    return sorted({1 + (depth - 2) * i // (count - 1) for i in range(count)})


def drop_rewards(p_full: torch.Tensor, p_dropped: torch.Tensor) -> torch.Tensor:
    """p_full (B,): true-class probability with all tokens; p_dropped (B, K): with one candidate
    token removed each -> rewards (B, K) = p_dropped - p_full (>= 0: dropping does not hurt)."""
    return p_dropped - p_full[:, None]


def soft_targets(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """Rewards (B, K) -> probability targets (B, K) that dropping is right: sigmoid(reward / tau)."""
    return torch.sigmoid(rewards / max(tau, 1e-12))


def rank_targets(rewards: torch.Tensor) -> torch.Tensor:
    """Rewards (B, K) -> targets (B, K) in [0, 1]: each reward's rank among all of them (ties share
    the mean rank), so the agent learns a calibrated "how safe is this drop" and a threshold t
    drops roughly the (1 - t) safest fraction at each agent."""
    flat = rewards.flatten()
    order = flat.argsort(stable=True)
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), dtype=flat.dtype)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    mean_rank = torch.zeros_like(uniq).index_add_(0, inverse, ranks) / torch.bincount(inverse).to(flat.dtype)
    return (mean_rank[inverse] / max(flat.numel() - 1, 1)).view_as(rewards)


def without_token(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), drop (B, K) token indices -> (B * K, T - 1, D): copy k of image b lacks token
    drop[b, k]."""
    b, t, d = x.shape
    k = drop.shape[1]
    keep = torch.ones(b, k, t, dtype=torch.bool, device=x.device)
    keep.scatter_(2, drop[..., None], False)
    xs = x[:, None].expand(b, k, t, d)[keep]
    return xs.view(b * k, t - 1, d)


def compact(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept tokens to the front. x (B, T, D), keep (B, T) bool (CLS must be kept) ->
    (x (B, T', D), valid (B, T') bool) with T' = the largest kept count in the batch."""
    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    t = int(keep.sum(1).max())
    idx = order[:, :t]
    return take(x, idx), keep.gather(1, idx)


def keep_lowest(x: torch.Tensor, prob: torch.Tensor, count: int) -> torch.Tensor:
    """Keep CLS and the ``count`` patches with the lowest drop probability, in their original order.
    x (B, T, D), prob (B, T) -> (B, 1 + count, D)."""
    idx = prob[:, 1:].topk(count, dim=1, largest=False).indices.sort(dim=1).values + 1
    idx = torch.cat([torch.zeros_like(idx[:, :1]), idx], dim=1)
    return take(x, idx)


def keep_lowest_reference(x: torch.Tensor, prob: torch.Tensor, count: int) -> torch.Tensor:
    """Loop-per-image version of :func:`keep_lowest` (ties to the lower position)."""
    out = []
    for b in range(x.shape[0]):
        order = sorted(range(1, x.shape[1]), key=lambda j: (float(prob[b, j]), j))[:count]
        out.append(x[b, [0] + sorted(order)])
    return torch.stack(out)


def padding_bias(valid: torch.Tensor) -> torch.Tensor | None:
    """valid (B, T) -> additive attention bias (B, 1, 1, T): -inf on padding; None if no padding."""
    if bool(valid.all()):
        return None
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(
        ~valid, float("-inf"))[:, None, None]


def threshold_for_ratio(thresholds: Sequence[float], ratios: Sequence[float], target: float) -> float:
    """The threshold whose measured ratio is closest to ``target`` (ties: the larger threshold)."""
    pairs = sorted(zip(thresholds, ratios), key=lambda tr: (abs(tr[1] - target), -tr[0]))
    return float(pairs[0][0])
