"""Plain per-image references of the token runners (:mod:`nnlab.prune.runners`), written from the
papers with loops and no batching, for the agreement tests.

They pin the defining mechanisms: CP-ViT's score of a token is the attention it *receives*
(column mass: a sum over queries and heads), accumulated over layers by token identity, and a
pruned patch never returns; a removed head contributes nothing (its output-projection columns are
skipped, not its output zeroed after the fact); ToMe merges by bipartite soft matching on the keys and attends with
proportional attention (log of token sizes added to the logits).

Shapes: one image (C, H, W) at a time; tokens (T, D) lists; logits (num_classes,).
"""
from __future__ import annotations

import torch

from nnlab.models.vit import Block, ViT


def _heads(block: Block, h: torch.Tensor) -> tuple[list, list, list]:
    """Per-head q, k, v (each a list of H tensors (T, d)) of normed tokens h (T, D)."""
    a = block.attn
    qkv = h @ a.qkv.weight.T + a.qkv.bias                     # (T, 3 * H * d)
    d, heads = a.head_dim, a.heads
    part = lambda i, j: qkv[:, (i * heads + j) * d:(i * heads + j + 1) * d]  # noqa: E731
    return ([part(0, j) for j in range(heads)], [part(1, j) for j in range(heads)],
            [part(2, j) for j in range(heads)])


def _attend(block: Block, heads: tuple[list, list, list], log_size: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention output (T, D) and each head's probabilities (T queries, T keys), from the
    per-head q, k, v of :func:`_heads`."""
    q, k, v = heads
    outs, probs = [], []
    for qh, kh, vh in zip(q, k, v):
        logits = qh @ kh.T * block.attn.scale
        if log_size is not None:
            logits = logits + log_size[None, :]
        p = torch.softmax(logits, dim=-1)
        probs.append(p)
        outs.append(p @ vh)
    return block.attn.proj(torch.cat(outs, -1)), probs


def _attend_heads(block: Block, heads: tuple[list, list, list], use: list[int]
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention output (T, D) of heads ``use`` alone: the sum of each head's ``probs @ v`` through
    its own columns of the output projection, plus the bias; and those heads' probabilities."""
    q, k, v = heads
    a, d = block.attn, block.attn.head_dim
    out, probs = a.proj.bias.expand(q[0].shape[0], -1), []
    for j in use:
        p = torch.softmax(q[j] @ k[j].T * a.scale, dim=-1)
        probs.append(p)
        out = out + (p @ v[j]) @ a.proj.weight[:, j * d:(j + 1) * d].T
    return out, probs


def cpvit_reference(vit: ViT, image: torch.Tensor, keep: list[int], heads: list[list[int]] | None = None
                    ) -> tuple[torch.Tensor, list[list[int]], list[list[float]]]:
    """CP-ViT on one image: logits; per block, the original patch ids kept in its MLP (sorted);
    and per block each computed head's score (attention on keys, averaged over queries, weighted by
    the keys' normalised cumulative scores). ``heads``: per block the head ids computed (all if None)."""
    x = vit.embed(image[None])[0]
    ids = list(range(x.shape[0]))                               # 0 = CLS, 1..N patches
    score = {i: 0.0 for i in ids}
    kept, head_scores = [], []
    for layer, block in enumerate(vit.blocks):
        use = heads[layer] if heads is not None else list(range(block.attn.heads))
        out, probs = _attend_heads(block, _heads(block, block.norm1(x)), use)
        x = x + out
        for col, tok in enumerate(ids):                          # attention received by key `tok`
            score[tok] += sum(float(p[qi, col]) for p in probs for qi in range(len(ids)))
        total = sum(score[t] for t in ids)
        head_scores.append([sum(float(p[:, col].mean()) * score[tok] / total for col, tok in enumerate(ids))
                            for p in probs])
        n_keep = min(keep[layer], len(ids) - 1)
        best = sorted(ids[1:], key=lambda t: -score[t])[:n_keep]
        rows = [0] + [ids.index(t) for t in sorted(best)]
        x, ids = x[rows], [ids[r] for r in rows]
        x = x + block.mlp(block.norm2(x))
        kept.append(ids[1:])
    return vit.classify(x[None])[0], kept, head_scores


def tome_reference(vit: ViT, image: torch.Tensor, r: list[int]) -> torch.Tensor:
    """ToMe on one image: per block attention with proportional attention, then merge ``r[l]``
    tokens by bipartite soft matching (set A: even positions with CLS, which never merges; B: odd),
    size-weighted averages; the MLP runs on the merged tokens. Returns the logits."""
    x = vit.embed(image[None])[0]
    size = torch.ones(x.shape[0])
    for layer, block in enumerate(vit.blocks):
        heads = _heads(block, block.norm1(x))
        out, _ = _attend(block, heads, size.log())
        keys = torch.stack(heads[1]).mean(0)                            # (T, d): keys averaged over heads
        x = x + out
        t = x.shape[0]
        n = min(r[layer], (t + 1) // 2 - 1)
        if n > 0:
            x, size = _merge_one(x, size, keys, n)
        x = x + block.mlp(block.norm2(x))
    return vit.classify(x[None])[0]


def _merge_one(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = list(range(0, x.shape[0], 2)), list(range(1, x.shape[0], 2))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best = {}
    for i in a[1:]:                                            # CLS (a[0]) never merges
        sims = [float(unit[i] @ unit[j]) for j in b]
        j = max(range(len(b)), key=lambda m: sims[m])
        best[i] = (sims[j], b[j])
    merged = sorted(best, key=lambda i: -best[i][0])[:n]
    tokens = {j: (x[j] * size[j], float(size[j])) for j in b}
    for i in merged:
        mass, s = tokens[best[i][1]]
        tokens[best[i][1]] = (mass + x[i] * size[i], s + float(size[i]))
    stay = [i for i in a if i not in merged]
    new_x = [x[i] for i in stay] + [tokens[j][0] / tokens[j][1] for j in b]
    new_size = [float(size[i]) for i in stay] + [tokens[j][1] for j in b]
    return torch.stack(new_x), torch.tensor(new_size)

