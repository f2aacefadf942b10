"""The stage runner behind ``nnlab reproduce``.

A stage is one unit of a study (train a model, run a sweep, draw figures). Each runs in its own
folder ``OUT/stages/<name>/`` and is keyed by a hash of its config:

- a stage whose ``done.json`` carries the same key is reused, not re-run;
- a stage killed mid-way is re-run with ``resume=True``; stage functions pass that to the
  resumable trainers underneath, so finished epochs/steps are not redone;
- a stage that raises is recorded as failed (message and traceback kept), and the others still run;
- :func:`seed_stages` copies in the finished stages of a published run (``nnlab reproduce --reuse``),
  so that a report too long for one sitting can be rebuilt over several, stage by stage.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from nnlab.engine.io import read_json, write_json


@dataclass
class StageContext:
    """What a stage function receives. ``dir`` is its own folder; ``resume`` is True when an
    earlier attempt with the same config was interrupted there."""

    name: str
    dir: Path
    config: dict[str, Any]
    resume: bool
    data_dir: Path | None
    results: dict[str, "StageOutcome"]  # outcomes of stages run before this one


@dataclass
class StageResult:
    """What a stage function returns: headline figures plus files (relative to the stage dir)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    study: str
    title: str
    fn: Callable[[StageContext], StageResult]
    config: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # stages whose outcomes this one reads

    def key(self) -> str:
        blob = json.dumps({"name": self.name, "config": self.config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageOutcome:
    name: str
    study: str
    title: str
    status: str  # "done" | "reused" | "failed" | "skipped"
    seconds: float
    dir: Path
    result: StageResult
    error: str = ""
    seeded_from: str = ""  # the published run this finished stage was copied from, if any


def _outcome_from_done(stage: Stage, folder: Path, status: str) -> StageOutcome:
    done = read_json(folder / "done.json")
    return StageOutcome(stage.name, stage.study, stage.title, status, done["seconds"], folder,
                        StageResult(**done["result"]), seeded_from=done.get("seeded_from", ""))


def _finished_key(folder: Path) -> str | None:
    path = folder / "done.json"
    return read_json(path).get("key") if path.is_file() else None


STATES = ("finished", "interrupted", "outdated", "to run")


def stage_state(stage: Stage, out: Path) -> str:
    """What ``out`` holds for ``stage`` (one of :data:`STATES`): ``finished`` (reused as it is), ``interrupted``
    (killed or failed with this config: resumed), ``outdated`` (finished or started with another config: run
    again from scratch) or ``to run``. :func:`run_stage` decides by it."""
    folder, key = out / "stages" / stage.name, stage.key()
    if _finished_key(folder) == key:
        return "finished"
    started = folder / "started.json"
    if started.is_file() and read_json(started).get("key") == key:
        return "interrupted"
    return "outdated" if (folder / "done.json").is_file() or started.is_file() else "to run"


def time_limit_min(config: Any) -> float:
    """The minutes of every ``time_limit_min`` in a stage's (nested) config: its time-limited work."""
    if isinstance(config, dict):
        return sum(float(v) if k == "time_limit_min" and v else time_limit_min(v) for k, v in config.items())
    if isinstance(config, (list, tuple)):
        return sum(time_limit_min(v) for v in config)
    return 0.0


def seed_stages(stages: Sequence[Stage], out: Path, source: Path) -> list[str]:
    """Copy into ``out/stages/`` each stage that ``source`` (a published run folder: its
    ``stages/<name>/done.json`` and files, checkpoints left out) finished with the config key of
    ``stages``, unless ``out`` finished it already. Returns the names copied. A copied stage is
    then reused; a stage that must still run and needs a copied one's checkpoints fails with a hint."""
    from nnlab.errors import ConfigError

    if not (source / "stages").is_dir():
        raise ConfigError(f"{source} is not a published reproduce folder (no stages/ in it); pass the folder "
                          "that 'nnlab publish OUT DEST' wrote from a reproduce run, e.g. docs/results/cpu")
    seeded = []
    for stage in stages:
        src, dst = source / "stages" / stage.name, out / "stages" / stage.name
        if _finished_key(src) != stage.key() or _finished_key(dst) == stage.key():
            continue
        if dst.exists():
            shutil.rmtree(dst)  # an interrupted or outdated attempt: the finished copy replaces it
        shutil.copytree(src, dst)
        done = read_json(dst / "done.json")
        write_json(dst / "done.json", {**done, "seeded_from": done.get("seeded_from") or str(source)})
        seeded.append(stage.name)
    return seeded


def _seeded_hint(stage: Stage, results: dict[str, StageOutcome]) -> str:
    copied = [n for n in stage.needs if n in results and results[n].seeded_from]
    if not copied:
        return ""
    return (f" (stage(s) {', '.join(copied)} were reused from a published run without their checkpoints; "
            f"delete OUT/stages/{copied[0]} and rerun to train it here)")


def run_stage(stage: Stage, out: Path, data_dir: Path | None,
              results: dict[str, StageOutcome]) -> StageOutcome:
    """Run one stage unless a finished run with the same config key is there to reuse."""
    folder = out / "stages" / stage.name
    key, state = stage.key(), stage_state(stage, out)
    done_path, started_path = folder / "done.json", folder / "started.json"
    if state == "finished":
        return _outcome_from_done(stage, folder, "reused")
    missing = [n for n in stage.needs if n not in results or results[n].status == "failed"]
    if missing:
        return StageOutcome(stage.name, stage.study, stage.title, "skipped", 0.0, folder, StageResult(),
                            error=f"needs stage(s) {', '.join(missing)}, which did not finish")
    resume = state == "interrupted"
    folder.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)
    write_json(started_path, {"key": key, "config": stage.config})
    ctx = StageContext(stage.name, folder, stage.config, resume, data_dir, results)
    t0 = time.perf_counter()
    try:
        result = stage.fn(ctx)
    except Exception as exc:  # a failing stage must not stop the others
        (folder / "error.txt").write_text(traceback.format_exc())
        return StageOutcome(stage.name, stage.study, stage.title, "failed", time.perf_counter() - t0,
                            folder, StageResult(),
                            error=f"{type(exc).__name__}: {exc}{_seeded_hint(stage, results)}")
    seconds = time.perf_counter() - t0
    write_json(done_path, {"key": key, "seconds": seconds, "result": result.__dict__})
    return StageOutcome(stage.name, stage.study, stage.title, "done", seconds, folder, result)


def run_stages(stages: Sequence[Stage], out: Path, *, data_dir: Path | None = None,
               only: Sequence[str] | None = None,
               on_stage: Callable[[int, Stage], None] | None = None) -> list[StageOutcome]:
    """Run ``stages`` in order (those of studies in ``only``, if given); return their outcomes."""
    selected = [s for s in stages if not only or s.study in only]
    results: dict[str, StageOutcome] = {}
    for i, stage in enumerate(selected):
        if on_stage is not None:
            on_stage(i, stage)
        results[stage.name] = run_stage(stage, out, data_dir, results)
    return list(results.values())
