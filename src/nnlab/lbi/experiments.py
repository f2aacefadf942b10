"""DessiLBI experiments on top of the engine: training runs with the LBI callback, and their
summaries (``summary.json`` gains ``sparsity`` and the W* accuracy)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnlab.engine.runs import RunDir
from nnlab.engine.train import TrainConfig, TrainResult, train
from nnlab.errors import ConfigError
from nnlab.lbi.callback import LBICallback

LBI_OPTIMIZERS = ("slbi", "slbi-adam")
LBI_OPTION_NAMES = ("kappa", "mu", "lam", "conv_lam", "layer_lam", "layer_mu", "gamma_lr", "compiled",
                    "decoupled_wd")


@dataclass
class LBIOptions:
    """DessiLBI hyperparameters passed to the optimiser (see :class:`nnlab.lbi.DessiLBI`)."""

    kappa: float = 1.0
    mu: float = 20.0
    lam: float = 1.0
    conv_lam: float | None = None
    layer_lam: dict | None = None
    layer_mu: dict | None = None
    gamma_lr: float | None = None
    compiled: bool | None = None  # fused step (C++ kernel for conv weights, torch.compile for the rest)
    decoupled_wd: bool | None = None  # SGD flavour: decoupled decay instead of the official coupled L2

    def as_options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def lbi_train_config(lbi: LBIOptions | None = None, **config: Any) -> TrainConfig:
    """A :class:`TrainConfig` whose ``optimizer_options`` carry ``lbi`` for DessiLBI optimisers."""
    cfg = TrainConfig(**config)
    if cfg.optimizer in LBI_OPTIMIZERS:
        cfg.optimizer_options = {**(lbi or LBIOptions()).as_options(), **cfg.optimizer_options}
    elif lbi is not None:
        raise ConfigError("--kappa/--mu/--lam/--conv-lam/--layer-lam/--layer-mu/--gamma-lr/--compiled apply to "
                          f"{' or '.join(LBI_OPTIMIZERS)}, not to optimizer {cfg.optimizer!r}; drop them or "
                          "choose slbi")
    return cfg


def train_lbi(config: TrainConfig, out: str | Path, *, resume: bool = False, sample: int = 16,
              eval_wstar: bool = True) -> TrainResult:
    """Train with :class:`LBICallback`; add ``sparsity`` (last epoch, per layer; empty for non-LBI
    optimisers) and ``test_top1_wstar`` / ``test_top5_wstar`` to ``summary.json``."""
    result = train(config, out, resume=resume, callbacks=[LBICallback(sample, eval_wstar, config.seed)])
    last = result.history[-1] if result.history else {}  # empty when max_steps stopped epoch 1
    extra = {"sparsity": last.get("sparsity", {})}
    extra.update({k: last[k] for k in ("test_top1_wstar", "test_top5_wstar") if k in last})
    result.summary.update(extra)
    run = RunDir(out)
    if run.summary_path.is_file():
        run.write_summary(result.summary)
    return result
