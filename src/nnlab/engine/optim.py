"""Optimisers and learning-rate schedules, by name (the CLI's ``--optimizer`` / ``--schedule``).

``OPTIMIZERS``: ``factory(model, *, lr, momentum, weight_decay, **options) -> torch.optim.Optimizer``.
Factories take the model (not just its parameters) because DessiLBI treats layers by module type.
``slbi`` and ``slbi-adam`` import :mod:`nnlab.lbi` lazily.

``SCHEDULES``: ``factory(*, total_steps, warmup_steps, **options) -> LRFactor``, a picklable
callable ``step -> multiplier of each param group's initial lr``, applied per optimiser step by
:func:`build_scheduler` (a ``LambdaLR``, so its state goes into checkpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from nnlab.errors import ConfigError
from nnlab.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False, **options) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, **options)


@OPTIMIZERS.register("adam")
def adam(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
         **options) -> torch.optim.Optimizer:
    """Adam; ``momentum`` is beta1 unless ``betas`` is given."""
    options.setdefault("betas", (momentum, 0.999))
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **options)


@OPTIMIZERS.register("adamw")
def adamw(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
          **options) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); ``momentum`` is beta1 unless ``betas`` is given."""
    options.setdefault("betas", (momentum, 0.999))
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **options)


def _lbi(builder: str):
    def factory(model: nn.Module, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                **options) -> torch.optim.Optimizer:
        try:
            import nnlab.lbi as lbi
        except ImportError as exc:
            if exc.name is not None and not exc.name.startswith("nnlab"):
                raise
            raise ConfigError(f"this nnlab has no DessiLBI module (nnlab.lbi) yet, needed by the "
                              f"optimizer {builder!r}; choose sgd, adam or adamw") from None
        return getattr(lbi, builder)(model, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)

    return factory


OPTIMIZERS.register("slbi", _lbi("build_slbi"))
OPTIMIZERS.register("slbi-adam", _lbi("build_slbi_adam"))


def build_optimizer(name: str, model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    **options) -> torch.optim.Optimizer:
    """``OPTIMIZERS.get(name)(model, ...)`` with bad hyperparameters turned into a ConfigError."""
    factory = OPTIMIZERS.get(name)
    try:
        return factory(model, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer {name!r} rejected its settings (lr={lr}, momentum={momentum}, "
                          f"weight_decay={weight_decay}, options={options}): {exc}; fix the value or "
                          f"drop the option") from None


# --------------------------------------------------------------------------- schedules


@dataclass
class LRFactor:
    """Linear warm-up over ``warmup_steps`` then a decay; ``self(step)`` is the lr multiplier.

    step counts optimiser steps done (0 for the first step). Plain-data fields only, so that
    ``LambdaLR.state_dict()`` stores them and ``torch.load(weights_only=True)`` reads them back.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_factor: float = 0.0
    milestones: list = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)  # progress in [0, 1] after warm-up
        if self.kind == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return self.gamma ** sum(t >= m for m in self.milestones)
        return 1.0


def _schedule(kind: str):
    def factory(*, total_steps: int, warmup_steps: int = 0, **options) -> LRFactor:
        try:
            return LRFactor(kind, int(total_steps), int(warmup_steps), **options)
        except TypeError as exc:
            raise ConfigError(f"schedule {kind!r} got an unknown option ({exc}); it takes "
                              "min_factor (cosine), milestones and gamma (step)") from None

    return factory


for _kind in ("cosine", "step", "constant"):
    SCHEDULES.register(_kind, _schedule(_kind))


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, total_steps: int,
                    warmup_steps: int = 0, **options) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` for schedule ``name``; call ``.step()`` after every ``optimizer.step()``."""
    if warmup_steps < 0 or total_steps < 1:
        raise ConfigError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    factor = SCHEDULES.get(name)(total_steps=total_steps, warmup_steps=warmup_steps, **options)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
