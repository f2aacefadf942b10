"""The fused DessiLBI steps: the C++ kernels of :mod:`nnlab.lbi.kernels` on CPU (SGD flavour) and
one ``torch.compile``d function per flavour otherwise, with the fallback to the foreach path when
``torch.compile`` cannot build. Tested against :mod:`nnlab.lbi.reference`."""
from __future__ import annotations

import warnings

import torch

from nnlab.lbi.kernels import kernel_applies, sgd_kernels


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
