"""Shared helpers of the pruning study: evaluation, throughput, data, base models, a small fit loop."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnlab.data import BatchLoader, DatasetSplits, ImageSet
from nnlab.data.transforms import Compose, Normalize, Resize
from nnlab.errors import ConfigError, DivergenceError


@dataclass
class Accuracy:
    """Top-1 / top-5 accuracy as fractions in [0, 1] over ``n`` images (the one unit of every CSV
    and JSON; tables, plots and printed lines show percent)."""

    top1: float
    top5: float
    n: int
    nonfinite: int = 0  # images whose logits hold a NaN or an infinity (a diverged model)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def eval_transform(data: DatasetSplits, image_size: int):
    """Resize (when the model's input size differs) then normalise with the train statistics."""
    steps = [] if data.shape[-1] == image_size else [Resize(image_size)]
    return Compose(steps + [Normalize(data.mean, data.std)])


@torch.no_grad()
def accuracy(model: nn.Module, images: ImageSet, transform, batch_size: int = 256,
             desc: str = "eval") -> Accuracy:
    """Top-1 and top-5 of ``model`` ((B, C, H, W) -> (B, K) logits) on ``images``."""
    model.eval()
    device = model_device(model)
    loader = BatchLoader(images, batch_size, transform=transform)
    top1 = top5 = n = nonfinite = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=None):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        nonfinite += int((~torch.isfinite(logits)).any(-1).sum())
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        top1 += int((top[:, 0] == y).sum())
        top5 += int((top == y[:, None]).any(-1).sum())
        n += len(y)
    return Accuracy(top1 / max(n, 1), top5 / max(n, 1), n, nonfinite)


@torch.no_grad()
def throughput(model: nn.Module, x: torch.Tensor, *, warmup: int = 2, repeats: int = 5,
               min_time: float = 0.0) -> float:
    """Images per second of ``model`` on batch ``x`` (B, C, H, W): the fastest of ``repeats`` timed
    forward passes after ``warmup`` untimed ones (keeps going until ``min_time`` s are spent). The
    fastest pass is the one least disturbed by other processes (as ``timeit`` advises)."""
    model.eval()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # GPU kernels run asynchronously
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
    return x.shape[0] / min(times)


def check_loss(loss: torch.Tensor, what: str, flags: str) -> None:
    """A one-line DivergenceError naming the training (``what``) and the option(s) to lower (``flags``)
    when ``loss`` is NaN or infinite, instead of pruning with garbage weights."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise DivergenceError(f"{what} diverged (loss {float(loss.detach())}); start again with a lower {flags}")


def check_weights(params: Iterable[torch.Tensor], what: str, flags: str) -> None:
    """The same error when training ended with NaN or infinite weights (its last step's loss was still finite)."""
    if not all(bool(torch.isfinite(p.detach()).all()) for p in params):
        raise DivergenceError(f"{what} diverged (its weights are not finite); start again with a lower {flags}")


def fit(model: nn.Module, params: Iterable[torch.nn.Parameter], batches: Callable[[int], Iterable],
        *, epochs: int, lr: float, loss_fn: Callable, weight_decay: float = 0.0, desc: str = "fit",
        clip: float = 1.0, lr_flag: str = "learning rate") -> list[float]:
    """A small AdamW loop with cosine decay: ``loss_fn(model, x, y) -> scalar``; returns epoch losses.

    batches(epoch) yields (x, y). Used for P-ViT fine-tuning and AP-ViT agents; a NaN loss is a
    DivergenceError naming ``lr_flag``.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * sum(1 for _ in batches(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    losses, device = [], params[0].device
    for epoch in range(epochs):
        model.train()
        run, count = 0.0, 0
        for x, y in tqdm(batches(epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None):
            x, y = (v.to(device) if isinstance(v, torch.Tensor) else v for v in (x, y))
            loss = loss_fn(model, x, y)
            check_loss(loss, desc, lr_flag)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            run, count = run + float(loss.detach()), count + 1
        losses.append(run / max(count, 1))
    check_weights(params, desc, lr_flag)
    model.eval()
    return losses


def ce_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train_loader(data: DatasetSplits, batch_size: int, image_size: int, seed: int = 0,
                 limit: int | None = None) -> Callable[[int], Iterable]:
    """batches(epoch) over the train split (random crop + normalise), optionally a random ``limit``."""
    from nnlab.data.transforms import RandomCrop
    images = data.train.random_subset(limit, seed)
    steps = [] if data.shape[-1] == image_size else [Resize(image_size)]
    t = Compose(steps + [RandomCrop(image_size, padding=max(1, image_size // 8)), Normalize(data.mean, data.std)])
    loader = BatchLoader(images, batch_size, shuffle=True, transform=t, drop_last=True, seed=seed)

    def batches(epoch: int):
        loader.set_epoch(epoch)
        return iter(loader)
    return batches


def calibration_batch(data: DatasetSplits, image_size: int, n: int, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` train images (n, C, S, S), normalised, and their labels (n,) from a fixed random draw."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    x = data.train.images[idx].float().div(255)
    return eval_transform(data, image_size)(x, g), data.train.labels[idx]


def ensure_dir(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
