"""Build a pruned model for each method and ratio from a base ViT and calibration data.

Each ``build_*`` returns a :class:`~nnlab.prune.runners.TokenRunner` (for P-ViT: a base runner over
the slimmed ViT) ready to evaluate and time. Expensive, ratio-independent preparation (P-ViT gate
training, AP-ViT agent training and threshold table, CP-ViT attention ranges) is done once by the
``prepare_*`` functions and reused across ratios.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnlab.models.vit import ViT
from nnlab.prune import apvit, cpvit, pvit, tome
from nnlab.prune.common import check_loss, check_weights, fit, model_device
from nnlab.prune.runners import APViTRunner, CPViTRunner, PViTRunner, ToMeRunner, TokenRunner
from nnlab.prune.slim import Gates, attach_gates, slim_vit


# ----------------------------------------------------------------------------- CP-ViT


@torch.no_grad()
def attention_ranges(vit: ViT, x: torch.Tensor, batch_size: int = 128) -> list[float]:
    """Mean attention range of each block (:func:`cpvit.attention_range`) over images x (B, C, H, W)."""
    totals = [0.0] * vit.config.depth
    for start in range(0, x.shape[0], batch_size):
        t = vit.embed(x[start:start + batch_size])
        for layer, block in enumerate(vit.blocks):
            out, probs = block.attn.forward_with_probs(block.norm1(t))
            totals[layer] += float(cpvit.attention_range(cpvit.column_mass(probs)[:, 1:]).sum())
            t = t + out
            t = t + block.mlp(block.norm2(t))
    return [s / x.shape[0] for s in totals]


@dataclass
class CPViTOptions:
    """Head pruning of CP-ViT (the heads of the PH-region; patches are always pruned)."""

    heads: bool = True       # prune heads as well as patches
    head_share: float = 0.5  # heads' target ratio = head_share x the patch ratio (layer-aware cascade)


@torch.no_grad()
def head_importance(vit: ViT, keep: list[int], x: torch.Tensor, batch_size: int = 128) -> list[torch.Tensor]:
    """Per block (H,): head scores summed over images x (B, C, H, W) on the patch-pruned forward
    with ``keep`` (:class:`CPViTRunner` in collect mode)."""
    run = CPViTRunner(vit, keep)
    run.collect = True
    for start in range(0, x.shape[0], batch_size):
        run(x[start:start + batch_size])
    return run.head_sums


def build_cpvit(vit: ViT, ratio: float, ranges: list[float], calib_x: torch.Tensor | None = None,
                options: CPViTOptions | None = None) -> CPViTRunner:
    """CP-ViT runner whose cascade meets ``ratio`` (mean fraction of patches removed per block).
    With ``options.heads`` (and calibration images ``calib_x``), each block also keeps only its
    best heads (:func:`head_importance`), as many as a cascade towards ``head_share * ratio`` allows."""
    options = options or CPViTOptions()
    n, h = vit.config.num_patches, vit.config.heads
    keep = cpvit.keep_counts(cpvit.cascade_ratios(ratio, ranges, 1 - 1 / n), n)
    if not options.heads or calib_x is None or h == 1 or options.head_share * ratio <= 0:
        return CPViTRunner(vit, keep)
    counts = cpvit.head_keep_counts(cpvit.cascade_ratios(options.head_share * ratio, ranges, 1 - 1 / h), h)
    sums = head_importance(vit, keep, calib_x)
    return CPViTRunner(vit, keep, [cpvit.select_heads(s, k) for s, k in zip(sums, counts)])


# ----------------------------------------------------------------------------- ToMe


def build_tome(vit: ViT, ratio: float) -> ToMeRunner:
    c = vit.config
    return ToMeRunner(vit, tome.r_schedule_for_ratio(ratio, c.num_patches, c.depth))


# ----------------------------------------------------------------------------- P-ViT


@dataclass
class PViTOptions:
    """Gate training (sparsity) and the optional fine-tuning after slimming."""

    gate_epochs: int = 3        # epochs of joint weight + gate training
    gate_lr: float = 1e-4       # weights (fine-tuned gently) and gates train together, as in VTP
    gate_gate_lr: float = 1e-2  # gates learn faster than the weights
    l1_weight: float = 1e-4     # L1 weight on the gates
    finetune_epochs: int = 0    # fine-tuning epochs after slimming
    finetune_lr: float = 2e-4   # learning rate of that fine-tuning
    train_limit: int | None = None  # train on N random train images (seeded; faster gate training)


def train_gates(vit: ViT, batches, options: PViTOptions) -> tuple[ViT, Gates]:
    """Copy ``vit``, attach gates and train weights + gates with CE + l1_weight * sum |g|."""
    model = copy.deepcopy(vit)
    gates = attach_gates(model)
    params = [{"params": list(model.parameters()), "lr": options.gate_lr},
              {"params": gates.all(), "lr": options.gate_gate_lr, "weight_decay": 0.0}]
    opt, device = torch.optim.AdamW(params), model_device(model)
    for epoch in range(options.gate_epochs):
        model.train()
        for x, y in tqdm(batches(epoch), desc=f"p-vit gates {epoch + 1}/{options.gate_epochs}", leave=False,
                         disable=None):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y) + options.l1_weight * pvit.l1_penalty(gates.all())
            check_loss(loss, "p-vit gate training", "--pvit-gate-lr / --pvit-gate-gate-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    check_weights(model.parameters(), "p-vit gate training", "--pvit-gate-lr / --pvit-gate-gate-lr")
    return model.eval(), gates


def build_pvit(gated: ViT, gates: Gates, ratio: float, batches=None,
               options: PViTOptions | None = None) -> TokenRunner:
    """Slim the gated model at ``ratio`` (global threshold), optionally fine-tune it."""
    attn_keep, mlp_keep = pvit.select(list(gates.attn), list(gates.mlp), ratio)
    slim = slim_vit(gated, gates, attn_keep, mlp_keep)
    options = options or PViTOptions()
    if batches is not None and options.finetune_epochs > 0:
        fit(slim, slim.parameters(), batches, epochs=options.finetune_epochs, lr=options.finetune_lr,
            loss_fn=lambda m, x, y: F.cross_entropy(m(x), y), desc="p-vit finetune",
            lr_flag="--pvit-finetune-lr")
    return PViTRunner(slim.eval(), [k.tolist() for k in attn_keep], [k.tolist() for k in mlp_keep])


def pvit_ratio_of(runner: TokenRunner, base: ViT) -> float:
    """Achieved P-ViT ratio: fraction of gated units (q/k/v dims + MLP units) removed."""
    b, s = base.config, runner.vit.config
    return 1.0 - (sum(s.head_dims) + sum(s.mlp_dims)) / (sum(b.head_dims) + sum(b.mlp_dims))


# ----------------------------------------------------------------------------- AP-ViT


@dataclass
class APViTOptions:
    agents: int = 3             # agents, spread over the blocks
    hidden: int = 64            # hidden width of each agent's MLP
    candidates: int = 16        # tokens per image whose drop reward is measured
    epochs: int = 30            # agent training epochs
    lr: float = 3e-3            # agent learning rate
    fixed_count: bool = True    # every image keeps the same number of patches per agent (no padding; off: APT's per-image threshold)
    joint_epochs: int = 1       # ap-vit-joint: epochs of APT's joint training of the agents with a backbone copy
    joint_lr: float = 1e-4      # backbone learning rate of that joint training (agents: lr)
    joint_train_limit: int | None = None  # joint training on N random train images (seeded)
    thresholds: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])  # rows of the threshold table (the seed's Table 2)


@torch.no_grad()
def tokens_at(vit: ViT, x: torch.Tensor, position: int) -> torch.Tensor:
    """Tokens (B, T, D) entering block ``position`` of images x (B, C, H, W)."""
    t = vit.embed(x)
    for block in vit.blocks[:position]:
        t = block(t)
    return t


@torch.no_grad()
def true_prob(vit: ViT, t: torch.Tensor, position: int, y: torch.Tensor) -> torch.Tensor:
    """True-class probability (B,) of tokens t (B, T, D) entering block ``position``; labels y (B,)."""
    for block in vit.blocks[position:]:
        t = block(t)
    return vit.classify(t).softmax(-1).gather(1, y[:, None]).squeeze(1)


@torch.no_grad()
def agent_data(vit: ViT, x: torch.Tensor, y: torch.Tensor, position: int, candidates: int,
               seed: int = 0, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens at ``position`` (B, T, D), candidate patch indices (B, K) and their rewards (B, K)."""
    g = torch.Generator().manual_seed(seed)
    tokens, cands, rewards = [], [], []
    for s in tqdm(range(0, x.shape[0], batch_size), desc=f"ap-vit rewards @{position}", leave=False, disable=None):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        t = tokens_at(vit, xb, position)
        k = min(candidates, t.shape[1] - 1)
        cand = torch.stack([torch.randperm(t.shape[1] - 1, generator=g)[:k] + 1 for _ in range(t.shape[0])]).to(t.device)
        p_full = true_prob(vit, t, position, yb)
        p_drop = true_prob(vit, apvit.without_token(t, cand), position, yb.repeat_interleave(k))
        tokens.append(t), cands.append(cand), rewards.append(apvit.drop_rewards(p_full, p_drop.view(-1, k)))
    return torch.cat(tokens), torch.cat(cands), torch.cat(rewards)


