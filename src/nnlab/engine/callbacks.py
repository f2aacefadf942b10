"""The contract studies code against: :class:`Callback` hooks into :func:`nnlab.engine.train.train`
and the :class:`TrainContext` they see (see docs/architecture.md, "Training callbacks")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from nnlab.data import DatasetSplits
from nnlab.engine.runs import RunDir

if TYPE_CHECKING:
    from nnlab.engine.train import TrainConfig


@dataclass
class TrainContext:
    """What callbacks see. ``model`` is the plain module (never the DDP wrapper); ``x`` (B, C, H, W),
    ``y`` (B,) and ``loss`` (0-d tensor, with graph until the step ends) are the current batch (with
    Mixup / CutMix, x and y as the loader gave them, before mixing; loss of the mixed batch);
    ``step`` counts optimiser steps done; ``epoch`` is 0-based; ``lr`` is the first group's lr;
    ``log(record)`` writes a metrics record (rank 0 only; ``step``/``epoch`` filled in);
    ``autocast``: the forward runs under bf16 autocast (probes must use the same precision)."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    step: int
    epoch: int
    x: torch.Tensor | None
    y: torch.Tensor | None
    loss: torch.Tensor | None
    lr: float
    run: RunDir
    log: Callable[[dict], None]
    data: DatasetSplits
    scheduler: Any = None
    batch_index: int = 0
    rank: int = 0
    world_size: int = 1
    autocast: bool = False


class Callback:
    """Hooks into :func:`train`; override any. State returned by :meth:`state_dict` (tensors and
    plain data only) is saved in checkpoints and handed back to :meth:`load_state_dict` on resume."""

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_step_start(self, ctx: TrainContext) -> None: ...  # batch in ctx.x/ctx.y, before the forward

    def on_after_backward(self, ctx: TrainContext) -> None: ...  # grads ready, before optimizer.step()

    def on_step_end(self, ctx: TrainContext) -> None: ...  # after optimizer.step(); ctx.step = steps done

    def on_epoch_end(self, ctx: TrainContext, record: dict) -> None: ...  # after evaluation; may add keys

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
