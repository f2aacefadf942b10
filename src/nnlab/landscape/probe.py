"""Pure measurement functions of the optimisation landscape along the gradient.

The paper's method (Santurkar et al. 2018, Sec. 3.1), at one training step with weights w, batch
(x, y) and gradient g:

- for each step size eta in a set spanning [0.5, 4] x lr, evaluate the point w - eta * g on the
  same batch: the loss L(eta) there and the gradient g'(eta) there;
- loss landscape: min and max of L(eta) over eta;
- gradient predictiveness: min and max of ||g'(eta) - g|| over eta;
- effective beta-smoothness: max over eta of ||g'(eta) - g|| / ||eta * g||.

The seed report's method: the distance between consecutive training gradients
||g_{t+1} - g_t|| and beta_t = ||g_{t+1} - g_t|| / (lr * ||g_t||) (:func:`gradient_distance`).
Two caveats, stated wherever it is plotted: g_{t+1} and g_t are gradients of *different* batches,
so the distance mixes batch noise into the curvature; and lr * ||g_t|| is the distance moved only
with momentum 0 and no clipping. :func:`same_batch_distance` is the variant without either:
||g(w_{t+1}; B_t) - g(w_t; B_t)|| / ||w_{t+1} - w_t||, on the batch of step t.

Fidelity to training (what the probes evaluate is what the step saw):

- random layers (dropout): the caller passes ``replay_rng``, the RNG state from just before the
  training forward, and every probe forward starts from it, so dropout masks are the step's own;
- precision: ``autocast=True`` runs the probe forwards under bf16 autocast, as training did;
- gradient clipping: ``direction`` is the step's direction (the clipped gradient, see
  :func:`clipped`); points are w - eta * direction and beta divides by ||eta * direction||.

Probes must not change training: :func:`snapshot` / :func:`restore` save and put back the
parameters, every buffer (BN running mean/var and ``num_batches_tracked``) and the RNG states. The
probes never touch ``p.grad`` (they use ``torch.autograd.grad``) and never call the optimiser.

:func:`landscape_step` is the fast implementation (one snapshot, in-place moves with ``_foreach``
ops, norms without flattening); :func:`landscape_step_reference` is the plain one (a deep copy of
the model per step size, flattened vectors). A test checks that they agree.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from nnlab.engine.checkpoint import rng_state, set_rng_state
from nnlab.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_etas(lr: float, count: int = 8, low: float = 0.5, high: float = 4.0) -> list[float]:
    """``count`` step sizes spaced geometrically over [low * lr, high * lr] (8 by default)."""
    if lr <= 0 or count < 1 or not 0 < low <= high:
        raise ConfigError(f"step sizes need lr > 0, count >= 1 and 0 < low <= high; got lr={lr}, "
                          f"count={count}, low={low}, high={high}")
    if count == 1:
        return [lr * low]
    ratio = (high / low) ** (1.0 / (count - 1))
    return [lr * low * ratio ** i for i in range(count)]


@dataclass
class ModelSnapshot:
    """Copies of a model's probed parameters, all its buffers, and the RNG states."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    rng: dict


def snapshot(model: nn.Module, params: Sequence[torch.Tensor] | None = None) -> ModelSnapshot:
    """Save ``params`` (default: all parameters), every buffer and the RNG states of ``model``."""
    params = list(model.parameters()) if params is None else list(params)
    with torch.no_grad():
        return ModelSnapshot(params=[p.detach().clone() for p in params],
                             buffers=[b.detach().clone() for b in model.buffers()], rng=rng_state())


def restore(model: nn.Module, snap: ModelSnapshot, params: Sequence[torch.Tensor] | None = None,
            rng: bool = True) -> None:
    """Put back what :func:`snapshot` saved (same ``params`` list), bit for bit."""
    params = list(model.parameters()) if params is None else list(params)
    with torch.no_grad():
        if params:
            torch._foreach_copy_(params, snap.params)
        buffers = list(model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, snap.buffers)
    if rng:
        set_rng_state(snap.rng)


