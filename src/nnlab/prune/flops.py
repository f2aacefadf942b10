"""Analytic FLOP counts of a ViT run on a given number of tokens per block.

Counts are multiply-accumulates (MACs) of the matrix products, the convention of fvcore and of
the ViT-pruning papers ("GFLOPs" = 1e9 MACs); LayerNorm, softmax, GELU and additions are left
out. Validated against ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 per MAC) in
tests/test_prune.py.
"""
from __future__ import annotations

from typing import Sequence

from nnlab.models.vit import ViTConfig


def block_macs(dim: int, heads: int, head_dim: int, mlp_dim: int, attn_tokens: float,
               mlp_tokens: float) -> float:
    """MACs of one pre-norm block whose attention sees ``attn_tokens`` tokens (queries = keys)
    and whose MLP sees ``mlp_tokens`` tokens (fewer when tokens go between attention and MLP)."""
    width = heads * head_dim
    qkv = attn_tokens * dim * 3 * width
    scores_and_mix = 2 * attn_tokens * attn_tokens * width   # q k^T and probs v
    proj = attn_tokens * width * dim
    mlp = 2 * mlp_tokens * dim * mlp_dim
    return qkv + scores_and_mix + proj + mlp


def embed_macs(config: ViTConfig) -> float:
    """MACs of the patch embedding: the patch-size convolution, or the conv stem (3x3 stride-2
    convolutions, BatchNorm folded) and its 1x1 projection to ``dim``."""
    c = config
    if not c.stem:
        return c.num_patches * c.in_chans * c.patch_size ** 2 * c.dim
    total, size, prev = 0.0, c.image_size, c.in_chans
    for ch in c.stem:
        size = (size + 1) // 2
        total += size * size * prev * ch * 9
        prev = ch
    return total + c.num_patches * prev * c.dim


def vit_macs(config: ViTConfig, attn_tokens: Sequence[float] | None = None,
             mlp_tokens: Sequence[float] | None = None, extra: float = 0.0,
             heads: Sequence[int] | None = None) -> float:
    """MACs of one image through a ViT. Token counts include CLS; default: all 1 + N everywhere.

    attn_tokens[i] / mlp_tokens[i]: tokens in block i's attention / MLP (lists of length depth).
    extra: MACs of a method's own work (e.g. ToMe's similarity products). heads[i]: heads block i
    computes (default: all; CP-ViT removes some).
    """
    c = config
    full = [1 + c.num_patches] * c.depth
    attn_tokens = list(attn_tokens) if attn_tokens is not None else full
    mlp_tokens = list(mlp_tokens) if mlp_tokens is not None else list(attn_tokens)
    embed = embed_macs(c)
    heads = list(heads) if heads is not None else [c.heads] * c.depth
    blocks = sum(block_macs(c.dim, heads[i], c.head_dims[i], c.mlp_dims[i], attn_tokens[i], mlp_tokens[i])
                 for i in range(c.depth))
    return embed + blocks + c.dim * c.num_classes + extra


def gflops(macs: float) -> float:
    """MACs -> "GFLOPs" as reported in the tables (1e9 MACs)."""
    return macs / 1e9
