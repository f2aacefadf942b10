"""The resumable (BN, lr) sweep behind ``nnlab landscape run``.

Layout of ``RUN/``::

    sweep.yaml              the sweep's settings (a rerun must use the same ones)
    bn-on/lr-0.1/           one engine run folder per (bn, lr): config.yaml, metrics.jsonl,
                            checkpoint/, summary.json (written when that pair finished)
    metrics.jsonl, .csv     every pair's records with ``bn`` and ``lr_run`` added
    summary.json            final test top-1 per (bn, lr); band-width, beta and Hessian medians per
                            bn over the last half of training (band_medians) and after epoch 1
                            (band_medians_after_epoch1), and the same per lr (band_medians_per_lr)

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

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from nnlab.engine.checkpoint import has_checkpoint
from nnlab.engine.io import atomic_write_text, read_json, to_jsonable, write_json
from nnlab.engine.metrics import read_jsonl
from nnlab.engine.runs import folder_lock
from nnlab.errors import ConfigError, DivergenceError
from nnlab.landscape.bands import band_medians
from nnlab.report import write_records_csv

BN_CHOICES = {"both": ("off", "on"), "on": ("on",), "off": ("off",)}
MAY_DIFFER = ("data_dir", "progress", "jobs", "threads", "max_steps")  # settings that leave the numbers


# The documented reduced schedule for 2 CPU cores (see the module docstring), as LandscapeConfig fields.
REDUCED_CPU: dict[str, Any] = dict(model="vgg-a", bn="both", data="cifar10", lrs=[0.05, 0.1, 0.15], epochs=10,
                                   batch_size=128, every=30, width=0.25, train_subset=20_000,
                                   hessian_every=300, hessian_iters=10)


@dataclass
class LandscapeConfig:
    """Settings of a sweep. ``train_subset`` / ``test_subset``: seeded random subsets (None: all).
    ``width``: channel multiplier passed to the model (``model_options["width"]``). ``max_steps``:
    stop every pair after that many steps (schedule unchanged; rerun without it to continue).
    ``jobs``: pairs trained at once, each in its own process; ``threads``: torch threads per pair
    (default: torch's choice with 1 job, else the CPU count divided by ``jobs``)."""

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
    hessian_iters: int = 100
    width: float | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    max_steps: int | None = None
    jobs: int = 1
    threads: int | None = None
    progress: bool = True

    def validate(self) -> "LandscapeConfig":
        if self.bn not in BN_CHOICES:
            raise ConfigError(f"bn must be one of both, on, off; got {self.bn!r}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"lrs must be a non-empty list of positive numbers, got {self.lrs}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"lrs has duplicates: {self.lrs}; list each learning rate once")
        if self.jobs < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError(f"jobs and threads must be at least 1, got jobs={self.jobs}, threads={self.threads}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 or unset, got {self.max_steps}")
        if self.eta_count < 1 or not 0 < self.eta_low <= self.eta_high:
            raise ConfigError(f"step sizes need eta_count >= 1 and 0 < eta_low <= eta_high, got "
                              f"{self.eta_count}, {self.eta_low}, {self.eta_high}")
        self._check_bn_switch()
        return self

    def _check_bn_switch(self) -> None:
        """bn on/both needs a model with a BatchNorm variant (``NAME-bn`` or a ``bn`` option): built on
        the meta device (no memory, no init work) to ask the model itself."""
        import torch

        from nnlab.models import MODELS

        name = self.model[:-3] if self.model.endswith("-bn") else self.model
        model, options = model_for(name, "on")
        if self.bn == "off" or not options:
            return
        try:
            with torch.device("meta"):
                MODELS.get(model)(**options)
        except ConfigError:
            raise ConfigError(f"model {self.model} has no BatchNorm switch (no {name}-bn model, no bn option), so "
                              f"--bn {self.bn} cannot run; choose vgg-a, or --bn off") from None

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


def train_config(cfg: LandscapeConfig, bn: str, lr: float):
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
                       test_limit=cfg.test_subset, progress=cfg.progress, max_steps=cfg.max_steps,
                       threads=cfg.threads)


def _sweep_record(cfg: LandscapeConfig) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(to_jsonable(dataclasses.asdict(cfg))))


