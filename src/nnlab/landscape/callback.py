"""The :class:`LandscapeProbe` training callback: runs the pure probes of
:mod:`nnlab.landscape.probe` and :mod:`nnlab.landscape.hessian` from the engine's training loop.

Every ``every`` steps (at ``on_after_backward``: gradients ready, before ``optimizer.step()``) it
logs one ``"probe": "landscape"`` record; at the next step one ``"probe": "graddist"`` record: the
seed's consecutive-batch ||g_{t+1} - g_t|| and beta_t, and the same-batch variant
(``grad_dist_same``, ``move_norm``, ``beta_same``, measured at the end of step t on its batch).
Records carry ``step`` = the 1-based index of the step being taken (= steps done once it ends), so
a run resumed from a checkpoint after S steps drops and redoes exactly the records of steps > S
(the engine adds the 1-based ``epoch``). The callback never changes training (see the probe module).

The probes see what the step saw: the RNG state from before the step's forward is replayed (so
dropout masks are the step's own), the forward runs in the training precision (bf16 autocast when
training used it), and with gradient clipping the points lie along the clipped step (records then
carry ``land_step_norm`` < ``land_grad_norm``).

Single process is the intended use. Under torchrun every rank probes its own batch on the unwrapped
model (no collectives, so no hang), but g there is DDP's all-reduced gradient while g' is local.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nnlab.engine.checkpoint import rng_state
from nnlab.engine.train import Callback
from nnlab.errors import ConfigError
from nnlab.landscape.bands import GRADDIST, LANDSCAPE
from nnlab.landscape.hessian import top_hessian_eigenvalue
from nnlab.landscape.probe import (clipped, default_etas, gradient_distance, grad_params, landscape_step,
                                   same_batch_distance)


class LandscapeProbe(Callback):
    """Probe the landscape every ``every`` steps.

    eta_factors: step sizes as multiples of the current lr (default: 8 values spaced
    geometrically over [0.5, 4]). hessian_every: also estimate the top Hessian eigenvalue every
    that many steps (0 = off; must be a multiple of ``every``), with ``hessian_iters`` HVPs at most.
    grad_distance: log the graddist record (consecutive-batch and same-batch) after each probe.
    """

    def __init__(self, every: int = 30, eta_factors: Sequence[float] | None = None,
                 hessian_every: int = 0, hessian_iters: int = 100, grad_distance: bool = True):
        if every < 1:
            raise ConfigError(f"probe interval must be at least 1 step, got every={every}")
        if hessian_every < 0 or (hessian_every and hessian_every % every):
            raise ConfigError(f"hessian_every must be 0 (off) or a multiple of every={every}, "
                              f"got {hessian_every}")
        self.every, self.hessian_every, self.hessian_iters = every, hessian_every, hessian_iters
        self.eta_factors = list(eta_factors) if eta_factors is not None else default_etas(1.0)
        if not self.eta_factors or min(self.eta_factors) <= 0:
            raise ConfigError(f"eta factors must be positive multiples of lr, got {self.eta_factors}")
        self.grad_distance = grad_distance
        self._rng: dict | None = None  # RNG state before the forward of a probed step
        self._w: list[torch.Tensor] | None = None  # w_t of the probed step, until its end
        self._prev: list[torch.Tensor] | None = None  # g_t of the last probed step
        self._prev_step, self._prev_lr = -1, 0.0
        self._same: dict = {}  # same-batch values of step t, logged with step t+1

    def _probed(self, step: int) -> bool:
        return (step - 1) % self.every == 0

    def on_step_start(self, ctx) -> None:
        self._rng = rng_state() if self._probed(int(ctx.step) + 1) else None

    def on_after_backward(self, ctx) -> None:
        step = int(ctx.step) + 1  # 1-based index of the step being taken
        params = grad_params(ctx.model)
        if self._prev is not None:
            if self._prev_step == step - 1 and len(self._prev) == len(params):
                d = gradient_distance(self._prev, [p.grad for p in params], self._prev_lr)
                ctx.log({"probe": GRADDIST, "step": step, "grad_dist": d.dist,
                         "beta_t": d.beta, "prev_grad_norm": d.prev_norm, **self._same})
            self._prev, self._same = None, {}
        if self._probed(step):
            self._probe(ctx, step, params)

    def _probe(self, ctx, step: int, params: list[torch.Tensor]) -> None:
        lr, clip = float(ctx.lr), float(ctx.config.grad_clip)
        etas = [f * lr for f in self.eta_factors]
        grads = [p.grad for p in params]
        res = landscape_step(ctx.model, ctx.loss_fn, ctx.x, ctx.y, etas, params=params,
                             direction=clipped(grads, clip), replay_rng=self._rng, autocast=ctx.autocast)
        record = {"probe": LANDSCAPE, "step": step, "lr": lr,
                  "train_loss": float(ctx.loss.detach()), **res.record()}
        if self.hessian_every and (step - 1) % self.hessian_every == 0:
            hess = top_hessian_eigenvalue(ctx.model, ctx.loss_fn, ctx.x, ctx.y, iters=self.hessian_iters,
                                          seed=step, params=params, replay_rng=self._rng,
                                          autocast=ctx.autocast)
            record.update(hess_top=hess.eigenvalue, hess_iters=hess.iterations,
                          hess_converged=hess.converged, hess_residual=hess.residual)
        ctx.log(record)
        if self.grad_distance:
            self._prev = [p.grad.detach().clone() for p in params]
            self._prev_step, self._prev_lr = step, lr
            self._w = [p.detach().clone() for p in params]

    def on_step_end(self, ctx) -> None:
        if self._w is None:
            return
        params = grad_params(ctx.model)
        s = same_batch_distance(ctx.model, ctx.loss_fn, ctx.x, ctx.y, self._prev, self._w, params,
                                replay_rng=self._rng, autocast=ctx.autocast)
        self._same = {"grad_dist_same": s.dist, "move_norm": s.move, "beta_same": s.beta}
        self._w = None

    def state_dict(self) -> dict:
        return {"prev": self._prev, "prev_step": self._prev_step, "prev_lr": self._prev_lr,
                "same": self._same}

    def load_state_dict(self, state: dict) -> None:
        self._prev, self._prev_step = state.get("prev"), int(state.get("prev_step", -1))
        self._prev_lr = float(state.get("prev_lr", 0.0))
        self._same = dict(state.get("same") or {})
