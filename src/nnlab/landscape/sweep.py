"""The resumable (BN, lr) sweep behind ``nnlab landscape run``.

Layout of ``RUN/``::

    sweep.yaml              the sweep's settings (a rerun must use the same ones)
    bn-on/lr-0.1/           one engine run folder per (bn, lr): config.yaml, metrics.jsonl,
                            checkpoint/, summary.json (written when that pair finished)
    metrics.jsonl, .csv     every pair's records with ``bn`` and ``lr_run`` added
    summary.json            final test top-1 per (bn, lr), band-width medians per bn

Rerunning the same command continues a killed sweep: finished pairs (with ``summary.json``) are
skipped, an interrupted pair resumes from its last checkpoint (every ``checkpoint_every`` steps
and every epoch end), bit-identically. The merged files and the summary are rewritten after every
pair, so a partial sweep can already be plotted.

Defaults follow the seed/paper: plain SGD (momentum 0, no weight decay, constant lr), batch 128,
20 epochs, probes every 30 steps at 8 step sizes over [0.5, 4] x lr, standard crop + flip
augmentation.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnlab.engine.checkpoint import has_checkpoint
from nnlab.engine.io import _jsonable, atomic_write, atomic_write_text, read_json, write_json
from nnlab.engine.metrics import read_jsonl
from nnlab.errors import ConfigError
from nnlab.landscape.bands import band_medians

BN_CHOICES = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}
MAY_DIFFER = ("data_dir", "progress")  # settings that do not change the numbers


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
    current = yaml.safe_load(yaml.safe_dump(_jsonable(dataclasses.asdict(cfg))))
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
    for bn, lr in cfg.pairs():
        folder = pair_dir(run, bn, lr)
        if (folder / "summary.json").is_file():
            skipped.append((bn, lr))
            continue
        if data is None:
            data = load_dataset(cfg.data, cfg.data_dir)
        probe = LandscapeProbe(every=cfg.every, eta_factors=default_etas(1.0, cfg.eta_count, cfg.eta_low,
                                                                         cfg.eta_high),
                               hessian_every=cfg.hessian_every, hessian_iters=cfg.hessian_iters)
        train(train_config(cfg, bn, lr), folder, resume=has_checkpoint(folder / "checkpoint"),
              callbacks=[probe], data=data)
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
            w.writerows(_jsonable(r) for r in records)

    return atomic_write(path, write)


def collect(run: str | Path, cfg: SweepConfig) -> dict[str, Any]:
    """Rewrite ``RUN/metrics.jsonl``, ``RUN/metrics.csv`` and ``RUN/summary.json``; return the summary."""
    run = Path(run)
    records = merged_records(run, cfg)
    atomic_write_text(run / "metrics.jsonl", "".join(
        json.dumps(_jsonable(r)) + "\n" for r in records))
    write_csv(run / "metrics.csv", records)
    runs, medians = [], {}
    for bn in BN_CHOICES[cfg.bn]:
        per_lr = {lr: [r for r in records if r["bn"] == bn and r["lr_run"] == lr] for lr in sorted(cfg.lrs)}
        for lr in sorted(cfg.lrs):
            path = pair_dir(run, bn, lr) / "summary.json"
            s = read_json(path) if path.is_file() else {}
            runs.append({"bn": bn, "lr": lr, "finished": bool(s), "test_top1": s.get("test_top1"),
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
