"""Modules that run a :class:`~nnlab.models.vit.ViT` with fewer tokens (the module-side code).

Each runner wraps an unmodified ViT and applies a method's pure functions between its blocks.
Tokens are *removed* (gathered into a shorter sequence), so the blocks do less work. Every runner
records the tokens each block processed, for FLOP counts (:meth:`TokenRunner.macs`).

Shapes: images (B, C, H, W) -> logits (B, num_classes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nnlab.models.vit import Attention, ViT
from nnlab.prune import apvit, cpvit, kernels, tokens, tome
from nnlab.prune.flops import vit_macs


@dataclass
class TokenCounts:
    """Mean tokens per image (CLS included) in each block's attention and MLP."""

    attn: list[float]
    mlp: list[float]


class TokenRunner(nn.Module):
    """Base: runs the ViT unchanged (fast attention) and records token counts."""

    method = "base"

    def __init__(self, vit: ViT):
        super().__init__()
        self.vit = vit.eval()
        self.reset_stats()

    def reset_stats(self) -> None:
        depth = self.vit.config.depth
        self._attn, self._mlp, self._images = [0.0] * depth, [0.0] * depth, 0
        self._extra = 0.0  # MACs of a method's own work (matching, agents), summed over images

    def _record(self, layer: int, batch: int, attn_tokens: float, mlp_tokens: float) -> None:
        self._attn[layer] += batch * attn_tokens
        self._mlp[layer] += batch * mlp_tokens
        if layer == 0:
            self._images += batch

    def token_counts(self) -> TokenCounts:
        n = max(self._images, 1)
        return TokenCounts([a / n for a in self._attn], [m / n for m in self._mlp])

    def achieved_ratio(self) -> float:
        """1 - mean over blocks of (patches in the block's MLP) / N, from the recorded runs."""
        n = self.vit.config.num_patches
        mlp = self.token_counts().mlp
        return 1.0 - sum(t - 1 for t in mlp) / (len(mlp) * n)

    def extra_macs(self) -> float:
        """Mean MACs per image of the method's own work (LayerNorm and GELU left out, as elsewhere)."""
        return self._extra / max(self._images, 1)

    def block_heads(self) -> list[int]:
        """Heads each block computes (all of them unless a method removes heads)."""
        return [self.vit.config.heads] * self.vit.config.depth

    def heads_kept(self) -> float:
        """Fraction of head computations done, averaged over blocks (1.0: every head kept)."""
        return sum(self.block_heads()) / (self.vit.config.heads * self.vit.config.depth)

    def macs(self) -> float:
        """Mean MACs per image over the recorded runs."""
        counts = self.token_counts()
        return vit_macs(self.vit.config, counts.attn, counts.mlp, self.extra_macs(), heads=self.block_heads())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        for layer, block in enumerate(self.vit.blocks):
            x = block(x)
            self._record(layer, x.shape[0], x.shape[1], x.shape[1])
        return self.vit.classify(x)

    def spec(self) -> dict:
        """What, besides the ViT weights, rebuilds this runner (saved with pruned models)."""
        return {}


def slice_heads(attn: Attention, keep: list[int]) -> Attention:
    """A copy of ``attn`` with only heads ``keep``: their q/k/v rows (layout [q heads | k heads |
    v heads], ``head_dim`` rows each) and output-projection columns; the scale stays."""
    d, h = attn.head_dim, attn.heads
    new = Attention(attn.proj.out_features, len(keep), d, 1)
    new.scale = attn.scale
    rows = torch.cat([torch.arange((part * h + j) * d, (part * h + j + 1) * d) for part in range(3) for j in keep])
    cols = torch.cat([torch.arange(j * d, (j + 1) * d) for j in keep])
    with torch.no_grad():
        new.qkv.weight.copy_(attn.qkv.weight[rows])
        new.qkv.bias.copy_(attn.qkv.bias[rows])
        new.proj.weight.copy_(attn.proj.weight[:, cols])
        new.proj.bias.copy_(attn.proj.bias)
    return new.to(attn.qkv.weight.device)


