"""Re-check a published run: retrain its first N steps from its own ``config.yaml`` and compare
the losses it logged (issue 14).

The contract: with the same seed and torch thread count (``config.yaml`` records both), a CPU
rerun of the first N steps reproduces the logged training losses to 1e-4 relative (in practice
bit for bit). ``max_steps`` stops the rerun without changing the schedule, so step t sees the
same learning rate as in the published run. Probes and other callbacks never change training,
so the plain engine reruns a landscape or DessiLBI run as well as a ``nnlab train`` one.

>>> r = recheck("docs/results/cifar-seed-scale/bn-lr0.1/bn-on/lr-0.1", "runs/recheck", max_steps=60,
...             data_dir="../shared/data/cifar10")
>>> r.ok, r.max_rel_diff
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nnlab.config import from_dict, load_yaml
from nnlab.engine.metrics import read_jsonl
from nnlab.errors import CheckpointError, ConfigError


@dataclass
class RecheckResult:
    """steps: the logged steps compared; published / rerun: their losses; max_rel_diff: the
    largest |rerun - published| / |published|; ok: max_rel_diff <= rtol."""

    steps: list[int]
    published: list[float]
    rerun: list[float]
    max_rel_diff: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.rtol


def logged_losses(path: str | Path, max_step: int) -> dict[int, float]:
    """step -> training loss of the engine's step records (not probes or events) up to ``max_step``."""
    return {int(r["step"]): float(r["loss"]) for r in read_jsonl(path)
            if "loss" in r and "probe" not in r and "event" not in r and int(r["step"]) <= max_step}


def recheck(run: str | Path, out: str | Path, *, max_steps: int = 60, data_dir: str | None = None,
            rtol: float = 1e-4, progress: bool = True) -> RecheckResult:
    """Retrain ``run``'s first ``max_steps`` steps into ``out`` (a new folder) and compare losses."""
    from nnlab.engine.train import TrainConfig, train

    run = Path(run)
    if not (run / "config.yaml").is_file() or not (run / "metrics.jsonl").is_file():
        raise CheckpointError(f"{run} has no config.yaml and metrics.jsonl; pass one run folder written by "
                              "nnlab train, landscape run or lbi train (e.g. .../bn-on/lr-0.1)")
    raw = load_yaml(run / "config.yaml")
    if not isinstance(raw.get("model"), str) or "optimizer" not in raw:  # a functa or generator run, a sweep root
        raise CheckpointError(f"{run} is not a run of nnlab train, landscape run or lbi train (its config.yaml "
                              "names no model and optimizer); recheck reruns only those")
    saved = from_dict(TrainConfig, raw)
    published = logged_losses(run / "metrics.jsonl", max_steps)
    if not published:
        raise ConfigError(f"{run}/metrics.jsonl logs no loss at steps <= {max_steps}; raise --max-steps to "
                          f"at least its log_every ({saved.log_every})")
    config = dataclasses.replace(saved, max_steps=max_steps, progress=progress,
                                 data_dir=data_dir if data_dir is not None else saved.data_dir)
    train(config, out)
    rerun = logged_losses(Path(out) / "metrics.jsonl", max_steps)
    steps = sorted(published)
    values = [rerun.get(s, float("nan")) for s in steps]
    diffs = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip((published[s] for s in steps), values)]
    worst = max((float("inf") if d != d else d) for d in diffs)  # a missing step counts as a mismatch
    return RecheckResult(steps, [published[s] for s in steps], values, worst, rtol)
