"""Top Hessian eigenvalue of the training loss by power iteration on Hessian-vector products.

A direct curvature measure beside the effective beta-smoothness (PyHessian does the same). The
Hessian is that of the loss on one batch in the model's current mode (train mode: BN uses batch
statistics, as training sees it). Power iteration converges to the eigenvalue of largest
*magnitude*; for trained networks this is the top (positive) one.

:func:`top_hessian_eigenvalue` is the fast implementation (one double-backward graph, one HVP per
iteration); :func:`top_hessian_eigenvalue_reference` builds the full Hessian (tiny models only) and
takes its eigenvalues with ``eigvalsh``. A test checks that they agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from nnlab.errors import ConfigError
from nnlab.landscape.probe import LossFn, probe_loss, restore, snapshot


@dataclass
class HessianResult:
    """eigenvalue: the estimate lambda = v.Hv (||v|| = 1); iterations: HVPs used; converged: the
    relative change of lambda fell below tol; residual: ||Hv - lambda v|| / |lambda| at the last
    iterate (0 for an exact eigenvector; it shrinks more slowly than the eigenvalue settles)."""

    eigenvalue: float
    iterations: int
    converged: bool
    residual: float


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _residual(v: Sequence[torch.Tensor], hv: Sequence[torch.Tensor], lam: float) -> float:
    r = _dot(hv, hv) - 2 * lam * _dot(v, hv) + lam * lam * _dot(v, v)  # ||Hv - lam v||^2
    return float(r.clamp_min(0).sqrt()) / max(abs(lam), 1e-12)


def top_hessian_eigenvalue(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                           iters: int = 100, tol: float = 1e-3, seed: int = 0,
                           params: Sequence[torch.Tensor] | None = None, replay_rng: dict | None = None,
                           autocast: bool = False) -> HessianResult:
    """Largest-magnitude eigenvalue of d^2 L / dw^2 on batch ``x`` (B, ...), ``y`` (B, ...).

    ``params`` default to all parameters that require grad. The start vector comes from a private
    generator seeded with ``seed``; weights, buffers and the global RNG are restored afterwards.
    ``replay_rng`` / ``autocast``: the training step's RNG state and precision
    (:func:`nnlab.landscape.probe.probe_loss`). Stops early once lambda changes by less than tol.
    """
    if iters < 1 or tol <= 0:
        raise ConfigError(f"power iteration needs iters >= 1 and tol > 0, got iters={iters}, tol={tol}")
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    snap = snapshot(model, params)
    try:
        with torch.enable_grad():
            loss = probe_loss(model, loss_fn, x, y, autocast=autocast, replay_rng=replay_rng)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        grads, ps = [grads[i] for i in used], [params[i] for i in used]
        gen = torch.Generator(device=ps[0].device).manual_seed(seed)
        v = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in ps]
        lam, converged, it, hv = 0.0, False, 0, v
        for it in range(1, iters + 1):
            scale = float(_dot(v, v).sqrt())
            v = [t / scale for t in v]
            hv = torch.autograd.grad(grads, ps, grad_outputs=v, retain_graph=it < iters, allow_unused=True)
            hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, ps)]
            new = float(_dot(v, hv))
            converged = it > 1 and abs(new - lam) <= tol * max(abs(new), 1e-12)
            lam = new
            if converged or it == iters:
                break
            v = hv
        return HessianResult(eigenvalue=lam, iterations=it, converged=converged, residual=_residual(v, hv, lam))
    finally:
        restore(model, snap, params)


def top_hessian_eigenvalue_reference(model: nn.Module, loss_fn: LossFn, x: torch.Tensor,
                                     y: torch.Tensor) -> float:
    """Largest-magnitude eigenvalue of the full Hessian (all parameters; tiny models only)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(w, [s.numel() for s in shapes])
        tensors = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, {**tensors, **buffers}, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat).double()
    eig = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    return float(eig[eig.abs().argmax()])