@dataclass
class StepLandscape:
    """The landscape along -d at one step (d = g, or the clipped g), for K step sizes.

    etas, losses, grad_dists, betas: (K,) float64 tensors (CPU); ``losses[k]`` = L(w - eta_k d),
    ``grad_dists[k]`` = ||g'(eta_k) - g||, ``betas[k]`` = grad_dists[k] / (eta_k ||d||).
    grad_norm: ||g||; step_norm: ||d|| (= grad_norm without clipping).
    """

    etas: torch.Tensor
    losses: torch.Tensor
    grad_dists: torch.Tensor
    betas: torch.Tensor
    grad_norm: float
    step_norm: float

    @property
    def loss_min(self) -> float:
        return float(self.losses.min())

    @property
    def loss_max(self) -> float:
        return float(self.losses.max())

    @property
    def grad_dist_min(self) -> float:
        return float(self.grad_dists.min())

    @property
    def grad_dist_max(self) -> float:
        return float(self.grad_dists.max())

    @property
    def beta(self) -> float:
        """Effective beta-smoothness: max over eta of ||g' - g|| / ||eta g||."""
        return float(self.betas.max())

    def record(self) -> dict[str, float]:
        """The flat metrics record a probe logs (``land_*`` keys)."""
        return {"land_loss_min": self.loss_min, "land_loss_max": self.loss_max,
                "land_gdist_min": self.grad_dist_min, "land_gdist_max": self.grad_dist_max,
                "land_beta": self.beta, "land_grad_norm": self.grad_norm, "land_step_norm": self.step_norm}


def _result(etas: Sequence[float], losses: list[float], dists: list[float], gnorm: float,
            dnorm: float) -> StepLandscape:
    e = torch.tensor(list(etas), dtype=torch.float64)
    d = torch.tensor(dists, dtype=torch.float64)
    return StepLandscape(etas=e, losses=torch.tensor(losses, dtype=torch.float64), grad_dists=d,
                         betas=d / (e * dnorm).clamp_min(1e-300), grad_norm=gnorm, step_norm=dnorm)


def probe_loss(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
               autocast: bool = False, replay_rng: dict | None = None) -> torch.Tensor:
    """The training loss on (x, y) as the training step computes it: the RNG set to ``replay_rng``
    first (same dropout masks); with ``autocast`` the forward under bf16 autocast and the loss on
    float32 logits, as the engine does. Returns a 0-d tensor with graph."""
    if replay_rng is not None:
        set_rng_state(replay_rng)
    if not autocast:
        return loss_fn(model(x), y)
    device = x.device if isinstance(x, torch.Tensor) else next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(x)
    return loss_fn(logits.float(), y)


def clipped(grads: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """The gradient as ``torch.nn.utils.clip_grad_norm_(max_norm)`` leaves it (max_norm <= 0: as is)."""
    grads = [g.detach() for g in grads]
    if max_norm <= 0:
        return grads
    factor = min(1.0, max_norm / (norm(grads) + 1e-6))
    return [g * factor for g in grads]


def _check_inputs(etas: Sequence[float], grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]):
    if len(etas) == 0 or any(not (e > 0) for e in etas):
        raise ConfigError(f"step sizes must be a non-empty list of positive numbers, got {list(etas)}")
    if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
        raise ConfigError("grads must match the parameters one to one (same count and shapes); "
                          "pass [p.grad for p in params] after loss.backward()")


