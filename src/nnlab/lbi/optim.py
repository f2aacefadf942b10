"""DessiLBI optimisers: Split Linearized Bregman Iteration as ``torch.optim.Optimizer`` subclasses.

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

import contextlib
import math
import warnings
from typing import Iterator

import torch
from torch.optim import Optimizer

from nnlab.lbi.kernels import kernel_applies, sgd_kernels

SHRINK_KINDS = ("auto", "group", "elementwise")


# --------------------------------------------------------------------------- pure tensor functions


def soft_threshold(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Element-wise shrinkage ``sign(v) * max(|v| - lam, 0)``; v: any shape -> same shape."""
    return v - v.clamp(-lam, lam)


def group_shrink(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Group shrinkage per slice along dim 0: ``max(0, 1 - lam / ||v_g||) * v_g``.

    v: (C_out, ...) e.g. a conv weight (C_out, C_in, kh, kw) -> same shape; a zero group stays 0.
    """
    norms = v.reshape(v.shape[0], -1).norm(dim=1)  # (C_out,)
    factor = (1 - lam / norms.clamp_min(1e-30)).clamp_min_(0)
    return v * factor.view(-1, *([1] * (v.ndim - 1)))


def shrink(v: torch.Tensor, lam: float, kind: str) -> torch.Tensor:
    """``group_shrink`` (kind ``"group"``) or ``soft_threshold`` (``"elementwise"``); same shape as v."""
    return group_shrink(v, lam) if kind == "group" else soft_threshold(v, lam)


def support(gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """Boolean support of Gamma: per filter (C_out,) for ``"group"``, else element-wise (same shape)."""
    if kind == "group":
        return gamma.reshape(gamma.shape[0], -1).ne(0).any(dim=1)
    return gamma.ne(0)


# --------------------------------------------------------------------------- shared base


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


class _LBIBase(Optimizer):
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


# --------------------------------------------------------------------------- SGD flavour


class DessiLBI(_LBIBase):
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._grads(group)
            if not params:
                continue
            if group.get("compiled") and all("momentum_buffer" in s or group["momentum"] == 0 for s in states):
                self._step_compiled(group, params, grads, states)
                continue
            _refresh(states)
            if group["foreach"] or group.get("compiled"):
                self._step_foreach(group, params, grads, states)
            else:
                for p, g, s in zip(params, grads, states):
                    sgd_step_reference(p, g, s, group, self.shrink_kind(p, group))
        return loss

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


def _run_compiled(flavour: str, *args) -> bool:
    """Run the ``torch.compile``d step; False (after one warning, and for good) when it cannot be
    built, e.g. inductor finds no C++ compiler. Compilation fails before the step writes anything."""
    fn = _compiled(flavour)
    if fn is None:
        return False
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    try:
        fn(*args)
        return True
    except (InductorError, BackendCompilerFailed) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"DessiLBI compiled step unavailable ({first}); using the foreach path",
                      RuntimeWarning, stacklevel=3)
        _COMPILED[flavour] = None
        return False


def _kernel_step(kinds: tuple, cols: list[list], values: list[float], use_momentum: bool) -> list[int]:
    """Step every tensor the C++ kernels take (CPU, float32, contiguous); cols: [W, grad, buf, V,
    Gamma, scale] lists. Returns the indices left for the torch.compile path."""
    mod = sgd_kernels() if any(kernel_applies(p) for p in cols[0]) else None
    rest = []
    for i, kind in enumerate(kinds):
        w, g, b, v, gam, sc = (c[i] for c in cols)
        if mod is None or not all(kernel_applies(x) for x in (w, g, b, v, gam, sc)):
            rest.append(i)
        elif kind == "group":
            mod.slbi_group_sgd(w, g, b, v, gam, sc, values, use_momentum, False)  # Gamma left stale
        else:
            mod.slbi_flat_sgd(w, g, b, v, gam, values, use_momentum, kind == "elementwise")
    return rest


def group_scale(v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-filter factor s (C_out,) with ``Gamma == s * V`` filter by filter (0 where Gamma is 0);
    v, gamma: (C_out, ...)."""
    vn = v.reshape(v.shape[0], -1)
    gn = gamma.reshape(gamma.shape[0], -1)
    num, den = (gn * vn).sum(1), (vn * vn).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(den))


