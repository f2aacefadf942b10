"""Plain per-parameter DessiLBI steps, written as the rules read: the oracles of the foreach and
fused paths (:mod:`nnlab.lbi.sgd`, :mod:`nnlab.lbi.adam`, :mod:`nnlab.lbi.fused`)."""
from __future__ import annotations

import torch

from nnlab.lbi.shrink import shrink


@torch.no_grad()
def sgd_step_reference(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, kind: str) -> None:
    """Plain per-parameter DessiLBI-SGD step, written as the rule reads (the fast path's oracle)."""
    lrk, mu, wd = group["lr"] * group["kappa"], group["mu"], group["weight_decay"]
    glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
    if not group.get("decoupled_wd", False):  # coupled L2: decay enters the buffer, as torch SGD
        grad, wd = grad + wd * p.detach(), 0.0
    d = grad
    if group["momentum"] != 0:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.detach().clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])
        d = state["momentum_buffer"]
    w_old = p.detach().clone()
    if "gamma" not in state:
        p.sub_(lrk * (d + wd * w_old))
        return
    gamma = state["gamma"]
    p.sub_(lrk * (d + wd * w_old + (w_old - gamma) / mu))
    state["V"].sub_((glr / mu) * (gamma - w_old))
    state["gamma"] = group["kappa"] * shrink(state["V"], group["lam"], kind)
    state.pop("gamma_scale", None)


@torch.no_grad()
def adam_step_reference(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, kind: str) -> None:
    """Plain per-parameter DessiLBI-Adam step (the rule in :class:`DessiLBIAdam`'s docstring)."""
    lrk, mu, wd, eps = group["lr"] * group["kappa"], group["mu"], group["weight_decay"], group["eps"]
    glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
    b1, b2 = group["betas"]
    w_old = p.detach().clone()
    h = grad if "gamma" not in state else grad + (w_old - state["gamma"]) / mu
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].mul_(b1).add_((1 - b1) * h)
    state["exp_avg_sq"].mul_(b2).add_((1 - b2) * h * h)
    m_hat = state["exp_avg"] / (1 - b1 ** t)
    v_hat = state["exp_avg_sq"] / (1 - b2 ** t)
    p.sub_(lrk * (m_hat / (v_hat.sqrt() + eps) + wd * w_old))
    if "gamma" in state:
        state["V"].sub_((glr / mu) * (state["gamma"] - w_old))
        state["gamma"] = group["kappa"] * shrink(state["V"], group["lam"], kind)
        state.pop("gamma_scale", None)
