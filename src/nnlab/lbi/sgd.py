"""DessiLBI, SGD flavour: Split Linearized Bregman Iteration as a ``torch.optim.Optimizer``.

The rules of both flavours are here; the Adam flavour is :mod:`nnlab.lbi.adam`, the shared base
:mod:`nnlab.lbi.base`, the fused paths :mod:`nnlab.lbi.fused`, the references
:mod:`nnlab.lbi.reference`.

DessiLBI (Fu et al., ICML 2020) couples each weight tensor W with a sparse structure variable
Gamma through the loss ``L(W) + ||W - Gamma||^2 / (2 mu)`` and moves Gamma along a linearised
Bregman (inverse-scale-space) path: Gamma's support grows over training, important filters and
weights first. One step, for a coupled weight W (``lrk = lr * kappa``)::

    W     <- W - lrk * (d + (W - Gamma) / mu)     # d: momentum buffer of g + weight_decay * W
    V     <- V - (gamma_lr / mu) * (Gamma - W_old)                 # gamma_lr defaults to lr
    Gamma <- kappa * shrink(V, lambda)

``shrink`` is the element-wise soft threshold ``sign(v) max(|v| - lambda, 0)`` for linear weights
and group shrinkage per output filter ``max(0, 1 - lambda / ||V_g||) V_g`` for conv weights.
Uncoupled parameters (biases, norm parameters by default) take the plain step
``W <- W - lrk * d``; kappa scales them too so that every parameter sees the same loss step (as in
the original code).

Weight decay (SGD flavour): by default it is *coupled* L2, as in the official DessiLBI code and in
``torch.optim.SGD(weight_decay=...)``: ``buf <- momentum * buf + (1 - dampening) * (g + wd * W)``,
``d = buf``. (The official ``slbi_opt.py`` adds ``wd * W`` in place to the tensor it got back from
the buffer; the buffer then holds exactly the same sum, so it is this rule, not a leak.) With
``decoupled_wd=True`` the buffer holds only loss gradients and ``lrk * wd * W`` is subtracted
after it (``W <- W - lrk * (d + wd * W + (W - Gamma)/mu)``): at momentum 0.9 this decays about
10x less than the coupled form at the same ``weight_decay``, whose momentum compounds it to about
``wd / (1 - momentum)``. The Adam flavour always decouples (AdamW style, see :class:`DessiLBIAdam`).

Hyperparameters live in ``param_groups`` (``lr, kappa, mu, lam, momentum, dampening,
weight_decay, gamma_lr, coupled, shrink, foreach, compiled``); state (``momentum_buffer``,
``gamma``, ``V``, and on the fused path ``gamma_scale``, the per-filter factor with Gamma = scale * V,
and ``gamma_stale``: the fused path does not write Gamma of conv weights, and :meth:`gamma` and
:meth:`state_dict` rebuild it) in ``self.state[p]``. ``coupled``: ``None`` (auto: tensors with 2+ dims), ``True`` or ``False``.
``shrink``: ``"auto"`` (group for 4-d conv weights, element-wise otherwise), ``"group"`` (per
slice along dim 0) or ``"elementwise"``. ``foreach=True`` takes the vectorised path
(``torch._foreach_*`` over the group), ``False`` the plain per-parameter reference.
``compiled=True`` takes the fused path: the C++ kernels of :mod:`nnlab.lbi.kernels` on CPU (SGD
flavour), ``torch.compile`` otherwise (the SGD flavour takes its first step, which creates the
momentum buffers, on the foreach path). When ``torch.compile`` cannot build (inductor needs a C++
compiler on CPU), the step falls back to the foreach path for good, with one warning, and no
state is advanced twice.
"""
from __future__ import annotations

import torch

from nnlab.lbi.base import LBIBase, _check, _check_group, _mark_stale, _refresh, _split
from nnlab.lbi.fused import _kernel_step, _run_compiled
from nnlab.lbi.reference import sgd_step_reference


