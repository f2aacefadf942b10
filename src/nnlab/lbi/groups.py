"""Parameter groups of a model for DessiLBI, the engine's ``slbi``/``slbi-adam`` factories, and
per-layer views of the optimiser state (sparsity, Gamma) keyed by parameter name."""
from __future__ import annotations

import torch
from torch import nn

from nnlab.lbi.optim import DessiLBI, DessiLBIAdam, _LBIBase, support

COUPLED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def coupled_names(model: nn.Module) -> list[str]:
    """Names of the weights DessiLBI couples by default: every conv and linear ``weight``."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, COUPLED_MODULES) and getattr(m, "weight", None) is not None]


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Two groups: conv/linear weights (``coupled=True``, with ``weight_decay``) and the rest
    (biases, norm parameters: ``coupled=False``, no weight decay). Empty groups are dropped."""
    names = set(coupled_names(model))
    params = dict(model.named_parameters())
    coupled = [p for n, p in params.items() if n in names and p.requires_grad]
    rest = [p for n, p in params.items() if n not in names and p.requires_grad]
    groups = [dict(params=coupled, coupled=True, weight_decay=weight_decay),
              dict(params=rest, coupled=False, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def build_slbi(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
               **options) -> DessiLBI:
    """:class:`DessiLBI` over :func:`param_groups` of ``model``; options: kappa, mu, lam, gamma_lr,
    dampening, shrink, foreach."""
    return DessiLBI(param_groups(model, weight_decay), lr=lr, momentum=momentum, **options)


def build_slbi_adam(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    **options) -> DessiLBIAdam:
    """:class:`DessiLBIAdam` over :func:`param_groups`; ``momentum`` is beta1 unless ``betas`` given."""
    options.setdefault("betas", (momentum, 0.999))
    return DessiLBIAdam(param_groups(model, weight_decay), lr=lr, **options)


def _named_coupled(model: nn.Module, optimizer: _LBIBase) -> list[tuple[str, torch.Tensor, dict]]:
    by_id = {id(p): g for p, g in optimizer.coupled_params()}
    return [(n, p, by_id[id(p)]) for n, p in model.named_parameters() if id(p) in by_id]


def layer_sparsity(model: nn.Module, optimizer: _LBIBase) -> dict[str, float]:
    """``{param name: fraction of Gamma non-zero}`` (of filters for conv, of entries for linear)."""
    return {n: optimizer.sparsity(p) for n, p, _ in _named_coupled(model, optimizer)}


def layer_gammas(model: nn.Module, optimizer: _LBIBase) -> dict[str, torch.Tensor]:
    """``{param name: Gamma}`` of every coupled parameter (same shapes as the weights)."""
    return {n: optimizer._lbi_state(p, g)["gamma"] for n, p, g in _named_coupled(model, optimizer)}


def layer_supports(model: nn.Module, optimizer: _LBIBase) -> dict[str, torch.Tensor]:
    """``{param name: bool support}``: (C_out,) per filter for conv, weight-shaped for linear."""
    return {n: support(optimizer._lbi_state(p, g)["gamma"], optimizer.shrink_kind(p, g))
            for n, p, g in _named_coupled(model, optimizer)}