def _check_same_sweep(run: Path, cfg: LandscapeConfig) -> None:
    """A rerun on ``run`` must have the settings its ``sweep.yaml`` records (but for MAY_DIFFER)."""
    from nnlab.config import load_yaml

    path, current = run / "sweep.yaml", _sweep_record(cfg)
    if path.is_file():
        saved = load_yaml(path)
        diff = sorted(k for k in set(saved) | set(current)
                      if k not in MAY_DIFFER and saved.get(k) != current.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
            raise ConfigError(f"{run} holds a sweep with other settings ({detail}); rerun with the "
                              "original settings to continue it, or choose a new --out folder")


@dataclass
class LandscapeResult:
    """summary: what ``RUN/summary.json`` holds; ran / skipped: the (bn, lr) pairs trained now /
    found finished."""

    summary: dict[str, Any]
    ran: list[tuple[str, float]]
    skipped: list[tuple[str, float]]


def _is_finished(summary: dict) -> bool:
    """A pair's summary says it trained to its end (or diverged); one stopped by max_steps has
    ``"complete": false``; an empty summary (none written yet) is not finished."""
    return bool(summary) and bool(summary.get("complete", True))


def finished(folder: Path) -> bool:
    """True when the pair in ``folder`` is finished (:func:`_is_finished`)."""
    path = Path(folder) / "summary.json"
    return path.is_file() and _is_finished(read_json(path))


def _train_pair(cfg: LandscapeConfig, run: Path, bn: str, lr: float, data=None) -> None:
    """Train (or resume) one (bn, lr) pair with a :class:`LandscapeProbe`; a divergence is a result."""
    from nnlab.data import load_dataset
    from nnlab.engine.train import train
    from nnlab.landscape.callback import LandscapeProbe
    from nnlab.landscape.probe import default_etas

    folder = pair_dir(run, bn, lr)
    data = load_dataset(cfg.data, cfg.data_dir) if data is None else data
    probe = LandscapeProbe(every=cfg.every, eta_factors=default_etas(1.0, cfg.eta_count, cfg.eta_low, cfg.eta_high),
                           hessian_every=cfg.hessian_every, hessian_iters=cfg.hessian_iters)
    try:
        train(train_config(cfg, bn, lr), folder, resume=has_checkpoint(folder / "checkpoint"),
              callbacks=[probe], data=data)
    except DivergenceError as exc:  # a result of the study (no-BN at high lr), not a failure
        write_json(folder / "summary.json", {"diverged": True, "error": str(exc), "test_top1": None})


def run_landscape(cfg: LandscapeConfig, out: str | Path, *, data=None) -> LandscapeResult:
    """Train every (bn, lr) pair of ``cfg`` into ``out`` with a :class:`LandscapeProbe`, resumably;
    ``cfg.jobs`` pairs at a time.

    data: a :class:`nnlab.data.DatasetSplits` to use (default: ``load_dataset(cfg.data, cfg.data_dir)``).
    The sweep folder is locked while it runs (a second process on it is refused).
    """
    cfg.validate()
    if cfg.jobs > 1 and cfg.threads is None:
        cfg = dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // cfg.jobs))
    run = Path(out)
    with folder_lock(run):  # a second sweep process on the same folder is refused
        return _run_sweep_locked(cfg, run, data)


def _run_sweep_locked(cfg: LandscapeConfig, run: Path, data) -> LandscapeResult:
    from nnlab.data import load_dataset

    _check_same_sweep(run, cfg)
    pairs = cfg.pairs()
    skipped = [pair for pair in pairs if finished(pair_dir(run, *pair))]
    todo = [pair for pair in pairs if pair not in skipped]
    loaded = load_dataset(cfg.data, cfg.data_dir) if todo and data is None else data  # bad data: nothing written
    atomic_write_text(run / "sweep.yaml", yaml.safe_dump(_sweep_record(cfg), sort_keys=False))
    if todo and cfg.jobs > 1:
        _run_parallel(cfg, run, todo, data)  # the workers load the data themselves unless it was given
    for i, (bn, lr) in enumerate(todo if cfg.jobs == 1 else []):
        if cfg.progress:
            tqdm.write(f"[{i + 1}/{len(todo)}] bn {bn}, lr {lr:g} -> {pair_dir(run, bn, lr)}", file=sys.stderr)
        _train_pair(cfg, run, bn, lr, loaded)
        collect(run, cfg)
    return LandscapeResult(collect(run, cfg), todo, skipped)


def _last_step(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError):  # a line being written
        return 0


def _run_parallel(cfg: LandscapeConfig, run: Path, todo: list[tuple[str, float]], data) -> None:
    """Train ``todo`` in ``cfg.jobs`` spawned processes; one bar counts the steps of all of them
    (read from their metrics files every few seconds); the summary is rewritten as pairs finish."""
    import concurrent.futures as cf
    import multiprocessing as mp

    quiet = dataclasses.replace(cfg, progress=False)  # one bar here instead of interleaved ones
    bar = tqdm(desc=f"landscape sweep ({cfg.jobs} jobs)", unit="step", disable=None if cfg.progress else True,
               dynamic_ncols=True)
    with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_pair, quiet, run, bn, lr, data): (bn, lr) for bn, lr in todo}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=10, return_when=cf.FIRST_COMPLETED)
            for f in done:
                f.result()  # re-raise a pair's error here
                collect(run, cfg)
                bn, lr = futures[f]
                tqdm.write(f"finished bn {bn}, lr {lr:g}", file=sys.stderr)
            bar.n = sum(_last_step(pair_dir(run, bn, lr)) for bn, lr in todo)
            bar.refresh()
    bar.close()


