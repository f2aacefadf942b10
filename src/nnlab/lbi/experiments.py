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


@dataclass
class LBITrainConfig(TrainConfig):
    """:class:`TrainConfig` with the defaults of ``nnlab lbi train``: DessiLBI (SGD flavour) for 32
    epochs at lr 0.1 without weight decay, the DessiLBI paper's LeNet-5 / MNIST recipe."""

    optimizer: str = "slbi"
    epochs: int = 32
    lr: float = 0.1
    weight_decay: float = 0.0


@dataclass
class LBIOptions:
    """DessiLBI hyperparameters passed to the optimiser (see :class:`nnlab.lbi.DessiLBI`)."""

    kappa: float = 1.0                # damping factor
    mu: float = 20.0                  # coupling: W is pulled to Gamma by 1/mu
    lam: float = 1.0                  # shrinkage threshold lambda
    conv_lam: float | None = None     # lambda of conv weights (unset: lam)
    layer_lam: dict | None = None     # per-layer lambda, {layer: lam}
    layer_mu: dict | None = None      # per-layer mu, {layer: mu}
    gamma_lr: float | None = None     # step of V (unset: the lr)
    compiled: bool | None = None      # fused step (C++ kernel for conv weights, torch.compile for the rest)
    decoupled_wd: bool | None = None  # SGD flavour: decoupled decay instead of the official coupled L2

    def as_options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class LBIRecordOptions:
    """What :class:`LBICallback` records besides sparsity."""

    sample: int = 16         # Gamma entries (filters for conv) followed per layer (0: none)
    eval_wstar: bool = True  # evaluate the sparse model W * 1[Gamma != 0] every epoch

    def __post_init__(self):
        if not isinstance(self.sample, int) or self.sample < 0:
            raise ConfigError(f"sample (Gamma entries followed per layer) must be an integer >= 0, got {self.sample}")


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


def train_lbi(config: TrainConfig, out: str | Path, *, resume: bool = False,
              record: LBIRecordOptions | None = None) -> TrainResult:
    """Train with :class:`LBICallback`; add ``sparsity`` (last epoch, per layer; empty for non-LBI
    optimisers) and ``test_top1_wstar`` / ``test_top5_wstar`` to ``summary.json``."""
    record = record or LBIRecordOptions()
    result = train(config, out, resume=resume, callbacks=[LBICallback(record.sample, record.eval_wstar,
                                                                      config.seed)])
    last = result.history[-1] if result.history else {}  # empty when max_steps stopped epoch 1
    extra = {"sparsity": last.get("sparsity", {})}
    extra.update({k: last[k] for k in ("test_top1_wstar", "test_top5_wstar") if k in last})
    result.summary.update(extra)
    run = RunDir(out)
    if run.summary_path.is_file():
        run.write_summary(result.summary)
    return result
