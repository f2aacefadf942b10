"""The base of both DessiLBI optimisers (:mod:`nnlab.lbi.sgd`, :mod:`nnlab.lbi.adam`): validation,
Gamma / V state per coupled parameter (and its staleness on the fused path), ``gamma()``,
``state_dict()``, sparsity, support masks and the W* context."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.optim import Optimizer

from nnlab.lbi.shrink import SHRINK_KINDS, group_scale, shrink, support


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name} {value!r}: must be {what}")


def _check_group(group: dict) -> None:
    _check("lr", group["lr"], group["lr"] >= 0, ">= 0")
    _check("kappa", group["kappa"], group["kappa"] > 0, "> 0")
    _check("mu", group["mu"], group["mu"] > 0, "> 0")
    _check("lam", group["lam"], group["lam"] >= 0, ">= 0")
    _check("weight_decay", group["weight_decay"], group["weight_decay"] >= 0, ">= 0")
    glr = group["gamma_lr"]
    _check("gamma_lr", glr, glr is None or glr >= 0, "None or >= 0")
    _check("shrink", group["shrink"], group["shrink"] in SHRINK_KINDS, f"one of {SHRINK_KINDS}")
    _check("coupled", group["coupled"], group["coupled"] in (None, True, False), "None, True or False")


class LBIBase(Optimizer):
    """What both flavours share: validation, Gamma/V state, shrinkage kinds, W* and sparsity."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        _check_group(group)

    @staticmethod
    def shrink_kind(p: torch.Tensor, group: dict) -> str:
        """``"group"`` or ``"elementwise"``: how Gamma of ``p`` is shrunk."""
        if group["shrink"] != "auto":
            return group["shrink"]
        return "group" if p.ndim == 4 else "elementwise"

    @staticmethod
    def is_coupled(p: torch.Tensor, group: dict) -> bool:
        return p.ndim >= 2 if group["coupled"] is None else bool(group["coupled"])

    def _lbi_state(self, p: torch.Tensor, group: dict) -> dict:
        """``self.state[p]``, with zero Gamma and V created on first use for coupled params."""
        state = self.state[p]
        if "gamma" not in state and self.is_coupled(p, group):
            state["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["V"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def coupled_params(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """(param, group) for every coupled parameter, in group order."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.is_coupled(p, group):
                    yield p, group

    def gamma(self, p: torch.Tensor) -> torch.Tensor:
        """Gamma of coupled parameter ``p`` (zeros before the first step); same shape as p."""
        group = next(g for q, g in self.coupled_params() if q is p)
        return _fresh(self._lbi_state(p, group))["gamma"]

    def state_dict(self) -> dict:
        """As :meth:`torch.optim.Optimizer.state_dict`, with every Gamma up to date."""
        _refresh(self.state.values())
        return super().state_dict()

    def support_mask(self, p: torch.Tensor) -> torch.Tensor:
        """``1[Gamma != 0]`` as a float tensor of p's shape."""
        return self.gamma(p).ne(0).to(p.dtype)

    @torch.no_grad()
    def sparsity(self, p: torch.Tensor) -> float:
        """Fraction of Gamma non-zero: of filters for group-shrunk (conv) params, else of entries."""
        group = next(g for q, g in self.coupled_params() if q is p)
        sup = support(self.gamma(p), self.shrink_kind(p, group))
        return sup.float().mean().item()

    @contextlib.contextmanager
    def w_star(self) -> Iterator[None]:
        """Within the block every coupled weight is ``W * 1[Gamma != 0]``; restored on exit."""
        saved = []
        with torch.no_grad():
            for p, _ in self.coupled_params():
                saved.append((p, p.detach().clone()))
                p.mul_(self.support_mask(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in saved:
                    p.copy_(original)

    def _gamma_update(self, group: dict, params: list, states: list) -> None:
        """Gamma <- kappa * shrink(V, lam) for coupled ``params`` of one group (vectorised)."""
        lam, kappa = group["lam"], group["kappa"]
        elem = [i for i, p in enumerate(params) if self.shrink_kind(p, group) == "elementwise"]
        if elem and group["foreach"]:
            vs = [states[i]["V"] for i in elem]
            clipped = torch._foreach_clamp_max(vs, lam)
            torch._foreach_clamp_min_(clipped, -lam)
            torch._foreach_sub_(clipped, vs)          # -(soft threshold of V)
            torch._foreach_mul_(clipped, -kappa)
            for i, g in zip(elem, clipped):
                states[i]["gamma"] = g
        for i, p in enumerate(params):
            if group["foreach"] and i in elem:
                continue
            s = states[i]
            s["gamma"] = shrink(s["V"], lam, self.shrink_kind(p, group)).mul_(kappa)
            s.pop("gamma_scale", None)  # the compiled path's cache of Gamma / V; stale now

    def _fused_state(self, group: dict, params: list, states: list) -> tuple[tuple, list, list, list]:
        """For the fused paths: (kinds, V list, Gamma list, scale list), with params themselves as
        placeholders where uncoupled (never read); creates the per-filter ``gamma_scale`` cache."""
        kinds = tuple("none" if "gamma" not in s else self.shrink_kind(p, group) for p, s in zip(params, states))
        for s, kind in zip(states, kinds):
            if kind == "group" and "gamma_scale" not in s:
                s["gamma_scale"] = group_scale(s["V"], s["gamma"])
        return (kinds, *([s.get(key, p) for s, p in zip(states, params)] for key in ("V", "gamma", "gamma_scale")))

    reference_step = None  # the flavour's plain per-parameter rule (p, grad, state, group, kind) -> None

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group (the template of both flavours): the fused path when
        ``compiled`` and ready, else the foreach path, else the plain reference rule per parameter
        (``foreach=False``). Gamma left stale by a fused step is rebuilt before the others read it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._grads(group)
            if not params:
                continue
            self._prepare(params, states)
            if group.get("compiled") and self._fused_ready(group, states):
                self._step_compiled(group, params, grads, states)
                continue
            _refresh(states)
            if group["foreach"] or group.get("compiled"):
                self._step_foreach(group, params, grads, states)
            else:
                for p, g, s in zip(params, grads, states):
                    self.reference_step(p, g, s, group, self.shrink_kind(p, group))
        return loss

    @staticmethod
    def _prepare(params: list, states: list) -> None:
        """Per-flavour state to create before a step (Adam's moments); nothing by default."""

    def _fused_ready(self, group: dict, states: list) -> bool:
        return True

    def _grads(self, group: dict) -> tuple[list, list, list]:
        """(params, grads, states) of ``group`` for params that have a gradient."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("DessiLBI does not support sparse gradients")
        return params, [p.grad for p in params], [self._lbi_state(p, group) for p in params]


def _fresh(state: dict) -> dict:
    """``state`` with Gamma rebuilt as ``gamma_scale * V`` if a fused step left it stale."""
    if state.pop("gamma_stale", False):
        v = state["V"]
        torch.mul(state["gamma_scale"].view(-1, *([1] * (v.ndim - 1))), v, out=state["gamma"])
    return state


def _refresh(states) -> None:
    """Rebuild every stale Gamma in ``states`` (before a step that reads Gamma, or a state_dict)."""
    with torch.no_grad():
        for s in states:
            _fresh(s)


def _mark_stale(states: list, kinds: tuple) -> None:
    """After a fused step: Gamma of group-shrunk params is ``gamma_scale * V``, not written; rebuilt
    by :func:`_fresh` when read (saves a memory pass per step)."""
    for s, kind in zip(states, kinds):
        if kind == "group":
            s["gamma_stale"] = True


def _split(params: list, states: list) -> tuple[list[int], list[int]]:
    """Indices of coupled (with Gamma) and uncoupled params."""
    c = [i for i, s in enumerate(states) if "gamma" in s]
    u = [i for i, s in enumerate(states) if "gamma" not in s]
    return c, u
