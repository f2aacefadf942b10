"""The classifier train/eval loop: any model, any optimiser, resumable, optionally data-parallel.

>>> result = train(TrainConfig(model="lenet5", data="mnist-5k", epochs=3), "runs/quickstart")
>>> result.summary["test_top1"]

A run folder (:class:`nnlab.engine.runs.RunDir`) gets ``config.yaml`` at the start, ``metrics.jsonl``
(a record every ``log_every`` steps and one per epoch), a checkpoint every epoch and every
``checkpoint_every`` steps, and ``summary.json`` at the end. ``train(..., resume=True)`` continues from
the latest checkpoint, mid-epoch included, and ends with bit-identical weights and the same metrics
as an uninterrupted run: batch order, augmentation and Mixup / CutMix (``mixup_alpha``, ``cutmix_alpha``;
:mod:`nnlab.data.mix`) are functions of (seed, epoch, batch index),
and the checkpoint holds the optimiser, schedule, RNG states, counters, running epoch sums, history
and the callbacks' states. At the end ``model.safetensors`` holds the final weights alone (what a
published copy of the run ships; :func:`nnlab.engine.trained.load_trained_run` rebuilds the run
from either). A NaN/inf loss, or non-finite weights when a checkpoint is due, raises
:class:`nnlab.errors.DivergenceError` before anything is saved, so the last good checkpoint stays.

Under ``torchrun`` each process trains on its shard of every epoch's batch order (``batch_size`` is
per process), gradients are averaged by DDP, evaluation sums are reduced over ranks, and only rank 0
writes files.

Callbacks (:class:`Callback`) see a :class:`TrainContext` at fixed points of the loop; studies use them
to add probes or proximal steps without copying the loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from nnlab.data import BatchLoader, DatasetSplits
from nnlab.data.base import batch_key
from nnlab.data.mix import mix_batch
from nnlab.data.transforms import Normalize, train_transform
from nnlab.engine import distributed as D
from nnlab.engine.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nnlab.engine.distill import distill_loss, load_teacher, teacher_logits
from nnlab.engine.io import to_jsonable
from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.precision import bf16_autocast, use_bf16
from nnlab.engine.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from nnlab.engine.callbacks import Callback, TrainContext
from nnlab.engine.evaluate import EvalResult, evaluate, topk_correct, topk_correct_reference
from nnlab.engine.runs import RunDir, check_out
from nnlab.engine.trained import build_model, load_init_weights, run_data, save_final_weights
from nnlab.errors import CheckpointError, ConfigError, DivergenceError

# The callback contract and evaluation live in their own modules; importable from here as before.
__all__ = ["Callback", "EvalResult", "TrainConfig", "TrainContext", "TrainResult", "evaluate", "topk_correct",
           "topk_correct_reference", "train"]

# Config keys that may change between a run and its resumption (they do not change the numbers).
RESUME_MAY_DIFFER = ("device", "data_dir", "progress", "max_steps", "threads", "config_changes")
# Settings a resume may change on purpose (e.g. a lower lr after a divergence): each change is
# logged as an ``"event": "config_change"`` record and appended to ``config_changes`` in config.yaml.
RESUME_OVERRIDES = ("lr", "grad_clip", "schedule", "schedule_options", "warmup_steps")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``RUN/config.yaml``.

    batch_size is per process. checkpoint_every counts optimiser steps (0: only at epoch ends);
    eval_every counts epochs (the last epoch is always evaluated). max_steps stops the run after
    that many steps without changing its schedule (the lr at step t is the same as in the full run;
    a mid-epoch stop saves a checkpoint, so ``resume`` with a larger or no max_steps continues it
    bit-identically, and ``summary.json`` says ``"complete": false``). threads sets torch's CPU
    thread count (unset: torch's default); ``config.yaml`` records the count used, since CPU results
    are bit-identical only at the same count. train_limit / test_limit keep a seeded random subset.
    init_from starts the model from another run's weights (its folder: the latest checkpoint, else
    ``model.safetensors``; or a ``.safetensors`` file of the same model) with a fresh optimiser and
    schedule: fine-tuning, or a second cosine cycle. deterministic asks torch for deterministic
    kernels (GPU runs bit-identical across resumes, slower); CPU runs are deterministic without it.
    schedule_options go to the schedule (``min_factor`` for cosine, ``milestones`` as fractions
    of training and ``gamma`` for step). grad_clip 0 means no clipping. crop_padding is the
    random crop's padding with augment (unset: 4 pixels for images of 28 pixels or more, else 2).
    """

    model: str = "lenet5"                  # a model of the zoo (nnlab.models.MODELS)
    model_options: dict = field(default_factory=dict)
    data: str = "mnist-5k"                 # a data set (nnlab data list)
    data_dir: str | None = None            # data folder or .tar.gz (not needed for mnist-5k)
    data_options: dict = field(default_factory=dict)
    epochs: int = 10                       # passes over the train split
    batch_size: int = 128                  # per process
    eval_batch_size: int = 1000            # per process
    optimizer: str = "sgd"                 # sgd, adam, adamw, slbi, slbi-adam (nnlab.engine.optim)
    lr: float = 0.05                       # peak learning rate
    momentum: float = 0.9                  # SGD momentum / Adam beta1
    weight_decay: float = 5e-4             # L2 (decoupled for adamw)
    optimizer_options: dict = field(default_factory=dict)
    schedule: str = "cosine"               # per-step lr schedule: cosine, step, constant
    schedule_options: dict = field(default_factory=dict)
    warmup_steps: int = 0                  # linear lr warm-up
    label_smoothing: float = 0.0           # in [0, 1)
    mixup_alpha: float = 0.0               # Mixup, lam ~ Beta(alpha, alpha) per batch (DeiT: 0.8); 0 = off
    cutmix_alpha: float = 0.0              # CutMix, likewise (DeiT: 1.0); with Mixup each batch uses one of the two
    grad_clip: float = 0.0                 # max gradient norm; 0 = off
    distill_from: str | None = None        # a trained teacher run folder: distil from its logits (nnlab.engine.distill)
    distill_alpha: float = 0.5             # weight of the distillation term (1 - alpha: the labels' cross-entropy)
    distill_temperature: float = 0.0       # 0: hard distillation (DeiT); > 0: soft, at this temperature (Hinton)
    distill_online: bool = False           # run the teacher on each augmented batch (the student's own view) instead of once
    distill_bf16: bool = False             # the teacher's forward under bf16 autocast (GPUs; CPUs with AMX / AVX512-BF16)
    augment: bool = False                  # random crop with padding (and --flip)
    crop_padding: int | None = None        # padding of the random crop (unset: 4 for 28+ pixel images, else 2)
    flip: bool = False                     # random horizontal flips with --augment (not for digits)
    trivial_augment: bool = False          # TrivialAugment (wide) after crop and flip, with --augment
    seed: int = 0                          # model init, batch order, augmentation
    log_every: int = 50                    # steps between metric records
    checkpoint_every: int = 0              # steps between checkpoints; 0 = epoch ends only
    eval_every: int = 1                    # epochs between test evaluations (the last is always evaluated)
    device: str = "auto"                   # auto (a GPU if any), cpu or cuda
    bf16: bool = False                     # bf16 autocast (GPUs; CPUs with AMX / AVX512-BF16, else float32 with a warning)
    channels_last: bool = False            # conv nets in NHWC memory (with bf16 on an AMX CPU: 3.3x for cnn-fast-cifar)
    deterministic: bool = False            # deterministic GPU kernels (slower)
    max_steps: int | None = None           # stop after N steps, schedule unchanged (--resume without it continues)
    threads: int | None = None             # torch CPU threads (unset: torch's choice); config.yaml records the count
    train_limit: int | None = None         # train on N random train images (seeded)
    test_limit: int | None = None          # test on N random test images (seeded)
    progress: bool = True                  # progress bars and epoch lines
    init_from: str | None = None           # start from these weights (run folder or .safetensors); fresh optimiser

    def validate(self) -> "TrainConfig":
        """Raise a ConfigError naming the first bad value and its valid range; return self."""
        OPTIMIZERS.get(self.optimizer)  # a ConfigError listing the choices
        SCHEDULES.get(self.schedule)
        checks = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
                  ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("mixup_alpha", math.isfinite(self.mixup_alpha) and self.mixup_alpha >= 0, ">= 0 (0: off)"),
                  ("cutmix_alpha", math.isfinite(self.cutmix_alpha) and self.cutmix_alpha >= 0, ">= 0 (0: off)"),
                  ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
                  ("crop_padding", self.crop_padding is None or self.crop_padding >= 0, ">= 0 or unset"),
                  ("log_every", self.log_every >= 1, ">= 1"),
                  ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0: only at epoch ends)"),
                  ("eval_every", self.eval_every >= 1, ">= 1"),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or unset"),
                  ("threads", self.threads is None or self.threads >= 1, ">= 1 or unset"),
                  ("train_limit", self.train_limit is None or self.train_limit >= 1, ">= 1 or unset"),
                  ("test_limit", self.test_limit is None or self.test_limit >= 1, ">= 1 or unset")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if not 0 <= self.distill_alpha <= 1 or not self.distill_temperature >= 0:
            raise ConfigError(f"distill_alpha must be in [0, 1] and distill_temperature >= 0 (0: hard labels), "
                              f"got {self.distill_alpha!r} and {self.distill_temperature!r}")
        if self.distill_from and not self.distill_online and (self.mixup_alpha or self.cutmix_alpha):
            raise ConfigError("precomputed distillation targets are per image, so they do not mix with Mixup / "
                              "CutMix; add --distill-online (the teacher sees the mixed batch), or drop "
                              "--mixup-alpha / --cutmix-alpha")
        if (self.distill_online or self.distill_bf16) and not self.distill_from:
            raise ConfigError("--distill-online / --distill-bf16 set the teacher's forward; give the teacher "
                              "run with --distill-from RUN, or drop them")
        if self.trivial_augment and not self.augment:
            raise ConfigError("trivial_augment acts after the random crop; add --augment (or drop --trivial-augment)")
        for name in ("model_options", "data_options", "optimizer_options", "schedule_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping of option: value, got {getattr(self, name)!r}")
        D.resolve_device(self.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values, as written to ``config.yaml`` and read back."""
        return yaml.safe_load(yaml.safe_dump(to_jsonable(dataclasses.asdict(self)), sort_keys=False))


@dataclass
class TrainResult:
    """summary: what ``summary.json`` holds; history: one record per epoch; model: the trained
    (unwrapped) model on its device; run: the run folder."""

    summary: dict[str, Any]
    model: nn.Module
    run: RunDir
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, out: str | Path, *, resume: bool = False,
          callbacks: Sequence[Callback] = (), model: nn.Module | None = None,
          data: DatasetSplits | None = None) -> TrainResult:
    """Train ``model`` (default: :func:`nnlab.engine.trained.build_model`) on ``data`` (default:
    ``load_dataset(config.data, ...)``) into run folder ``out``; see the module docstring.

    Raises CheckpointError when ``out`` already has a checkpoint and ``resume`` is False, ConfigError
    when resuming with a config that differs from the saved one, DivergenceError on a NaN/inf loss
    (the last good checkpoint stays in place).
    """
    from nnlab.data import DATASETS
    from nnlab.models import MODELS

    config.validate()
    if model is None:
        MODELS.get(config.model)  # before the data set is loaded: a mistyped name fails at once
    if data is None:
        DATASETS.get(config.data)
    trainer = _Trainer(config, Path(out), resume, list(callbacks), model, data)
    return trainer.run()


def _seed_everything(seed: int, deterministic: bool = False) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_threads(config: TrainConfig) -> TrainConfig:
    """Apply ``config.threads`` (when set) and return the config with the count in use."""
    if config.threads is not None and config.threads != torch.get_num_threads():
        torch.set_num_threads(config.threads)
    return dataclasses.replace(config, threads=torch.get_num_threads())


def mix_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of the Mixup / CutMix draws of global batch ``batch`` of ``epoch``: a function of
    (seed, epoch, batch) only, so that a resumed run mixes as an uninterrupted one, and seeded apart
    from the same batch's augmentation (whose seed is :func:`batch_key` itself)."""
    return torch.Generator().manual_seed(batch_key(seed, epoch, batch) * 2 + 1)


def _config_diff(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ; a key that a run saved before it existed counts as its default."""
    defaults = TrainConfig().to_dict()
    keys = (set(saved) | set(current)) - set(RESUME_MAY_DIFFER)
    return sorted(k for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


@dataclass
class _Progress:
    """Counters and running sums saved in checkpoints. batch: next batch index within ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    train_time: float = 0.0   # seconds in training loops, over all epochs and resumes
    epoch_time: float = 0.0   # of which in the current epoch (a mid-epoch checkpoint keeps it)
    history: list = field(default_factory=list)


class _Trainer:
    """One run of :func:`train`; methods are the loop's stages."""

    def __init__(self, config: TrainConfig, out: Path, resume: bool, callbacks: list[Callback],
                 model: nn.Module | None, data: DatasetSplits | None):
        self.callbacks = callbacks
        self.config = _resolve_threads(config)
        config = self.config
        self.dist = D.init_from_env(config.device)
        self.main = self.dist.rank == 0
        self.run_dir = RunDir(check_out(out), create=False)  # made when training starts (a bad option leaves none)
        self.overrides: dict[str, tuple] = {}  # resume-time changes of RESUME_OVERRIDES: key -> (old, new)
        self.resuming = self._check_resume(resume)
        self.autocast = use_bf16(config.bf16, self.dist.device)
        self.teacher_bf16 = use_bf16(config.distill_bf16, self.dist.device, "--distill-bf16")
        _seed_everything(config.seed, config.deterministic)
        self.data = run_data(config, data)
        self.model = (model if model is not None else build_model(config, self.data)).to(self.dist.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.init_from and not self.resuming:  # on resume the checkpoint holds the weights
            load_init_weights(self.model, config.init_from)
        self.net = self._wrap(self.model)
        self.optimizer = build_optimizer(config.optimizer, self.model, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, **config.optimizer_options)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.train_loader, self.test_loader = self._loaders()
        self.teacher, self.teacher_targets, self.teacher_s = self._teacher()
        self.total_steps = config.epochs * len(self.train_loader)  # max_steps never shortens it
        self.scheduler = build_scheduler(self.optimizer, config.schedule, total_steps=self.total_steps,
                                         warmup_steps=config.warmup_steps, **config.schedule_options)
        self.p = _Progress()

    # ---- set-up

    def _check_resume(self, resume: bool) -> bool:
        ckpt_dir = self.run_dir.checkpoint_dir
        if not has_checkpoint(ckpt_dir):
            return False
        if not resume:
            raise CheckpointError(f"{self.run_dir.path} already holds a run with a checkpoint; pass "
                                  "--resume to continue it, or choose a new --out folder")
        saved, current = self.run_dir.load_config(), self.config.to_dict()
        self.saved_config = saved
        if saved.get("threads") not in (None, current["threads"]):
            warnings.warn(f"resuming {self.run_dir.path} on {current['threads']} threads; it ran on "
                          f"{saved['threads']}, so it will not be bit-identical to an uninterrupted run",
                          stacklevel=4)
        diff = _config_diff(saved, current)
        self.overrides = {k: (saved.get(k), current.get(k)) for k in diff if k in RESUME_OVERRIDES}
        diff = [k for k in diff if k not in RESUME_OVERRIDES]
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ConfigError(f"cannot resume {self.run_dir.path} with a different config ({detail}); "
                              f"use the original settings (only {', '.join(RESUME_OVERRIDES)} may change on "
                              "resume), or a new --out folder")
        return True

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return model
        ids = [self.dist.device] if self.dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _loaders(self) -> tuple[BatchLoader, BatchLoader]:
        c, d, ws, r = self.config, self.data, self.dist.world_size, self.dist.rank
        tf = train_transform(d.mean, d.std, image_size=d.shape[1], augment=c.augment, flip=c.flip,
                             padding=c.crop_padding, trivial=c.trivial_augment)
        train = BatchLoader(d.train, c.batch_size, shuffle=True, transform=tf, seed=c.seed, rank=r,
                            world_size=ws)
        if len(train) == 0:
            raise ConfigError(f"{len(d.train)} training images make no batch of {c.batch_size} per "
                              f"process on {ws} process(es); lower --batch-size")
        test = BatchLoader(d.test.subset(slice(r, None, ws)), c.eval_batch_size,
                           transform=Normalize(d.mean, d.std))
        return train, test

    def _teacher(self) -> tuple[nn.Module | None, torch.Tensor | None, float]:
        """With distill_from: the teacher (for ``distill_online``, in channels-last memory, which runs
        cnn-fast-cifar's forward 1.7x faster in float32 here) or its logits (N_train, K) on the
        un-augmented images, and the seconds they took (counted as training time; recomputed on
        resume, about 2 minutes for cnn-fast-cifar on CIFAR-10)."""
        c, d = self.config, self.data
        if not c.distill_from:
            return None, None, 0.0
        start = time.perf_counter()
        teacher = load_teacher(c.distill_from, d).to(self.dist.device)
        if c.distill_online:
            return teacher.to(memory_format=torch.channels_last), None, time.perf_counter() - start
        with bf16_autocast(self.teacher_bf16, self.dist.device):
            logits = teacher_logits(teacher, d.train, d.mean, d.std, batch_size=c.eval_batch_size,
                                    device=self.dist.device)
        return None, logits, time.perf_counter() - start

    # ---- checkpoints

    def _save(self) -> None:
        bad = [n for n, t in self.model.named_parameters() if not torch.isfinite(t).all()]
        if bad:  # never replace the last good checkpoint with broken weights
            self._diverged(f"weights became non-finite ({bad[0]}) by step {self.p.step}", float("nan"), self.p.step)
        # per-rank state: RNG and this rank's running epoch sums (the rest is the same on all ranks)
        mine = {"rng": rng_state(), "sums": [self.p.loss_sum, self.p.correct, self.p.count]}
        ranks = [mine]
        if self.dist.world_size > 1:
            ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(ranks, mine)
        if not self.main:
            return
        state = {"progress": dataclasses.asdict(self.p), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "ranks": ranks,
                 "callbacks": [cb.state_dict() for cb in self.callbacks]}
        tensors = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        save_checkpoint(self.run_dir.checkpoint_dir, self.p.step, tensors, state)

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir.checkpoint_dir, map_location="cpu")
        try:
            self.model.load_state_dict(ckpt.tensors)
            base_lrs = list(self.scheduler.base_lrs)  # of this config (a changed lr included)
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
            if self.overrides:
                self._fast_forward_schedule(base_lrs, int(ckpt.state["progress"]["step"]))
            else:
                self.scheduler.load_state_dict(ckpt.state["scheduler"])
            self.p = _Progress(**ckpt.state["progress"])
            for cb, st in zip(self.callbacks, ckpt.state["callbacks"], strict=True):
                cb.load_state_dict(st)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint in {self.run_dir.checkpoint_dir} does not fit this "
                                  f"model/optimizer/callbacks ({exc}); start a new --out folder") from None
        ranks = ckpt.state["ranks"]
        if len(ranks) != self.dist.world_size:
            raise CheckpointError(f"the checkpoint in {self.run_dir.checkpoint_dir} was written by "
                                  f"{len(ranks)} process(es); resume it with the same number, not "
                                  f"{self.dist.world_size}")
        set_rng_state(ranks[self.dist.rank]["rng"])
        self.p.loss_sum, self.p.correct, self.p.count = ranks[self.dist.rank]["sums"]

    def _fast_forward_schedule(self, base_lrs: list[float], step: int) -> None:
        """After a resume that changed the lr or the schedule: this config's schedule, at ``step``."""
        sched = self.scheduler
        for group, base in zip(self.optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
        sched.base_lrs, sched.last_epoch = base_lrs, step
        lrs = [base * fn(step) for base, fn in zip(base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def _record_overrides(self) -> None:
        """Log the resume-time changes (metrics record, warning, ``config_changes`` in config.yaml)."""
        changes = {k: {"old": old, "new": new} for k, (old, new) in self.overrides.items()}
        self._log({"event": "config_change", "step": self.p.step, "changes": changes})
        warnings.warn(f"resuming {self.run_dir.path} at step {self.p.step} with changed "
                      + ", ".join(f"{k} {v['old']!r} -> {v['new']!r}" for k, v in changes.items()), stacklevel=4)
        history = list(self.saved_config.get("config_changes") or []) + [{"step": self.p.step, **changes}]
        self.run_dir.save_config({**self.config.to_dict(), "config_changes": history})

    # ---- run

    def run(self) -> TrainResult:
        with self.run_dir.lock() if self.main else nullcontext():
            return self._run_locked()

    def _run_locked(self) -> TrainResult:
        if self.resuming:
            self._restore()
        elif self.main:
            self.run_dir.save_config(self.config)
        self.p.train_time += self.teacher_s
        self.logger = MetricsLogger(self.run_dir.metrics_path, self.p.step if self.resuming else None) \
            if self.main else None
        self.ctx = self._context()
        if self.overrides and self.main:
            self._record_overrides()
        try:
            for cb in self.callbacks:
                cb.on_train_start(self.ctx)
            stopped = None
            while not self._done() and stopped is None:
                stopped = self._run_epoch()
            summary = self._finish(stopped)
        finally:
            if self.logger is not None:
                self.logger.close()
        return TrainResult(summary, self.model, self.run_dir, list(self.p.history))

    def _done(self) -> bool:
        c = self.config
        return self.p.epoch >= c.epochs or (c.max_steps is not None and self.p.step >= c.max_steps)

    def _context(self) -> TrainContext:
        return TrainContext(
            config=self.config, model=self.model, optimizer=self.optimizer, loss_fn=self.loss_fn,
            device=self.dist.device, step=self.p.step, epoch=self.p.epoch, x=None, y=None, loss=None,
            lr=self.optimizer.param_groups[0]["lr"], run=self.run_dir, log=self._log, data=self.data,
            scheduler=self.scheduler, batch_index=self.p.batch, rank=self.dist.rank,
            world_size=self.dist.world_size, autocast=self.autocast)

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log({"step": self.ctx.step, "epoch": self.ctx.epoch + 1, **record})

    def _run_epoch(self) -> dict | None:
        """One epoch from batch ``p.batch``; returns the stop record when max_steps ends it early."""
        c, p = self.config, self.p
        self.train_loader.set_epoch(p.epoch)
        self.net.train()
        bar = tqdm(total=len(self.train_loader), initial=p.batch, desc=f"epoch {p.epoch + 1}/{c.epochs}",
                   disable=None if (self.main and c.progress) else True, leave=False, dynamic_ncols=True)
        self._clock = time.perf_counter()
        try:
            for x, y in self.train_loader.iter_from(p.batch):
                loss = self._step(x, y)
                bar.update(1)
                if p.step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.ctx.lr:.3g}", refresh=False)
                if self._done():
                    break
                mid_epoch = p.batch < len(self.train_loader)  # epoch ends save after evaluation
                if c.checkpoint_every and p.step % c.checkpoint_every == 0 and mid_epoch:
                    self._tick()  # the checkpoint keeps the time spent so far, so a resume does not lose it
                    self._save()
        finally:
            bar.close()
            self._tick()
        if p.batch < len(self.train_loader):  # max_steps stopped it mid-epoch
            return self._stop_mid_epoch()
        self._end_epoch(p.epoch_time, p.count * self.dist.world_size)  # the whole epoch, resumed or not
        return None

    def _tick(self) -> None:
        """Add the time since the last tick to the run's and the epoch's training time."""
        now = time.perf_counter()
        self.p.train_time += now - self._clock
        self.p.epoch_time += now - self._clock
        self._clock = now

    def _stop_mid_epoch(self) -> dict:
        """Checkpoint mid-epoch (a resume goes on from here), then evaluate for the summary; the
        evaluation is logged as an ``"event": "max_steps"`` record and kept out of the history."""
        self._save()
        p = self.p
        record = {"step": p.step, "epoch": p.epoch + p.batch / len(self.train_loader), "event": "max_steps",
                  **self._train_means(), **self._test_record()}
        if self.logger is not None:
            self.logger.log(record)
        return record

    def _train_means(self) -> dict[str, float]:
        """Mean training loss and top-1 of the epoch so far, over all ranks."""
        p = self.p
        sums = D.all_reduce_sum(torch.tensor([p.loss_sum, p.correct, p.count], dtype=torch.float64))
        n = max(1.0, float(sums[2]))
        return {"train_loss": float(sums[0]) / n, "train_top1": float(sums[1]) / n}

    def _test_record(self) -> dict[str, float]:
        ev = evaluate(self.model, self.test_loader, self.dist.device, autocast=self.autocast)
        return {"test_loss": ev.loss, "test_top1": ev.top1, "test_top5": ev.top5, "test_count": ev.count}

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on batch x (B, C, H, W), y (B,); returns the (rank-averaged) loss."""
        c, p, ctx = self.config, self.p, self.ctx
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        ctx.x, ctx.y, ctx.epoch, ctx.batch_index = x, y, p.epoch, p.batch
        ctx.lr = self.optimizer.param_groups[0]["lr"]
        for cb in self.callbacks:
            cb.on_step_start(ctx)
        x, target = self._mixed(x, y)  # callbacks keep seeing the unmixed batch in ctx
        if c.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with bf16_autocast(self.autocast, ctx.device):
            logits = self.net(x)
        loss = self._loss(logits.float(), target, x)
        ctx.loss = loss
        local = float(loss.detach())
        value = local if self.dist.world_size == 1 else float(D.all_reduce_mean(loss.detach().clone()))
        if not math.isfinite(value):
            self._diverged(f"loss became {value} at step {p.step + 1}", value, p.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for cb in self.callbacks:
            cb.on_after_backward(ctx)
        if c.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        p.step, p.batch, ctx.step = p.step + 1, p.batch + 1, p.step + 1
        p.loss_sum += local * len(y)
        p.correct += float((logits.argmax(1) == y).sum())
        p.count += len(y)
        for cb in self.callbacks:
            cb.on_step_end(ctx)
        if p.step % c.log_every == 0:
            self._log({"loss": value, "lr": ctx.lr})
        ctx.x = ctx.y = ctx.loss = None
        return value

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The run's loss on this batch: cross-entropy, or with a teacher :func:`distill_loss`
        against the teacher's logits: on the batch's own (augmented, mixed) images x (B, C, H, W)
        with ``distill_online``, else the precomputed ones of its images (batch ``p.batch``)."""
        c = self.config
        if self.teacher is not None:
            with torch.no_grad(), bf16_autocast(self.teacher_bf16, x.device):
                t = self.teacher(x.contiguous(memory_format=torch.channels_last)).float()
        elif self.teacher_targets is not None:
            t = self.teacher_targets[self.train_loader.indices(self.p.batch)].to(logits.device)
        else:
            return self.loss_fn(logits, target)
        return distill_loss(logits, target, t, alpha=c.distill_alpha, temperature=c.distill_temperature,
                            label_smoothing=c.label_smoothing)

    def _mixed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on and its target: x, y as they are, or with Mixup / CutMix the mixed
        images and (B, K) class probabilities, drawn from (seed, epoch, batch, rank) so that a resumed
        run mixes as an uninterrupted one. Train top-1 stays measured against the unmixed labels y."""
        c, p = self.config, self.p
        if c.mixup_alpha == 0 and c.cutmix_alpha == 0:
            return x, y
        g = mix_generator(c.seed, p.epoch, p.batch * self.dist.world_size + self.dist.rank)
        mixed = mix_batch(x, y, self.data.num_classes, c.mixup_alpha, c.cutmix_alpha, g)
        return mixed.x, mixed.target

    def _diverged(self, what: str, value: float, step: int) -> None:
        """Raise DivergenceError (``what`` happened) without writing a checkpoint."""
        p, lr = self.p, self.ctx.lr
        self._log({"event": "diverged", "step": step, "loss": value, "lr": lr})  # as the error message says
        run = self.run_dir.path
        if has_checkpoint(self.run_dir.checkpoint_dir):
            how = (f"nnlab train --config {run}/config.yaml --out {run} --resume --lr {self.config.lr / 2:g}"
                   if not self.callbacks else "the same command with --resume and a lower --lr")
            advice = (f"the last good checkpoint is kept in {self.run_dir.checkpoint_dir}; continue from it "
                      f"with a lower lr (or --grad-clip 1.0): {how}")
        else:
            advice = "no checkpoint had been written yet; start again with a lower --lr or --grad-clip 1.0"
        raise DivergenceError(f"{what} (epoch {p.epoch + 1}, lr {lr:.4g}); {advice}")

    def _end_epoch(self, seconds: float, images: float) -> None:
        """Evaluate, call callbacks, log the epoch record, checkpoint. seconds / images: this
        process's time in the epoch's loop (before a resume included) and the images all ranks
        trained on in it (for speed)."""
        c, p = self.config, self.p
        record = {"step": p.step, "epoch": p.epoch + 1, **self._train_means(),
                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": seconds,
                  "images_per_s": images / max(seconds, 1e-9)}
        if (p.epoch + 1) % c.eval_every == 0 or p.epoch + 1 >= c.epochs or self._done():
            record.update(self._test_record())
        self.ctx.step, self.ctx.epoch = p.step, p.epoch
        for cb in self.callbacks:
            cb.on_epoch_end(self.ctx, record)
        if self.logger is not None:
            self.logger.log(record)
        if self.main and c.progress:
            keys = ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5")
            shown = " ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)
            tqdm.write(f"epoch {p.epoch + 1}/{c.epochs} step {p.step}: {shown}", file=sys.stderr)
        p.history.append(to_jsonable(record))
        p.epoch, p.batch, p.loss_sum, p.correct, p.count, p.epoch_time = p.epoch + 1, 0, 0.0, 0.0, 0.0, 0.0
        self._save()

    def _finish(self, stopped: dict | None = None) -> dict[str, Any]:
        """The summary; ``stopped``: the stop record of a run that max_steps ended mid-epoch."""
        from nnlab.models import count_parameters

        hist = self.p.history + ([stopped] if stopped else [])
        evaluated = [r for r in hist if "test_top1" in r]
        last, best = evaluated[-1], max(evaluated, key=lambda r: r["test_top1"])
        summary = {
            "test_top1": last["test_top1"], "test_top5": last["test_top5"], "test_loss": last["test_loss"],
            "train_loss": hist[-1]["train_loss"], "train_top1": hist[-1]["train_top1"],
            "best_test_top1": best["test_top1"], "best_epoch": best["epoch"],
            "epochs": hist[-1]["epoch"], "steps": self.p.step, "train_time_s": self.p.train_time,
            "params": count_parameters(self.model), "model": self.config.model, "data": self.config.data,
            "optimizer": self.config.optimizer, "world_size": self.dist.world_size,
            "device": str(self.dist.device), "run": str(self.run_dir.path), "threads": self.config.threads,
            "complete": self.p.epoch >= self.config.epochs,
        }
        if self.main:
            save_final_weights(self.model, self.run_dir)
            self.run_dir.write_summary(summary)
        return summary