class CPViTRunner(TokenRunner):
    """CP-ViT: cumulative attention scores; block l's MLP keeps ``keep[l]`` patches (+ CLS).
    ``heads`` (optional): per block the head ids it keeps; the others are removed from the weights
    (:func:`slice_heads`), so their q/k/v and projection work is skipped. ``kept``: after a forward,
    per pruning block the original positions (B, 1 + keep) it kept (0 = CLS). With ``collect``
    on, every block scores its heads (:func:`cpvit.head_scores` with the cumulative patch scores)
    and ``head_sums`` (per block (H,)) adds them up over the images seen: the calibration pass."""

    method = "cp-vit"

    def __init__(self, vit: ViT, keep: list[int], heads: list[list[int]] | None = None):
        super().__init__(vit)
        self.keep = [int(k) for k in keep]
        prev, self.last = vit.config.num_patches, -1
        for layer, k in enumerate(self.keep):
            if k < prev:
                self.last, prev = layer, k
        full = list(range(vit.config.heads))
        self.heads = [sorted(int(h) for h in hs) for hs in heads] if heads is not None else None
        self.sliced = nn.ModuleDict({str(layer): slice_heads(block.attn, hs) for layer, (block, hs) in
                                     enumerate(zip(vit.blocks, self.heads or [])) if hs != full})
        self.collect, self.head_sums = False, [torch.zeros(vit.config.heads) for _ in vit.blocks]

    def block_heads(self) -> list[int]:
        return [len(h) for h in self.heads] if self.heads is not None else super().block_heads()

    def _attention(self, layer: int) -> Attention:
        return self.sliced[str(layer)] if str(layer) in self.sliced else self.vit.blocks[layer].attn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        scores = x.new_zeros(x.shape[:2])
        ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)  # original positions
        self.kept = []
        for layer, block in enumerate(self.vit.blocks):
            attn = self._attention(layer)
            if layer > self.last and not self.collect:  # no pruning left: the fused attention
                x = x + attn(block.norm1(x))
                x = x + block.mlp(block.norm2(x))
                self._record(layer, x.shape[0], x.shape[1], x.shape[1])
                continue
            out, probs = attn.forward_with_probs(block.norm1(x))
            x, t_attn = x + out, x.shape[1]
            scores = scores + cpvit.column_mass(probs)
            if self.collect:
                self.head_sums[layer] += cpvit.head_scores(probs, scores).sum(0).cpu()
            if self.keep[layer] < x.shape[1] - 1:
                idx = cpvit.top_patches(scores, self.keep[layer])
                x = tokens.take(x, idx)
                scores, ids = scores.gather(1, idx), ids.gather(1, idx)
            self.kept.append(ids)
            x = x + block.mlp(block.norm2(x))
            self._record(layer, x.shape[0], t_attn, x.shape[1])
        return self.vit.classify(x)

    def spec(self) -> dict:
        return {"keep": self.keep, "heads": self.heads}