def merged_records(run: Path, cfg: LandscapeConfig) -> list[dict]:
    """Every pair's metrics records, each with ``bn`` and ``lr_run`` added."""
    out = []
    for bn, lr in cfg.pairs():
        path = pair_dir(run, bn, lr) / "metrics.jsonl"
        if path.is_file():
            out += [{"bn": bn, "lr_run": lr, **r} for r in read_jsonl(path)]
    return out


def write_csv(path: Path, records: list[dict]) -> Path:
    """Records as CSV: bn, lr_run, step, epoch, probe first, then the other keys sorted."""
    return write_records_csv(path, [to_jsonable(r) for r in records], ["bn", "lr_run", "step", "epoch", "probe"])


def _pair_rows(run: Path, cfg: LandscapeConfig, bn: str) -> list[dict[str, Any]]:
    """One summary row per lr of ``bn``, from each pair's ``summary.json`` (empty while it trains)."""
    rows = []
    for lr in sorted(cfg.lrs):
        path = pair_dir(run, bn, lr) / "summary.json"
        s = read_json(path) if path.is_file() else {}
        rows.append({"bn": bn, "lr": lr, "finished": _is_finished(s),
                     "diverged": bool(s.get("diverged")), "test_top1": s.get("test_top1"),
                     "best_test_top1": s.get("best_test_top1"), "steps": s.get("steps"),
                     "train_time_s": s.get("train_time_s")})
    return rows


def _medians(per_lr: dict[float, list[dict]]) -> dict[str, Any]:
    """Band medians of one BN setting: over the last half, after epoch 1, and both per lr."""
    total = max((int(r["step"]) for recs in per_lr.values() for r in recs), default=0)
    epoch1 = min((int(r["step"]) for recs in per_lr.values() for r in recs if "test_top1" in r), default=None)
    after = (lambda runs: band_medians(runs, total, start=epoch1)) if epoch1 else (lambda runs: {})
    return {"last_half": band_medians(per_lr, total), "after_epoch1": after(per_lr),
            "per_lr": {f"{lr:g}": {"last_half": band_medians({lr: recs}, total), "after_epoch1": after({lr: recs})}
                       for lr, recs in per_lr.items()}}


def collect(run: str | Path, cfg: LandscapeConfig) -> dict[str, Any]:
    """Rewrite ``RUN/metrics.jsonl``, ``RUN/metrics.csv`` and ``RUN/summary.json``; return the summary."""
    run = Path(run)
    records = merged_records(run, cfg)
    atomic_write_text(run / "metrics.jsonl", "".join(
        json.dumps(to_jsonable(r)) + "\n" for r in records))
    write_csv(run / "metrics.csv", records)
    runs = [row for bn in BN_CHOICES[cfg.bn] for row in _pair_rows(run, cfg, bn)]
    med = {bn: _medians({lr: recs for lr in sorted(cfg.lrs)
                         if (recs := [r for r in records if r["bn"] == bn and r["lr_run"] == lr])})
           for bn in BN_CHOICES[cfg.bn]}
    summary = {"complete": all(r["finished"] for r in runs), "settings": dataclasses.asdict(cfg),
               "runs": runs, "band_medians": {bn: m["last_half"] for bn, m in med.items()},
               "band_medians_after_epoch1": {bn: m["after_epoch1"] for bn, m in med.items()},
               "band_medians_per_lr": {bn: m["per_lr"] for bn, m in med.items()},
               "top1": {bn: {f"{r['lr']:g}": r["test_top1"] for r in runs if r["bn"] == bn}
                        for bn in BN_CHOICES[cfg.bn]}}
    write_json(run / "summary.json", summary)
    return summary
