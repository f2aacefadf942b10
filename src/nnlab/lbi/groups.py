"""Parameter groups of a model for DessiLBI, the engine's ``slbi``/``slbi-adam`` factories, and
per-layer views of the optimiser state (sparsity, Gamma) keyed by parameter name."""
from __future__ import annotations

import torch
from torch import nn

from nnlab.errors import ConfigError
from nnlab.lbi.adam import DessiLBIAdam
from nnlab.lbi.base import LBIBase
from nnlab.lbi.sgd import DessiLBI
from nnlab.lbi.shrink import support

COUPLED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def coupled_names(model: nn.Module) -> list[str]:
    """Names of the weights DessiLBI couples by default: every conv and linear ``weight``."""
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, COUPLED_MODULES) and getattr(m, "weight", None) is not None]


def param_groups(model: nn.Module, weight_decay: float = 0.0, conv_lam: float | None = None,
                 layer_lam: dict[str, float] | None = None, layer_mu: dict[str, float] | None = None) -> list[dict]:
    """Groups: conv weights and linear weights (``coupled=True``, with ``weight_decay``) and the
    rest (biases, norm parameters: ``coupled=False``, no weight decay). Conv weights get
    ``lam=conv_lam`` when given; layers named in ``layer_lam`` / ``layer_mu`` ({module name: value})
    get groups of their own with that lam / mu. Empty groups are dropped."""
    names = coupled_names(model)
    layers = {n.removesuffix(".weight") for n in names}
    overrides = {"lam": dict(layer_lam or {}), "mu": dict(layer_mu or {})}
    for key, values in overrides.items():
        unknown = sorted(set(values) - layers)
        if unknown:
            raise ConfigError(f"layer_{key} names {', '.join(unknown)}, not conv/linear layers of this model; "
                              f"choose from {', '.join(n.removesuffix('.weight') for n in names)}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    own = {n: p for n, p in params.items()
           if n in names and any(n.removesuffix(".weight") in v for v in overrides.values())}
    conv = [p for n, p in params.items() if n in names and n not in own and p.ndim >= 3]
    linear = [p for n, p in params.items() if n in names and n not in own and p.ndim < 3]
    groups = [dict(params=conv, coupled=True, weight_decay=weight_decay),
              dict(params=linear, coupled=True, weight_decay=weight_decay)]
    if conv_lam is not None:
        groups[0]["lam"] = conv_lam
    for n, p in own.items():
        layer = n.removesuffix(".weight")
        group = dict(params=[p], coupled=True, weight_decay=weight_decay)
        if conv_lam is not None and p.ndim >= 3:
            group["lam"] = conv_lam
        group.update({k: float(v[layer]) for k, v in overrides.items() if layer in v})
        groups.append(group)
    groups.append(dict(params=[p for n, p in params.items() if n not in names], coupled=False,
                       weight_decay=0.0))
    return [g for g in groups if g["params"]]


def build_slbi(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
               conv_lam: float | None = None, layer_lam: dict | None = None, layer_mu: dict | None = None,
               **options) -> DessiLBI:
    """:class:`DessiLBI` over :func:`param_groups` of ``model``; options: kappa, mu, lam (conv_lam:
    lam of conv weights, default lam), gamma_lr, dampening, shrink, foreach, compiled, decoupled_wd."""
    return DessiLBI(param_groups(model, weight_decay, conv_lam, layer_lam, layer_mu), lr=lr, momentum=momentum,
                    **options)


def build_slbi_adam(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    conv_lam: float | None = None, layer_lam: dict | None = None, layer_mu: dict | None = None,
                    **options) -> DessiLBIAdam:
    """:class:`DessiLBIAdam` over :func:`param_groups`; ``momentum`` is beta1 unless ``betas`` given."""
    options.setdefault("betas", (momentum, 0.999))
    options.pop("decoupled_wd", None)  # the Adam flavour always decouples (AdamW style)
    return DessiLBIAdam(param_groups(model, weight_decay, conv_lam, layer_lam, layer_mu), lr=lr, **options)


def _named_coupled(model: nn.Module, optimizer: LBIBase) -> list[tuple[str, torch.Tensor, dict]]:
    by_id = {id(p): g for p, g in optimizer.coupled_params()}
    return [(n, p, by_id[id(p)]) for n, p in model.named_parameters() if id(p) in by_id]


def layer_sparsity(model: nn.Module, optimizer: LBIBase) -> dict[str, float]:
    """``{param name: fraction of Gamma non-zero}`` (of filters for conv, of entries for linear)."""
    return {n: optimizer.sparsity(p) for n, p, _ in _named_coupled(model, optimizer)}


def layer_gammas(model: nn.Module, optimizer: LBIBase) -> dict[str, torch.Tensor]:
    """``{param name: Gamma}`` of every coupled parameter (same shapes as the weights)."""
    return {n: optimizer.gamma(p) for n, p, _ in _named_coupled(model, optimizer)}


def layer_supports(model: nn.Module, optimizer: LBIBase) -> dict[str, torch.Tensor]:
    """``{param name: bool support}``: (C_out,) per filter for conv, weight-shaped for linear."""
    return {n: support(optimizer.gamma(p), optimizer.shrink_kind(p, g))
            for n, p, g in _named_coupled(model, optimizer)}
