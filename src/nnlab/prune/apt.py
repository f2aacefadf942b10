"""APT's joint training of the AP-ViT agents with the backbone (method ``ap-vit-joint``).

In APT (Lucky666123/cv-automatic-pruning-transformer) the agents are not trained on a frozen
model: each step runs three streams on a batch,

0. the full model, whose true-class probabilities ``p_old`` (no gradient) are the reference;
1. the model under the agents' own drops (a token goes when its drop probability exceeds 1/2,
   agents' inputs detached), whose cross-entropy trains the *backbone* to work with them;
2. per agent, one token clipped per image (the agent's most droppable token or, half the time, a
   random one) from the agent's block on; the reward ``p_new - p_old`` of the true class labels the
   clip good (reward > 0) or bad, and a binary cross-entropy on the agent's logit for that token
   trains the *agent*.

nnlab's frozen-backbone agents (:func:`nnlab.prune.methods.train_agents`, method ``ap-vit``)
stay as the default; ``ap-vit-joint`` trains a copy of the backbone with fresh agents this way.
Differences from APT: the agents are nnlab's (:class:`nnlab.prune.apvit.Agent`, a sigmoid drop
probability instead of a two-way softmax), stream 1 removes the dropped tokens (padding masked, as
:class:`~nnlab.prune.runners.APViTRunner` does) instead of adding -1e4 to their attention logits,
and AdamW replaces SGD.

Shapes: images (B, C, H, W); tokens (B, T, D); labels (B,).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnlab.models.vit import ViT
from nnlab.prune import apvit
from nnlab.prune.common import check_loss, check_weights, model_device
from nnlab.prune.methods import tokens_at, true_prob
from nnlab.prune.runners import APViTRunner

STREAM1_THRESHOLD = 0.5  # APT's: a token goes when the agent's drop probability exceeds 1/2


@dataclass
class ClipBatch:
    """Stream 2 of one agent on a batch: the clipped token per image (B,), the agent's logit for it
    (B,) (with gradient) and the label (B,): 1.0 where the clip raised the true-class probability."""

    token: torch.Tensor
    logit: torch.Tensor
    label: torch.Tensor


def clip_one(vit: ViT, agent: nn.Module, x: torch.Tensor, y: torch.Tensor, p_old: torch.Tensor,
             position: int, generator: torch.Generator) -> ClipBatch:
    """Stream 2 for the agent in front of block ``position``: per image clip its most droppable
    patch (or, with probability 1/2, a random one) and label the clip by the sign of the reward."""
    t = tokens_at(vit, x, position)
    logits = agent(t)                                                    # (B, T), trains the agent
    b, n = t.shape[0], t.shape[1] - 1
    greedy = logits[:, 1:].detach().argmax(1) + 1
    random = torch.randint(1, n + 1, (b,), generator=generator).to(t.device)
    pick = torch.rand(b, generator=generator).to(t.device) < 0.5
    token = torch.where(pick, greedy, random)
    p_new = true_prob(vit, apvit.without_token(t, token[:, None]), position, y)
    label = (apvit.drop_rewards(p_old, p_new[:, None]).squeeze(1) > 0).float()
    return ClipBatch(token, logits.gather(1, token[:, None]).squeeze(1), label)


def joint_step(model: ViT, agents: nn.ModuleList, positions: list[int], x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The three streams on one batch: (backbone loss of stream 1, agents' loss of stream 2)."""
    with torch.no_grad():                                                # stream 0
        p_old = model(x).softmax(-1).gather(1, y[:, None]).squeeze(1)
    runner = APViTRunner(model, _Detached(agents), positions, STREAM1_THRESHOLD)
    model.train()                                                        # runner's init sets eval
    backbone = F.cross_entropy(runner(x), y)                             # stream 1
    model.eval()                                                         # stream 2 measures rewards
    clips = [clip_one(model, agents[i], x, y, p_old, pos, generator) for i, pos in enumerate(positions)]
    agent = sum(F.binary_cross_entropy_with_logits(c.logit, c.label) for c in clips) / max(len(clips), 1)
    return backbone, agent


class _Detached(nn.ModuleList):
    """The agents as stream 1 sees them: inputs detached, so their drops shape the backbone's
    training but no gradient reaches the agents (or, through them, the backbone)."""

    def __init__(self, agents: nn.ModuleList):
        super().__init__([_DetachedAgent(a) for a in agents])


class _DetachedAgent(nn.Module):
    def __init__(self, agent: nn.Module):
        super().__init__()
        self.agent = agent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.agent(x.detach())

    def macs(self, tokens: float, images: float) -> float:
        return self.agent.macs(tokens, images)


def train_jointly(vit: ViT, batches, options, epochs: int, seed: int = 0
                  ) -> tuple[ViT, nn.ModuleList, list[int]]:
    """A copy of ``vit`` and fresh agents trained together for ``epochs`` (``options``:
    :class:`~nnlab.prune.methods.APViTOptions`); batches(epoch) yields (x, y). Returns the
    fine-tuned copy (eval mode), the agents and their positions."""
    model = copy.deepcopy(vit)
    device = model_device(model)
    positions = apvit.agent_positions(model.config.depth, options.agents)
    agents = apvit.new_agents(model.config.dim, options.hidden, len(positions), device)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": options.joint_lr},
                             {"params": agents.parameters(), "lr": options.lr}])
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for x, y in tqdm(batches(epoch), desc=f"ap-vit joint {epoch + 1}/{epochs}", leave=False, disable=None):
            backbone, agent = joint_step(model, agents, positions, x.to(device), y.to(device), g)
            check_loss(backbone + agent, "ap-vit joint training", "--apvit-joint-lr / --apvit-lr")
            opt.zero_grad(set_to_none=True)
            (backbone + agent).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(agents.parameters()), 1.0)
            opt.step()
    check_weights([*model.parameters(), *agents.parameters()], "ap-vit joint training", "--apvit-joint-lr / --apvit-lr")
    return model.eval(), agents.eval(), positions
