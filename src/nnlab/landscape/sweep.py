"""The resumable (BN, lr) sweep behind ``nnlab landscape run``.

Layout of ``RUN/``::

    sweep.yaml              the sweep's settings (a rerun must use the same ones)
    bn-on/lr-0.1/           one engine run folder per (bn, lr): config.yaml, metrics.jsonl,
                            checkpoint/, summary.json (written when that pair finished)
    metrics.jsonl, .csv     every pair's records with ``bn`` and ``lr_run`` added
    summary.json            final test top-1 per (bn, lr), band-width medians per bn

A pair whose loss becomes NaN/inf (plain VGG-A at high lr can) gets a ``summary.json`` with
``"diverged": true`` and the sweep goes on. Rerunning the same command continues a killed sweep:
finished pairs (with ``summary.json``) are skipped, an interrupted pair resumes from its last
checkpoint (every ``checkpoint_every`` steps and every epoch end), bit-identically. The merged
files and the summary are rewritten after every pair, so a partial sweep can already be plotted.

Defaults follow the seed/paper: plain SGD (momentum 0, no weight decay, constant lr), batch 128,
20 epochs, probes every 30 steps at 8 step sizes over [0.5, 4] x lr, standard crop + flip
augmentation.

Reduced CPU schedule (:data:`REDUCED_CPU`): the full schedule (VGG-A, 50k images, 20 epochs,
5 lrs x 2, about 78k steps of a 9.8M-parameter net) takes days on 2 CPU cores. The reduced one
keeps the architecture (11 layers, BN placement), the optimiser, batch size, probe settings and
the full test set, and shrinks: width x0.25 (16-32-64-64-128-128-128-128 channels, 0.61M
parameters, ~16x fewer FLOPs), a 20k-image training subset, 10 epochs (1,560 steps per run, vs
7,820), lrs 0.05, 0.1, 0.15 (lowest, seed's headline, highest). Plain VGG-A spends its first
~150-200 steps on the loss plateau (loss ~2.30, tiny bands) before it learns, so the run must be
long enough that the last half of training (where the band medians are taken) is well past it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from nnlab.engine.checkpoint import has_checkpoint
from nnlab.engine.io import to_jsonable, atomic_write, atomic_write_text, read_json, write_json
from nnlab.engine.metrics import read_jsonl
from nnlab.errors import ConfigError, DivergenceError
from nnlab.landscape.bands import band_medians

BN_CHOICES = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}
MAY_DIFFER = ("data_dir", "progress")  # settings that do not change the numbers


# The documented reduced schedule for 2 CPU cores (see the module docstring), as SweepConfig fields.
REDUCED_CPU: dict[str, Any] = dict(model="vgg-a", bn="both", data="cifar10", lrs=[0.05, 0.1, 0.15], epochs=10,
                                   batch_size=128, every=30, width=0.25, train_subset=20_000,
                                   hessian_every=300, hessian_iters=10)


@dataclass
class SweepConfig:
    """Settings of a sweep. ``train_subset`` / ``test_subset``: seeded random subsets (None: all).
    ``width``: channel multiplier passed to the model (``model_options["width"]``)."""

    model: str = "vgg-a"
    bn: str = "both"
    data: str = "cifar10"
    data_dir: str | None = None
    lrs: list[float] = field(default_factory=lambda: [0.05, 0.075, 0.1, 0.125, 0.15])
    epochs: int = 20
    batch_size: int = 128
    every: int = 30
    eta_count: int = 8
    eta_low: float = 0.5
    eta_high: float = 4.0
    hessian_every: int = 0
    hessian_iters: int = 20
    width: float | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    progress: bool = True

    def validate(self) -> "SweepConfig":
        if self.bn not in BN_CHOICES:
            raise ConfigError(f"bn must be one of both, on, off; got {self.bn!r}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"lrs has duplicates: {self.lrs}; list each learning rate once")
        if self.eta_count < 1 or not 0 < self.eta_low <= self.eta_high:
            raise ConfigError(f"step sizes need eta_count >= 1 and 0 < eta_low <= eta_high, got "
                              f"{self.eta_count}, {self.eta_low}, {self.eta_high}")
        return self

    def pairs(self) -> list[tuple[str, float]]:
        """(bn, lr) pairs in run order: no-BN first, lrs ascending."""
        return [(bn, lr) for bn in BN_CHOICES[self.bn] for lr in sorted(self.lrs)]


def pair_dir(run: Path, bn: str, lr: float) -> Path:
    return Path(run) / f"bn-{bn}" / f"lr-{lr:g}"


def model_for(name: str, bn: str) -> tuple[str, dict]:
    """Model name and options for one BN setting: ``NAME-bn`` if registered, else ``bn=True``."""
    from nnlab.models import MODELS

    if bn == "off":
        return name, {}
    if name.endswith("-bn"):
        return name, {}
    return (f"{name}-bn", {}) if f"{name}-bn" in MODELS else (name, {"bn": True})


def train_config(cfg: SweepConfig, bn: str, lr: float):
    """The engine :class:`TrainConfig` of one (bn, lr) pair."""
    from nnlab.engine.train import TrainConfig

    name = cfg.model[:-3] if cfg.model.endswith("-bn") else cfg.model
    model, options = model_for(name, bn)
    if cfg.width is not None:
        options["width"] = cfg.width
    return TrainConfig(model=model, model_options=options, data=cfg.data, data_dir=cfg.data_dir,
                       epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="sgd", lr=lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule="constant",
                       augment=cfg.augment, flip=cfg.augment, seed=cfg.seed, log_every=cfg.every,
                       checkpoint_every=cfg.checkpoint_every, train_limit=cfg.train_subset,
                       test_limit=cfg.test_subset, progress=cfg.progress)


def _check_same_sweep(run: Path, cfg: SweepConfig) -> None:
    path = run / "sweep.yaml"
    current = yaml.safe_load(yaml.safe_dump(to_jsonable(dataclasses.asdict(cfg))))
    if path.is_file():
        saved = yaml.safe_load(path.read_text()) or {}
        diff = sorted(k for k in set(saved) | set(current)
                      if k not in MAY_DIFFER and saved.get(k) != current.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ConfigError(f"{run} holds a sweep with other settings ({detail}); rerun with the "
                              "original settings to continue it, or choose a new --out folder")
    atomic_write_text(path, yaml.safe_dump(current, sort_keys=False))


@dataclass
class SweepResult:
    """summary: what ``RUN/summary.json`` holds; ran / skipped: the (bn, lr) pairs trained now /
    found finished."""

    summary: dict[str, Any]
    ran: list[tuple[str, float]]
    skipped: list[tuple[str, float]]


def run_sweep(cfg: SweepConfig, out: str | Path, *, data=None) -> SweepResult:
    """Train every (bn, lr) pair of ``cfg`` into ``out`` with a :class:`LandscapeProbe`, resumably.

    data: a :class:`nnlab.data.DatasetSplits` to use (default: ``load_dataset(cfg.data, cfg.data_dir)``).
    """
    from nnlab.data import load_dataset
    from nnlab.engine.train import train
    from nnlab.landscape.callback import LandscapeProbe
    from nnlab.landscape.probe import default_etas

    cfg.validate()
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    _check_same_sweep(run, cfg)
    ran, skipped = [], []
    pairs = cfg.pairs()
    for i, (bn, lr) in enumerate(tqdm(pairs, desc="landscape sweep", unit="run", disable=None if cfg.progress
                                      else True, dynamic_ncols=True)):
        folder = pair_dir(run, bn, lr)
        if (folder / "summary.json").is_file():
            skipped.append((bn, lr))
            continue
        if cfg.progress:
            tqdm.write(f"[{i + 1}/{len(pairs)}] bn {bn}, lr {lr:g} -> {folder}", file=sys.stderr)
        if data is None:
            data = load_dataset(cfg.data, cfg.data_dir)
        probe = LandscapeProbe(every=cfg.every, eta_factors=default_etas(1.0, cfg.eta_count, cfg.eta_low,
                                                                         cfg.eta_high),
                               hessian_every=cfg.hessian_every, hessian_iters=cfg.hessian_iters)
        try:
            train(train_config(cfg, bn, lr), folder, resume=has_checkpoint(folder / "checkpoint"),
                  callbacks=[probe], data=data)
        except DivergenceError as exc:  # a result of the study (no-BN at high lr), not a failure
            write_json(folder / "summary.json", {"diverged": True, "error": str(exc), "test_top1": None})
        ran.append((bn, lr))
        collect(run, cfg)
    return SweepResult(collect(run, cfg), ran, skipped)


def merged_records(run: Path, cfg: SweepConfig) -> list[dict]:
    """Every pair's metrics records, each with ``bn`` and ``lr_run`` added."""
    out = []
    for bn, lr in cfg.pairs():
        path = pair_dir(run, bn, lr) / "metrics.jsonl"
        if path.is_file():
            out += [{"bn": bn, "lr_run": lr, **r} for r in read_jsonl(path)]
    return out


