"""The :class:`LandscapeProbe` training callback: runs the pure probes of
:mod:`nnlab.landscape.probe` and :mod:`nnlab.landscape.hessian` from the engine's training loop.

Every ``every`` steps (at ``on_after_backward``: gradients ready, before ``optimizer.step()``) it
logs one ``"probe": "landscape"`` record; at the next step one ``"probe": "graddist"`` record (the
seed's ||g_{t+1} - g_t|| and beta_t). Records carry ``step`` = the 1-based index of the step being
taken (= steps done once it ends), so a run resumed from a checkpoint after S steps drops and redoes
exactly the records of steps > S (the engine adds the 1-based ``epoch``). The callback never
changes training (see the probe module).

Single process is the intended use. Under torchrun every rank probes its own batch on the unwrapped
model (no collectives, so no hang), but g there is DDP's all-reduced gradient while g' is local.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nnlab.engine.train import Callback
from nnlab.errors import ConfigError
from nnlab.landscape.bands import GRADDIST, LANDSCAPE
from nnlab.landscape.hessian import top_hessian_eigenvalue
from nnlab.landscape.probe import default_etas, gradient_distance, grad_params, landscape_step


class LandscapeProbe(Callback):
    """Probe the landscape every ``every`` steps.

    eta_factors: step sizes as multiples of the current lr (default: 8 values spaced
    geometrically over [0.5, 4]). hessian_every: also estimate the top Hessian eigenvalue every
    that many steps (0 = off; must be a multiple of ``every``), with ``hessian_iters`` HVPs at most.
    """

    def __init__(self, every: int = 30, eta_factors: Sequence[float] | None = None,
                 hessian_every: int = 0, hessian_iters: int = 20, grad_distance: bool = True):
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
        self._prev: list[torch.Tensor] | None = None  # g_t of the last probed step
        self._prev_step, self._prev_lr = -1, 0.0

    def on_after_backward(self, ctx) -> None:
        step = int(ctx.step) + 1  # 1-based index of the step being taken
        params = grad_params(ctx.model)
        if self._prev is not None:
            if self._prev_step == step - 1 and len(self._prev) == len(params):
                d = gradient_distance(self._prev, [p.grad for p in params], self._prev_lr)
                ctx.log({"probe": GRADDIST, "step": step, "grad_dist": d.dist,
                         "beta_t": d.beta, "prev_grad_norm": d.prev_norm})
            self._prev = None
        if (step - 1) % self.every == 0:
            self._probe(ctx, step, params)

    def _probe(self, ctx, step: int, params: list[torch.Tensor]) -> None:
        lr = float(ctx.lr)
        etas = [f * lr for f in self.eta_factors]
        res = landscape_step(ctx.model, ctx.loss_fn, ctx.x, ctx.y, etas, params=params)
        record = {"probe": LANDSCAPE, "step": step, "lr": lr,
                  "train_loss": float(ctx.loss.detach()), **res.record()}
        if self.hessian_every and (step - 1) % self.hessian_every == 0:
            hess = top_hessian_eigenvalue(ctx.model, ctx.loss_fn, ctx.x, ctx.y, iters=self.hessian_iters,
                                          seed=step, params=params)
            record.update(hess_top=hess.eigenvalue, hess_iters=hess.iterations)
        ctx.log(record)
        if self.grad_distance:
            self._prev = [p.grad.detach().clone() for p in params]
            self._prev_step, self._prev_lr = step, lr

    def state_dict(self) -> dict:
        return {"prev": self._prev, "prev_step": self._prev_step, "prev_lr": self._prev_lr}

    def load_state_dict(self, state: dict) -> None:
        self._prev, self._prev_step = state.get("prev"), int(state.get("prev_step", -1))
        self._prev_lr = float(state.get("prev_lr", 0.0))
