"""Publish a run folder for users to check: a copy as the command wrote it, minus what must not be
committed (checkpoints, the lock file, caches), plus a manifest of what was copied.

    nnlab publish runs/cifar-seed-scale/bn-lr0.1 docs/results/cifar-seed-scale/bn-lr0.1

Kept: ``config.yaml``, ``sweep.yaml``, ``metrics.jsonl`` / ``.csv``, ``summary.json``, figures,
tables and small safetensors (final weights of at most ``max_weights_mb``, e.g. ``model.safetensors``),
at any depth (a sweep's ``bn-on/lr-0.1/`` run folders included). Left out: ``checkpoint/`` folders
(and a pruning sweep's ``prepared/``: resume state), ``.lock``, temporary files, anything larger than
``max_file_mb``, and what matches an ``exclude`` pattern (e.g. ``models`` for a sweep's pruned models). ``PUBLISHED.json`` in the
destination lists each file with its size and SHA-256.
"""
from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnlab.engine.checkpoint import sha256
from nnlab.engine.io import write_json
from nnlab.engine.runs import check_out
from nnlab.errors import CheckpointError, ConfigError

SKIP_DIRS = {"checkpoint", "prepared", "__pycache__", ".nnlab_cache"}
SKIP_NAMES = {".lock"}


@dataclass
class Published:
    """copied: files written (relative to the destination); skipped: (path, why) left out."""

    copied: list[str]
    skipped: list[tuple[str, str]]


def _excluded(rel: Path, patterns: Sequence[str]) -> str | None:
    """The first pattern (fnmatch) matching ``rel`` or one of the folders it lies in, else None."""
    prefixes = [Path(*rel.parts[:i]).as_posix() for i in range(1, len(rel.parts) + 1)]
    return next((pat for pat in patterns if any(fnmatch.fnmatchcase(x, pat) for x in prefixes)), None)


def _why_not(path: Path, rel: Path, max_file: float, max_weights: float, exclude: Sequence[str] = ()
             ) -> str | None:
    size_mb = path.stat().st_size / 2**20
    pattern = _excluded(rel, exclude)
    if pattern is not None:
        return f"excluded by {pattern!r}"
    if any(part in SKIP_DIRS for part in rel.parts[:-1]):
        return "checkpoint or cache"
    if path.name in SKIP_NAMES or path.name.endswith(".tmp") or path.name.startswith(".~"):
        return "lock or temporary file"
    if path.suffix == ".safetensors" and size_mb > max_weights:
        return f"weights of {size_mb:.0f} MB (over {max_weights:g} MB)"
    if size_mb > max_file:
        return f"{size_mb:.0f} MB (over {max_file:g} MB)"
    return None


def publish(run: str | Path, dest: str | Path, *, max_file_mb: float = 20.0, max_weights_mb: float = 25.0,
            exclude: Sequence[str] = ()) -> Published:
    """Copy ``run`` into ``dest`` (created; existing files of the same names are replaced). ``exclude``:
    fnmatch patterns of paths relative to ``run``; a pattern that matches a folder leaves it all out."""
    run, dest = Path(run), Path(dest)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a run folder")
    if dest.resolve() == run.resolve() or run.resolve() in dest.resolve().parents:
        raise ConfigError(f"publish {run} into a folder outside it, not {dest}")
    check_out(dest, "DEST")  # not a file, nor under one, and writable
    copied, skipped, manifest = [], [], {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run)
        why = _why_not(path, rel, max_file_mb, max_weights_mb, exclude)
        if why:
            skipped.append((rel.as_posix(), why))
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(rel.as_posix())
        manifest[rel.as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    write_json(dest / "PUBLISHED.json", {"source": str(run), "files": manifest,
                                         "left_out": {p: why for p, why in skipped}})
    return Published(copied, skipped)