def train_agents(vit: ViT, x: torch.Tensor, y: torch.Tensor, options: APViTOptions
                 ) -> tuple[nn.ModuleList, list[int]]:
    """Train one agent per position on calibration images x (B, C, H, W), labels y (B,)."""
    positions = apvit.agent_positions(vit.config.depth, options.agents)
    agents = nn.ModuleList()
    for i, pos in enumerate(positions):
        tokens, cand, rewards = agent_data(vit, x, y, pos, options.candidates, seed=i)
        targets = apvit.rank_targets(rewards)
        agent = apvit.Agent(vit.config.dim, options.hidden).to(tokens.device)

        def batches(epoch, n=tokens.shape[0]):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            return [(perm[s:s + 64], None) for s in range(0, n, 64)]

        def loss_fn(model, idx, _):
            logits = model(tokens[idx]).gather(1, cand[idx])
            return F.binary_cross_entropy_with_logits(logits, targets[idx])
        fit(agent, agent.parameters(), batches, epochs=options.epochs, lr=options.lr, loss_fn=loss_fn,
            desc=f"ap-vit agent @{pos}", lr_flag="--apvit-lr")
        agents.append(agent.eval())
    return agents, positions


@torch.no_grad()
def threshold_table(vit: ViT, agents: nn.ModuleList, positions: list[int], x: torch.Tensor,
                    thresholds: list[float]) -> list[tuple[float, float]]:
    """(threshold, achieved ratio) on images x, as in the seed's Table 2."""
    table = []
    for thr in thresholds:
        runner = APViTRunner(vit, agents, positions, thr)
        runner(x)
        table.append((thr, runner.achieved_ratio()))
    return table