class ToMeRunner(TokenRunner):
    """ToMe: merge ``r`` tokens per block (``r[l]`` in block l when a list) between attention and
    MLP, with proportional attention."""

    method = "tome"

    def __init__(self, vit: ViT, r: int | list[int]):
        super().__init__(vit)
        depth = vit.config.depth
        self.r = [int(r)] * depth if isinstance(r, int) else [int(v) for v in r]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        size, bias = x.new_ones(x.shape[0], x.shape[1], 1), None
        for layer, block in enumerate(self.vit.blocks):
            out, keys = block.attn.forward_with_keys(block.norm1(x), bias)
            x, t_attn = x + out, x.shape[1]
            r = min(self.r[layer], (t_attn + 1) // 2 - 1)
            if r > 0:
                plan = tome.bipartite_soft_matching(keys, r)
                x, size = kernels.merge_weighted(x, size, plan)  # fused on CPU, else tome.merge_weighted
                bias = tome.size_bias(size)
                self._extra += x.shape[0] * ((t_attn + 1) // 2) * (t_attn // 2) * keys.shape[-1]
            x = x + block.mlp(block.norm2(x))
            self._record(layer, x.shape[0], t_attn, x.shape[1])
        return self.vit.classify(x)

    def spec(self) -> dict:
        return {"r": self.r}


class APViTRunner(TokenRunner):
    """AP-ViT: agents in front of blocks ``positions`` drop tokens. By threshold (``counts`` None):
    a token goes when its prune probability exceeds ``threshold``; per-image counts vary, so a
    batch is gathered to its largest count and the padding is masked in attention. With ``counts``
    (patches kept after each agent): every image keeps that many, its lowest-probability patches,
    with no padding (:func:`nnlab.prune.apvit.keep_lowest`). FLOPs (:meth:`macs`) count the padded
    length each block really computes; :meth:`achieved_ratio` counts the tokens each image kept."""

    method = "ap-vit"

    def __init__(self, vit: ViT, agents: nn.ModuleList, positions: list[int], threshold: float,
                 counts: list[int] | None = None):
        super().__init__(vit)
        self.agents, self.positions, self.threshold = agents, [int(p) for p in positions], float(threshold)
        self.counts = [int(c) for c in counts] if counts is not None else None

    def reset_stats(self) -> None:
        super().reset_stats()
        self._valid = [0.0] * self.vit.config.depth  # tokens per image without padding, summed over images

    def achieved_ratio(self) -> float:
        """1 - mean over blocks of (patches each image kept) / N (padding not counted)."""
        n, images = self.vit.config.num_patches, max(self._images, 1)
        return 1.0 - sum(v / images - 1 for v in self._valid) / (len(self._valid) * n)

    def _drop(self, i: int, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Agent ``i`` on tokens x (B, T, D) with validity (B, T) -> the kept tokens and validity."""
        if self.counts is not None and self.counts[i] >= x.shape[1] - 1:
            return x, valid  # an agent that would drop nothing is not run: its cost would be pure loss
        agent = self.agents[i]
        prob = torch.sigmoid(agent(x))
        self._extra += agent.macs(float(valid.sum()), x.shape[0])
        if self.counts is not None:
            x = apvit.keep_lowest(x, prob, min(self.counts[i], x.shape[1] - 1))
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        keep = valid & (prob <= self.threshold)
        keep[:, 0] = True
        return apvit.compact(x, keep)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        bias = None
        for layer, block in enumerate(self.vit.blocks):
            if layer in self.positions:
                x, valid = self._drop(self.positions.index(layer), x, valid)
                bias = apvit.padding_bias(valid)
            x = block(x, bias)
            self._valid[layer] += float(valid.sum())
            self._record(layer, x.shape[0], x.shape[1], x.shape[1])  # the padded length is computed
        return self.vit.classify(x)

    def kept_per_agent(self) -> list[float]:
        """Mean tokens per image (CLS included) right after each agent, from the recorded runs."""
        images = max(self._images, 1)
        return [self._valid[p] / images for p in self.positions]

    def spec(self) -> dict:
        return {"positions": self.positions, "threshold": self.threshold, "counts": self.counts}


class PViTRunner(TokenRunner):
    """P-ViT: a physically slimmed ViT (all tokens), remembering which dimensions it kept."""

    method = "p-vit"

    def __init__(self, vit: ViT, attn_keep: list[list[int]], mlp_keep: list[list[int]]):
        super().__init__(vit)
        self.attn_keep, self.mlp_keep = attn_keep, mlp_keep

    def spec(self) -> dict:
        return {"attn_keep": self.attn_keep, "mlp_keep": self.mlp_keep}
