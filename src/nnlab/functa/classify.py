"""Classification on functasets: an MLP on (normalised) latents, with a learning curve."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from nnlab.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nnlab.engine.io import atomic_write, to_jsonable
from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.runs import RunDir, check_out
from nnlab.errors import CheckpointError, ConfigError, DataError, DivergenceError
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
        checks = [("epochs", self.epochs >= 1, "an integer >= 1"),
                  ("batch-size", self.batch_size >= 1, "an integer >= 1"),
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
    """Both splits fitted by one model (else the test latents mean something else), labelled train."""
    hashes = (train.metadata.get("model_hash"), test.metadata.get("model_hash"))
    if None not in hashes and hashes[0] != hashes[1]:
        raise DataError(f"the train and test functasets were fitted by different models (model hash {hashes[0]} "
                        f"against {hashes[1]}); fit both splits with the same run")
    if train.latents.shape[1] != test.latents.shape[1]:
        raise DataError(f"train latents have {train.latents.shape[1]} dims but test latents "
                        f"{test.latents.shape[1]}; fit both splits with the same run")
    if (train.labels < 0).any():
        raise DataError("the train functaset has no labels (-1); classification needs a labelled data set")


@dataclass
class _Fit:
    """What a classifier run carries from epoch to epoch, and through its checkpoint."""

    model: MLP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    g: torch.Generator      # batch order and latent noise
    epoch: int = 0          # epochs done


def _start(config: ClassifyConfig, in_dim: int, num_classes: int, steps: int) -> _Fit:
    torch.manual_seed(config.seed)  # the MLP's init, then its dropout
    model = MLP(in_dim, config.hidden, num_classes, dropout=config.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    return _Fit(model, opt, sched, torch.Generator().manual_seed(config.seed))


def _save(run: RunDir, fit: _Fit) -> None:
    save_checkpoint(run.checkpoint_dir, fit.epoch, fit.model.state_dict(),
                    {"optimizer": fit.opt.state_dict(), "scheduler": fit.sched.state_dict(),
                     "generator": fit.g.get_state(), "rng": rng_state()})


def _resume(run: RunDir, fit: _Fit, record: dict, resume: bool) -> bool:
    """Restore ``fit`` from the run's checkpoint when resuming (True); False for a fresh start.
    A checkpoint without ``resume``, or a resume with other settings, is a one-line error."""
    if not has_checkpoint(run.checkpoint_dir):
        return False
    if not resume:
        raise CheckpointError(f"{run.path} already holds a classifier run with a checkpoint; pass --resume to "
                              "continue it, or choose a new --out folder")
    saved = run.load_config()
    diff = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {record.get(k)!r}" for k in diff)
        raise ConfigError(f"cannot resume {run.path} with other settings ({detail}); use the original ones, "
                          "or a new --out folder")
    ckpt = load_checkpoint(run.checkpoint_dir)
    fit.model.load_state_dict(ckpt.tensors)
    fit.opt.load_state_dict(ckpt.state["optimizer"])
    fit.sched.load_state_dict(ckpt.state["scheduler"])
    fit.g.set_state(ckpt.state["generator"])
    set_rng_state(ckpt.state["rng"])
    fit.epoch = ckpt.step
    return True


def _epoch(fit: _Fit, x: torch.Tensor, y: torch.Tensor, config: ClassifyConfig) -> float:
    """One pass over latents x (N, D) with labels y (N,); returns the mean training loss."""
    fit.model.train()
    total = 0.0
    for idx in torch.randperm(len(x), generator=fit.g).split(config.batch_size):
        xb = x[idx] + config.latent_noise * torch.randn(len(idx), x.shape[1], generator=fit.g)
        loss = nn.functional.cross_entropy(fit.model(xb), y[idx])
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()
        fit.opt.step()
        fit.sched.step()
        total += loss.item() * len(idx)
        if not math.isfinite(total):
            raise DivergenceError(f"classifier training diverged in epoch {fit.epoch + 1} (loss {loss.item()}); "
                                  "start again with a lower --lr")
    return total / len(x)


def train_classifier(train_path: str | Path, test_path: str | Path, out: str | Path,
                     config: ClassifyConfig = ClassifyConfig(), progress: bool = True,
                     resume: bool = False) -> dict:
    """Train an MLP on a train functaset, evaluate on a test functaset. Writes RUN/config.yaml,
    metrics.jsonl (an epoch per record), a checkpoint after every epoch (``resume`` continues a
    killed run, bit-identical to an uninterrupted one), model.safetensors (the MLP's weights plus
    ``normalizer.mean`` / ``normalizer.std``, each (D,)) and summary.json."""
    train, test = load_functaset(train_path), load_functaset(test_path)
    _check(train, test)
    norm = Normalizer.fit(train.latents) if config.normalize else Normalizer(torch.tensor(0.0), torch.tensor(1.0))
    xtr, xte = norm(train.latents), norm(test.latents)                     # (N, D) each
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    run = RunDir(check_out(out))
    record = to_jsonable(asdict(config) | {"train": str(train_path), "test": str(test_path)})
    with run.lock():
        fit = _start(config, xtr.shape[1], num_classes, config.epochs * -(-len(xtr) // config.batch_size))
        resumed = _resume(run, fit, record, resume)
        run.save_config(record)
        log = MetricsLogger(run.metrics_path, resume_step=fit.epoch if resumed else None)
        epochs = range(fit.epoch + 1, config.epochs + 1)
        for epoch in tqdm(epochs, desc="classify", disable=None if progress else True):
            loss = _epoch(fit, xtr, train.labels, config)
            log.log({"epoch": epoch, "step": epoch, "train_loss": loss,
                     "train_top1": accuracy(fit.model, xtr, train.labels),
                     "test_top1": accuracy(fit.model, xte, test.labels)})
            fit.epoch = epoch
            _save(run, fit)
        log.close()
        weights = {**fit.model.state_dict(), "normalizer.mean": norm.mean.expand(xtr.shape[1]),
                   "normalizer.std": norm.std.expand(xtr.shape[1])}
        atomic_write(run.path / "model.safetensors",
                     lambda tmp: save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp))
        summary = {"test_top1": accuracy(fit.model, xte, test.labels),
                   "train_top1": accuracy(fit.model, xtr, train.labels), "epochs": config.epochs,
                   "latent_dim": xtr.shape[1], "train_size": len(xtr), "test_size": len(xte)}
        run.write_summary(summary)
    return summary


def pixel_baseline(data: str, out: str | Path, *, data_dir: str | Path | None = None, epochs: int = 10,
                   resume: bool = False, **options) -> dict:
    """ResNet-18 CD-PreAct trained on the pixels of the same split (``nnlab.engine.train``; ``resume``
    continues a killed run from its checkpoint)."""
    from nnlab.engine.train import TrainConfig, train

    config = TrainConfig(model="resnet18-cdpreact", data=data, data_dir=str(data_dir) if data_dir else None,
                         epochs=epochs, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4, **options)
    return train(config, out, resume=resume).summary