class DessiLBI(LBIBase):
    """DessiLBI with (heavy-ball) momentum SGD; the update rule is in the module docstring.

    params: iterable of tensors or param-group dicts (see :func:`nnlab.lbi.build_slbi` for the
    default groups of a model). Each group may override any keyword below.
    lr: step size (> 0). kappa: damping factor of the inverse-scale-space flow (> 0).
    mu: coupling strength; smaller mu pulls W harder towards Gamma. lam: shrinkage threshold.
    gamma_lr: step of V (``None``: use lr). momentum/dampening: as torch.optim.SGD.
    weight_decay: coupled L2 as torch.optim.SGD (official form); ``decoupled_wd=True``: decoupled.
    """

    def __init__(self, params, lr: float = 0.1, kappa: float = 1.0, mu: float = 100.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, lam: float = 1.0,
                 dampening: float = 0.0, gamma_lr: float | None = None, coupled: bool | None = None,
                 shrink: str = "auto", foreach: bool = True, compiled: bool = False,
                 decoupled_wd: bool = False):
        _check("momentum", momentum, 0 <= momentum < 1, "in [0, 1)")
        defaults = dict(lr=lr, kappa=kappa, mu=mu, momentum=momentum, weight_decay=weight_decay,
                        lam=lam, dampening=dampening, gamma_lr=gamma_lr, coupled=coupled,
                        shrink=shrink, foreach=foreach, compiled=compiled, decoupled_wd=decoupled_wd)
        _check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_group(group)
        _check("momentum", group["momentum"], 0 <= group["momentum"] < 1, "in [0, 1)")
        _check("dampening", group["dampening"], 0 <= group["dampening"] <= 1, "in [0, 1]")

    reference_step = staticmethod(sgd_step_reference)

    def _fused_ready(self, group: dict, states: list) -> bool:
        """The fused step needs the momentum buffers, which the first (foreach) step creates."""
        return group["momentum"] == 0 or all("momentum_buffer" in s for s in states)

    def _step_compiled(self, group: dict, params: list, grads: list, states: list) -> None:
        """The fast step: on CPU every float32 tensor through the fused C++ kernels
        (:mod:`nnlab.lbi.kernels`); the others (GPU, or no compiler for the kernels) as one
        ``torch.compile``d function.

        Group-shrunk params keep their per-filter shrink factor in ``state["gamma_scale"]`` so that the
        kernels rebuild Gamma from V instead of reading it back (one memory pass less per step)."""
        glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
        raw, (grads, wd) = grads, _weight_decay(group, params, grads)
        values = [group["momentum"], 1 - group["dampening"], group["lr"] * group["kappa"], group["mu"], glr,
                  group["lam"], group["kappa"], wd]
        kinds, vs, gs, scales = self._fused_state(group, params, states)
        cols = [params, grads, [s.get("momentum_buffer", g) for s, g in zip(states, grads)], vs, gs, scales]
        rest = _kernel_step(kinds, cols, values, group["momentum"] != 0)
        fused = [i for i in range(len(params)) if i not in rest]
        if rest:
            sub = [[c[i] for i in rest] for c in cols]
            if _run_compiled("sgd", *sub, torch.tensor(values, dtype=torch.float64),
                             tuple(kinds[i] for i in rest), group["momentum"] != 0):
                fused = list(range(len(params)))
            else:
                sub_states = [states[i] for i in rest]
                _refresh(sub_states)
                self._step_foreach(group, [params[i] for i in rest], [raw[i] for i in rest], sub_states)
        _mark_stale([states[i] for i in fused], tuple(kinds[i] for i in fused))

    def _momentum(self, group: dict, grads: list, states: list) -> list:
        """Update momentum buffers (loss gradients only) and return the directions d."""
        m, damp = group["momentum"], group["dampening"]
        if m == 0:
            return grads
        old = [i for i, s in enumerate(states) if "momentum_buffer" in s]
        for i, s in enumerate(states):
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = grads[i].detach().clone()
        if old:
            bufs = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - damp)
        return [s["momentum_buffer"] for s in states]

    def _step_foreach(self, group: dict, params: list, grads: list, states: list) -> None:
        grads, wd = _weight_decay(group, params, grads)  # wd: the decoupled part left for the step
        lrk, mu = group["lr"] * group["kappa"], group["mu"]
        glr = group["lr"] if group["gamma_lr"] is None else group["gamma_lr"]
        d = self._momentum(group, grads, states)
        c, _ = _split(params, states)
        pc, gc = [params[i] for i in c], [states[i]["gamma"] for i in c]
        if c:  # V <- V + (glr/mu) (W_old - Gamma)
            vs = [states[i]["V"] for i in c]
            torch._foreach_add_(vs, pc, alpha=glr / mu)
            torch._foreach_add_(vs, gc, alpha=-glr / mu)
        if c:  # (1 - lrk wd) lerp(W, Gamma, a) == W - lrk (wd W + (W - Gamma)/mu) for this a
            torch._foreach_lerp_(pc, gc, lrk / mu / (1 - lrk * wd))
        if wd != 0:
            torch._foreach_mul_(params, 1 - lrk * wd)
        torch._foreach_add_(params, d, alpha=-lrk)
        if c:
            self._gamma_update(group, pc, [states[i] for i in c])


def _weight_decay(group: dict, params: list, grads: list) -> tuple[list, float]:
    """(gradients for the momentum buffer, decay left for the step). Coupled L2 (default): the
    buffer gets g + wd * W (new tensors; p.grad is not written) and the step none; decoupled: the
    buffer gets g and the step wd."""
    wd = group["weight_decay"]
    if wd == 0 or group.get("decoupled_wd", False):
        return list(grads), wd
    return list(torch._foreach_add(grads, params, alpha=wd)), 0.0