def norm(tensors: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a list of tensors taken as one flat vector (fp64 accumulation)."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return float(torch.stack([n.double() for n in norms]).norm())


def grad_params(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``model`` that have a gradient (those training moves)."""
    return [p for p in model.parameters() if p.requires_grad and p.grad is not None]


def landscape_step(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                   etas: Sequence[float], grads: Sequence[torch.Tensor] | None = None,
                   params: Sequence[torch.Tensor] | None = None, *,
                   direction: Sequence[torch.Tensor] | None = None, replay_rng: dict | None = None,
                   autocast: bool = False) -> StepLandscape:
    """Loss and gradient at w - eta * d for each eta, on batch ``x`` (B, ...) with targets ``y`` (B, ...).

    ``grads`` (g) defaults to ``p.grad`` of ``params`` (default: :func:`grad_params`); ``direction``
    (d) to g. ``replay_rng`` / ``autocast``: see the module docstring and :func:`probe_loss`. The
    model keeps its mode (train mode: BN uses batch statistics, as in training). Weights, buffers
    and RNG are restored after each point, and ``p.grad`` is never written.
    """
    params = grad_params(model) if params is None else list(params)
    grads = [p.grad.detach() for p in params] if grads is None else [g.detach() for g in grads]
    direction = grads if direction is None else [d.detach() for d in direction]
    _check_inputs(etas, grads, params)
    _check_inputs(etas, direction, params)
    snap = snapshot(model, params)
    losses, dists = [], []
    try:
        for eta in etas:
            with torch.no_grad():
                torch._foreach_add_(params, direction, alpha=-float(eta))  # w - eta * d
            with torch.enable_grad():
                loss = probe_loss(model, loss_fn, x, y, autocast=autocast, replay_rng=replay_rng)
                new = torch.autograd.grad(loss, params, allow_unused=True)
            new = [torch.zeros_like(p) if n is None else n for n, p in zip(new, params)]
            losses.append(float(loss.detach()))
            dists.append(norm(torch._foreach_sub(new, grads)))
            restore(model, snap, params)
    finally:
        restore(model, snap, params)
    return _result(etas, losses, dists, norm(grads), norm(direction))


def landscape_step_reference(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                             etas: Sequence[float], grads: Sequence[torch.Tensor] | None = None,
                             params: Sequence[torch.Tensor] | None = None, *,
                             direction: Sequence[torch.Tensor] | None = None,
                             replay_rng: dict | None = None) -> StepLandscape:
    """Plain version of :func:`landscape_step` (float32): a deep copy of the model per eta, flat vectors."""
    params = grad_params(model) if params is None else list(params)
    grads = [p.grad.detach() for p in params] if grads is None else [g.detach() for g in grads]
    direction = grads if direction is None else [d.detach() for d in direction]
    _check_inputs(etas, grads, params)
    index = [i for i, p in enumerate(model.parameters()) if any(p is q for q in params)]
    g = torch.cat([t.reshape(-1) for t in grads]).double()
    dflat = torch.cat([t.reshape(-1) for t in direction]).double()
    rng = rng_state()
    losses, dists = [], []
    for eta in etas:
        set_rng_state(rng if replay_rng is None else replay_rng)
        clone = copy.deepcopy(model)
        moved = [list(clone.parameters())[i] for i in index]
        with torch.no_grad():
            for p, di in zip(moved, direction):
                p.copy_(p - eta * di)
        for p in clone.parameters():
            p.grad = None
        loss = loss_fn(clone(x), y)
        loss.backward()
        new = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                         for p in moved]).double()
        losses.append(float(loss.detach()))
        dists.append(float((new - g).norm()))
    set_rng_state(rng)
    return _result(etas, losses, dists, float(g.norm()), float(dflat.norm()))


@dataclass
class GradientDistance:
    """The seed's method between consecutive steps: dist = ||g_{t+1} - g_t||,
    beta = dist / (lr * ||g_t||) with the lr of step t (different batches; see the module docstring)."""

    dist: float
    beta: float
    prev_norm: float


@dataclass
class SameBatchDistance:
    """dist = ||g(w_{t+1}; B_t) - g_t||, move = ||w_{t+1} - w_t||, beta = dist / move."""

    dist: float
    move: float
    beta: float


def same_batch_distance(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                        prev_grads: Sequence[torch.Tensor], prev_params: Sequence[torch.Tensor],
                        params: Sequence[torch.Tensor], *, replay_rng: dict | None = None,
                        autocast: bool = False) -> SameBatchDistance:
    """The same-batch beta after a step: the model holds w_{t+1} (``params``), ``prev_params`` and
    ``prev_grads`` are w_t and g_t = g(w_t; B_t), and (x (B, ...), y (B, ...)) is B_t. Buffers and
    RNG are restored afterwards (the extra forward does not change training)."""
    params = list(params)
    _check_inputs([1.0], prev_grads, params)
    _check_inputs([1.0], prev_params, params)
    snap = snapshot(model, params)
    try:
        with torch.enable_grad():
            loss = probe_loss(model, loss_fn, x, y, autocast=autocast, replay_rng=replay_rng)
            new = torch.autograd.grad(loss, params, allow_unused=True)
        new = [torch.zeros_like(p) if n is None else n for n, p in zip(new, params)]
        dist = norm(torch._foreach_sub(new, [g.detach() for g in prev_grads]))
        move = norm(torch._foreach_sub([p.detach() for p in params], [q.detach() for q in prev_params]))
    finally:
        restore(model, snap, params)
    return SameBatchDistance(dist=dist, move=move, beta=dist / max(move, 1e-300))


def gradient_distance(prev: Sequence[torch.Tensor], cur: Sequence[torch.Tensor], lr: float) -> GradientDistance:
    """``prev``, ``cur``: gradients g_t and g_{t+1}, lists of tensors of matching shapes."""
    if len(prev) != len(cur) or any(a.shape != b.shape for a, b in zip(prev, cur)):
        raise ConfigError("consecutive gradients must have the same parameter shapes")
    if lr <= 0:
        raise ConfigError(f"lr must be positive to compute beta_t, got {lr}")
    dist = norm(torch._foreach_sub([c.detach() for c in cur], [p.detach() for p in prev]))
    prev_norm = norm(prev)
    return GradientDistance(dist=dist, beta=dist / max(lr * prev_norm, 1e-300), prev_norm=prev_norm)
