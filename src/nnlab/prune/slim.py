"""P-ViT module side: attach gates to a ViT, and build the physically slimmer ViT.

:func:`attach_gates` adds :class:`Gates` (parameters, initialised at 1) through forward hooks on
``attn.qkv`` (scaling every q/k/v channel by its dimension's gate) and ``mlp.act`` (scaling hidden
units). :func:`slim_vit` keeps the chosen dimensions and folds the gate values into the weights,
so the slim model computes what the gated model computes with the removed gates set to zero.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from nnlab.models.vit import ViT


class Gates(nn.Module):
    """Per-block gate vectors: ``attn[i]`` (head_dim_i,) and ``mlp[i]`` (mlp_dim_i,)."""

    def __init__(self, vit: ViT):
        super().__init__()
        c, device = vit.config, next(vit.parameters()).device  # on the model's device (a GPU sweep)
        self.attn = nn.ParameterList(nn.Parameter(torch.ones(d, device=device)) for d in c.head_dims)
        self.mlp = nn.ParameterList(nn.Parameter(torch.ones(m, device=device)) for m in c.mlp_dims)
        self._handles: list = []

    def all(self) -> list[torch.Tensor]:
        return list(self.attn) + list(self.mlp)

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_gates(vit: ViT) -> Gates:
    """Hook gates into every block of ``vit`` (in place); returns them (call ``detach_hooks`` to undo)."""
    gates = Gates(vit)
    for i, blk in enumerate(vit.blocks):
        heads = blk.attn.heads

        def qkv_hook(_m, _inp, out, i=i, heads=heads):
            return out * gates.attn[i].repeat(3 * heads)   # (B, T, 3*H*d) channel order [s, h, j]

        def act_hook(_m, _inp, out, i=i):
            return out * gates.mlp[i]
        gates._handles += [blk.attn.qkv.register_forward_hook(qkv_hook),
                           blk.mlp.act.register_forward_hook(act_hook)]
    return gates


@torch.no_grad()
def slim_vit(vit: ViT, gates: Gates | None, attn_keep: list[torch.Tensor],
             mlp_keep: list[torch.Tensor]) -> ViT:
    """A new ViT keeping q/k/v dims ``attn_keep[i]`` (per head) and MLP units ``mlp_keep[i]`` of
    block i, with gate values (if any) folded in. The input model is not changed."""
    c = vit.config
    cfg = dataclasses.replace(c, head_dims=[len(k) for k in attn_keep], mlp_dims=[len(k) for k in mlp_keep],
                              attn_scale_dim=c.attn_scale_dim)
    slim = ViT(cfg)
    state = {k: v for k, v in vit.state_dict().items() if ".attn." not in k and ".mlp." not in k}
    slim.load_state_dict(state, strict=False)
    for i, (src, dst) in enumerate(zip(vit.blocks, slim.blocks)):
        h, d = src.attn.heads, c.head_dims[i]
        ga = gates.attn[i] if gates is not None else torch.ones(d)
        gm = gates.mlp[i] if gates is not None else torch.ones(c.mlp_dims[i])
        keep, scale = attn_keep[i], ga[attn_keep[i]]
        w = src.attn.qkv.weight.view(3, h, d, c.dim)[:, :, keep] * scale[:, None]
        b = src.attn.qkv.bias.view(3, h, d)[:, :, keep] * scale
        dst.attn.qkv.weight.copy_(w.reshape(-1, c.dim))
        dst.attn.qkv.bias.copy_(b.reshape(-1))
        dst.attn.proj.weight.copy_(src.attn.proj.weight.view(c.dim, h, d)[:, :, keep].reshape(c.dim, -1))
        dst.attn.proj.bias.copy_(src.attn.proj.bias)
        mk = mlp_keep[i]
        dst.mlp.fc1.weight.copy_(src.mlp.fc1.weight[mk])
        dst.mlp.fc1.bias.copy_(src.mlp.fc1.bias[mk])
        dst.mlp.fc2.weight.copy_(src.mlp.fc2.weight[:, mk] * gm[mk])
        dst.mlp.fc2.bias.copy_(src.mlp.fc2.bias)
    return slim.eval()


def gated_copy(vit: ViT) -> tuple[ViT, Gates]:
    """A deep copy of ``vit`` with gates attached (the original stays untouched)."""
    model = copy.deepcopy(vit)
    return model, attach_gates(model)