def write_csv(path: Path, records: list[dict]) -> Path:
    """Records as CSV: bn, lr_run, step, epoch, probe first, then the other keys sorted."""
    first = ["bn", "lr_run", "step", "epoch", "probe"]
    keys = first + sorted({k for r in records for k in r} - set(first))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(to_jsonable(r) for r in records)

    return atomic_write(path, write)


def collect(run: str | Path, cfg: SweepConfig) -> dict[str, Any]:
    """Rewrite ``RUN/metrics.jsonl``, ``RUN/metrics.csv`` and ``RUN/summary.json``; return the summary."""
    run = Path(run)
    records = merged_records(run, cfg)
    atomic_write_text(run / "metrics.jsonl", "".join(
        json.dumps(to_jsonable(r)) + "\n" for r in records))
    write_csv(run / "metrics.csv", records)
    runs, medians = [], {}
    for bn in BN_CHOICES[cfg.bn]:
        per_lr = {lr: [r for r in records if r["bn"] == bn and r["lr_run"] == lr] for lr in sorted(cfg.lrs)}
        for lr in sorted(cfg.lrs):
            path = pair_dir(run, bn, lr) / "summary.json"
            s = read_json(path) if path.is_file() else {}
            runs.append({"bn": bn, "lr": lr, "finished": bool(s), "diverged": bool(s.get("diverged")),
                         "test_top1": s.get("test_top1"),
                         "best_test_top1": s.get("best_test_top1"), "steps": s.get("steps"),
                         "train_time_s": s.get("train_time_s")})
        total = max((int(r["step"]) for recs in per_lr.values() for r in recs), default=0)
        medians[bn] = band_medians({lr: recs for lr, recs in per_lr.items() if recs}, total)
    summary = {"complete": all(r["finished"] for r in runs), "settings": dataclasses.asdict(cfg),
               "runs": runs, "band_medians": medians,
               "top1": {bn: {f"{r['lr']:g}": r["test_top1"] for r in runs if r["bn"] == bn}
                        for bn in BN_CHOICES[cfg.bn]}}
    write_json(run / "summary.json", summary)
    return summary
