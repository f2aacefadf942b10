"""DessiLBI, Adam flavour: Adam moments on the coupled gradient, one W update per step (the rule is
in :class:`DessiLBIAdam`'s docstring; the shared base is :mod:`nnlab.lbi.base`)."""
from __future__ import annotations

import math

import torch

from nnlab.lbi.base import LBIBase, _check, _check_group, _mark_stale, _refresh, _split
from nnlab.lbi.fused import _run_compiled
from nnlab.lbi.reference import adam_step_reference


class DessiLBIAdam(LBIBase):
    """DessiLBI with Adam moments on the coupled gradient; exactly one W update per step.

    For every parameter, at step t (``g`` = loss gradient, Gamma/V only for coupled params)::

        h     = g + (W - Gamma) / mu            # h = g for uncoupled params
        m     = beta1 * m + (1 - beta1) * h
        s     = beta2 * s + (1 - beta2) * h * h
        W_new = W - lr * kappa * ( (m / (1 - beta1^t)) / (sqrt(s / (1 - beta2^t)) + eps)
                                   + weight_decay * W )
        V     = V - (gamma_lr / mu) * (Gamma - W)   # W before the update; gamma_lr defaults to lr
        Gamma = kappa * shrink(V, lam)

    Weight decay is decoupled (AdamW style): it never enters m or s. ``t`` is per parameter and
    counts this step (t = 1 on the first step), so both corrections divide by ``1 - beta^t`` of
    the moments just updated. A public student variant of DessiLBI-Adam applies an Adam step to W
    and then the SGD DessiLBI step with the raw gradient: W moves twice per step, and the
    coupling term ``(W - Gamma)/mu`` never enters the moments. Here it is one W update.
    """

    def __init__(self, params, lr: float = 1e-3, kappa: float = 1.0, mu: float = 100.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lam: float = 1.0, gamma_lr: float | None = None,
                 coupled: bool | None = None, shrink: str = "auto", foreach: bool = True,
                 compiled: bool = False):
        defaults = dict(lr=lr, kappa=kappa, mu=mu, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, lam=lam, gamma_lr=gamma_lr, coupled=coupled,
                        shrink=shrink, foreach=foreach, compiled=compiled)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_group(group)
        b1, b2 = group["betas"]
        _check("betas", group["betas"], 0 <= b1 < 1 and 0 <= b2 < 1, "two numbers in [0, 1)")
        _check("eps", group["eps"], group["eps"] > 0, "> 0")

    reference_step = staticmethod(adam_step_reference)

    @staticmethod
    def _prepare(params: list, states: list) -> None:
        """Create Adam's moments (and step counts) of parameters seen for the first time."""
        for p, s in zip(params, states):
            if s.get("exp_avg") is None:
                s["step"] = 0
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_compiled(self, group: dict, params: list, grads: list, states: list) -> None:
        """The whole step as one ``torch.compile``d function; Gamma of conv weights is rebuilt from V and
        ``state["gamma_scale"]`` as in :meth:`DessiLBI._step_compiled`."""
        glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
        b1, b2 = group["betas"]
        scalars = torch.tensor([b1, b2, group["lr"] * group["kappa"], group["mu"], glr, group["lam"],
                                group["kappa"], group["weight_decay"], group["eps"]], dtype=torch.float64)
        steps = torch.tensor([float(s["step"] + 1) for s in states], dtype=torch.float64)
        kinds, vs, gs, scales = self._fused_state(group, params, states)
        ms, ss = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if not _run_compiled("adam", params, grads, ms, ss, vs, gs, scales, steps, scalars, kinds):
            _refresh(states)
            self._step_foreach(group, params, grads, states)  # counts the step itself
            return
        for s in states:
            s["step"] += 1
        _mark_stale(states, kinds)

    def _step_foreach(self, group: dict, params: list, grads: list, states: list) -> None:
        lrk, mu, wd, eps = group["lr"] * group["kappa"], group["mu"], group["weight_decay"], group["eps"]
        glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
        b1, b2 = group["betas"]
        c, _ = _split(params, states)
        pc, gc = [params[i] for i in c], [states[i]["gamma"] for i in c]
        h = list(grads)
        if c:  # h = g + (W - Gamma)/mu for coupled params; V <- V + (glr/mu)(W_old - Gamma)
            diff = torch._foreach_sub(pc, gc)
            torch._foreach_add_([states[i]["V"] for i in c], diff, alpha=glr / mu)
            for i, hi in zip(c, torch._foreach_add([grads[i] for i in c], diff, alpha=1 / mu)):
                h[i] = hi
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(m, h, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, h, h, value=1 - b2)
        for s in states:
            s["step"] += 1
        bc1 = [1 - b1 ** s["step"] for s in states]
        bc2 = [math.sqrt(1 - b2 ** s["step"]) for s in states]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, eps)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lrk * wd)
        torch._foreach_addcdiv_(params, m, denom, [-lrk / b for b in bc1])
        if c:
            self._gamma_update(group, pc, [states[i] for i in c])