def _fused_sgd(ws: list, grads: list, bufs: list, vs: list, gs: list, scales: list, scalars: torch.Tensor,
               kinds: tuple, use_momentum: bool) -> None:
    """The SGD-flavour rule per tensor, written for ``torch.compile`` (scalars as a tensor so that a
    changing lr does not recompile): [momentum, 1 - dampening, lr*kappa, mu, gamma_lr, lam, kappa, wd].

    For group-shrunk (conv) weights Gamma is rebuilt as ``scale * V`` (scale: (C_out,), kappa included)
    rather than read, and the new scale comes from a per-filter norm fused with the V update: per
    step the kernel reads W, grad, buf, V and writes W, buf, V (7 memory passes; momentum SGD makes
    6); Gamma is left stale and rebuilt when read (:func:`_fresh`)."""
    m, keep, lrk, mu, glr, lam, kappa, wd = (scalars[i].to(ws[0].dtype) for i in range(8))
    for w, g, b, v, gam, sc, kind in zip(ws, grads, bufs, vs, gs, scales, kinds):
        d = g
        if use_momentum:
            d = b * m + g * keep
            b.copy_(d)
        if kind == "none":
            w.copy_(w - lrk * (d + wd * w))
            continue
        diff = _coupling(w, v, gam, sc, kind, glr, mu)
        w.copy_(w - lrk * (d + wd * w + diff / mu))
        _new_gamma(v, gam, sc, kind, lam, kappa)


def _coupling(w: torch.Tensor, v: torch.Tensor, gam: torch.Tensor, sc: torch.Tensor, kind: str,
              glr: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """V <- V + (glr/mu)(W - Gamma) in place (W before its update); returns W - Gamma. Gamma of a
    group-shrunk weight is ``scale * V`` (== the stored Gamma, bit for bit)."""
    gam_old = sc.view(-1, *([1] * (w.ndim - 1))) * v if kind == "group" else gam
    diff = w - gam_old
    v.copy_(v + (glr / mu) * diff)
    return diff


def _new_gamma(v: torch.Tensor, gam: torch.Tensor, sc: torch.Tensor, kind: str, lam: torch.Tensor,
               kappa: torch.Tensor) -> None:
    """Gamma <- kappa * shrink(V) in place for element-wise kind; for group kind only the new
    per-filter scale (C_out,) (Gamma itself is rebuilt when read, by :func:`_fresh`: inside the
    compiled graph, inductor would stage V in a temporary and add two memory passes)."""
    if kind == "group":
        norms = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(1e-30)
        sc.copy_(kappa * (1 - lam / norms).clamp_min(0))
    else:
        gam.copy_(kappa * (v - v.clamp(-lam, lam)))


def _fused_adam(ws: list, grads: list, ms: list, ss: list, vs: list, gs: list, scales: list,
                steps: torch.Tensor, scalars: torch.Tensor, kinds: tuple) -> None:
    """The Adam-flavour rule per tensor, for ``torch.compile``: scalars [beta1, beta2, lr*kappa, mu,
    gamma_lr, lam, kappa, wd, eps]; steps (n,): each tensor's step count t, this step included."""
    b1, b2, lrk, mu, glr, lam, kappa, wd, eps = (scalars[i].to(ws[0].dtype) for i in range(9))
    for i, (w, g, m, s, v, gam, sc, kind) in enumerate(zip(ws, grads, ms, ss, vs, gs, scales, kinds)):
        h = g if kind == "none" else g + _coupling(w, v, gam, sc, kind, glr, mu) / mu
        m_new = m + (h - m) * (1 - b1)
        s_new = s * b2 + (1 - b2) * h * h
        m.copy_(m_new)
        s.copy_(s_new)
        t = steps[i].to(w.dtype)
        denom = s_new.sqrt() / (1 - b2 ** t).sqrt() + eps
        w.copy_(w * (1 - lrk * wd) - (lrk / (1 - b1 ** t)) * m_new / denom)
        if kind != "none":
            _new_gamma(v, gam, sc, kind, lam, kappa)


_COMPILED: dict = {}


def _compiled(flavour: str):
    """``torch.compile`` of :func:`_fused_sgd` (``"sgd"``) or :func:`_fused_adam` (``"adam"``), built on
    first use."""
    if flavour not in _COMPILED:  # None once it failed to build (see _run_compiled)
        _COMPILED[flavour] = torch.compile(_fused_sgd if flavour == "sgd" else _fused_adam, dynamic=False)
    return _COMPILED[flavour]


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


# --------------------------------------------------------------------------- Adam flavour


class DessiLBIAdam(_LBIBase):
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._grads(group)
            if not params:
                continue
            self._init_moments(params, states)
            if group.get("compiled"):
                self._step_compiled(group, params, grads, states)
                continue
            _refresh(states)
            if group["foreach"]:
                self._step_foreach(group, params, grads, states)
            else:
                for p, g, s in zip(params, grads, states):
                    adam_step_reference(p, g, s, group, self.shrink_kind(p, group))
        return loss

    @staticmethod
    def _init_moments(params: list, states: list) -> None:
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