@torch.no_grad()
def threshold_for(vit: ViT, agents: nn.ModuleList, positions: list[int], x: torch.Tensor,
                  ratio: float, iters: int = 14) -> float:
    """Bisection on [0, 1] for the threshold whose ratio on images x is closest to ``ratio``
    (the ratio falls as the threshold rises)."""
    lo, hi, tried = 0.0, 1.0, []
    for _ in range(iters):
        mid = (lo + hi) / 2
        runner = APViTRunner(vit, agents, positions, mid)
        runner(x)
        got = runner.achieved_ratio()
        tried.append((mid, got))
        lo, hi = (mid, hi) if got > ratio else (lo, mid)
    return apvit.threshold_for_ratio([t for t, _ in tried], [r for _, r in tried], ratio)


def build_apvit(vit: ViT, agents: nn.ModuleList, positions: list[int], ratio: float,
                x: torch.Tensor, fixed_count: bool = True) -> APViTRunner:
    """AP-ViT runner whose threshold meets ``ratio`` on calibration images x (B, C, H, W). With
    ``fixed_count``, every image keeps, after each agent, the mean number of patches that threshold
    keeps on x (no padding: see :mod:`nnlab.prune.apvit`)."""
    threshold = threshold_for(vit, agents, positions, x, ratio)
    if not fixed_count:
        return APViTRunner(vit, agents, positions, threshold)
    calibrated = APViTRunner(vit, agents, positions, threshold)
    with torch.no_grad():
        calibrated(x)
    counts = [max(1, round(t - 1)) for t in calibrated.kept_per_agent()]
    return APViTRunner(vit, agents, positions, threshold, counts)
