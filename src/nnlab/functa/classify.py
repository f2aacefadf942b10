"""Classification on functasets: an MLP on (normalised) latents, with a learning curve."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.runs import RunDir
from nnlab.errors import ConfigError, DataError
from nnlab.functa.functaset import Functaset, load_functaset
from nnlab.models.mlp import MLP


@dataclass
class ClassifyConfig:
    hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024])  # MLP hidden widths
    dropout: float = 0.2               # dropout after each hidden layer
    epochs: int = 30                   # passes over the train functaset
    batch_size: int = 256              # latents per step
    lr: float = 1e-3                   # AdamW peak learning rate (one-cycle schedule)
    weight_decay: float = 1e-4         # AdamW decoupled decay
    latent_noise: float = 0.0          # std of Gaussian noise on normalised latents (augmentation)
    normalize: bool = True             # standardise each latent dimension with the train set's mean/std
    seed: int = 0                      # init and batch order

    def __post_init__(self):
        """A one-line ConfigError naming the first bad option (as its flag) and its range."""
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        checks = [("epochs", self.epochs >= 1, "an integer >= 1"), ("batch-size", self.batch_size >= 1, "an integer >= 1"),
                  ("lr", finite(self.lr) and self.lr > 0, "a positive finite number"),
                  ("weight-decay", finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
                  ("latent-noise", finite(self.latent_noise) and self.latent_noise >= 0, "a finite number >= 0")]
        for flag, ok, what in checks:
            if not ok:
                raise ConfigError(f"--{flag} must be {what}, got {getattr(self, flag.replace('-', '_'))}")


@dataclass
class Normalizer:
    """Per-dimension standardisation fitted on the train latents: mean, std (D,)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, latents: torch.Tensor) -> "Normalizer":
        return cls(latents.mean(0), latents.std(0).clamp_min(1e-6))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D)."""
        return (latents - self.mean) / self.std


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on features x (N, D) and labels y (N,)."""
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch), y.split(batch)))
    return correct / max(len(y), 1)


def _check(train: Functaset, test: Functaset) -> None:
    if train.latents.shape[1] != test.latents.shape[1]:
        raise DataError(f"train latents have {train.latents.shape[1]} dims but test latents "
                        f"{test.latents.shape[1]}; fit both splits with the same run")
    if (train.labels < 0).any():
        raise DataError("the train functaset has no labels (-1); classification needs a labelled data set")


def train_classifier(train_path: str | Path, test_path: str | Path, out: str | Path,
                     config: ClassifyConfig = ClassifyConfig(), progress: bool = True) -> dict:
    """Train an MLP on a train functaset, evaluate on a test functaset; writes RUN/summary.json."""
    train, test = load_functaset(train_path), load_functaset(test_path)
    _check(train, test)
    torch.manual_seed(config.seed)
    norm = Normalizer.fit(train.latents) if config.normalize else Normalizer(torch.tensor(0.0), torch.tensor(1.0))
    xtr, xte = norm(train.latents), norm(test.latents)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    model = MLP(xtr.shape[1], config.hidden, num_classes, dropout=config.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(xtr) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    run = RunDir(out)
    run.save_config(asdict(config) | {"train": str(train_path), "test": str(test_path)})
    log = MetricsLogger(run.metrics_path)
    g = torch.Generator().manual_seed(config.seed)
    for epoch in tqdm(range(1, config.epochs + 1), desc="classify", disable=None if progress else True):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xtr), generator=g).split(config.batch_size):
            xb = xtr[idx] + config.latent_noise * torch.randn(len(idx), xtr.shape[1], generator=g)
            loss = nn.functional.cross_entropy(model(xb), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.log({"epoch": epoch, "step": epoch, "train_loss": total / len(xtr),
                 "train_top1": accuracy(model, xtr, train.labels), "test_top1": accuracy(model, xte, test.labels)})
    log.close()
    summary = {"test_top1": accuracy(model, xte, test.labels), "train_top1": accuracy(model, xtr, train.labels),
               "epochs": config.epochs, "latent_dim": xtr.shape[1], "train_size": len(xtr), "test_size": len(xte)}
    run.write_summary(summary)
    return summary


def pixel_baseline(data: str, out: str | Path, *, data_dir: str | Path | None = None, epochs: int = 10,
                   **options) -> dict:
    """ResNet-18 CD-PreAct trained on the pixels of the same split (``nnlab.engine.train``)."""
    from nnlab.engine.train import TrainConfig, train

    config = TrainConfig(model="resnet18-cdpreact", data=data, data_dir=str(data_dir) if data_dir else None,
                         epochs=epochs, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4, **options)
    return train(config, out).summary
