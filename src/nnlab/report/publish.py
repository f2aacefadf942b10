"""Publish a run folder for users to check: a copy as the command wrote it, minus what must not be
committed (checkpoints, the lock file, caches), plus a manifest of what was copied.

    nnlab publish runs/cifar-seed-scale/bn-lr0.1 docs/results/cifar-seed-scale/bn-lr0.1

Kept: ``config.yaml``, ``sweep.yaml``, ``metrics.jsonl`` / ``.csv``, ``summary.json``, figures,
tables and small safetensors (final weights of at most ``max_weights_mb``, e.g. ``model.safetensors``),
at any depth (a sweep's ``bn-on/lr-0.1/`` run folders included). Left out: ``checkpoint/`` folders,
``.lock``, temporary files, and anything larger than ``max_file_mb``. ``PUBLISHED.json`` in the
destination lists each file with its size and SHA-256.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from nnlab.engine.checkpoint import sha256
from nnlab.engine.io import write_json
from nnlab.engine.runs import check_out
from nnlab.errors import CheckpointError, ConfigError

SKIP_DIRS = {"checkpoint", "__pycache__", ".nnlab_cache"}
SKIP_NAMES = {".lock"}


@dataclass
class Published:
    """copied: files written (relative to the destination); skipped: (path, why) left out."""

    copied: list[str]
    skipped: list[tuple[str, str]]


def _why_not(path: Path, rel: Path, max_file: float, max_weights: float) -> str | None:
    size_mb = path.stat().st_size / 2**20
    if any(part in SKIP_DIRS for part in rel.parts[:-1]):
        return "checkpoint or cache"
    if path.name in SKIP_NAMES or path.name.endswith(".tmp") or path.name.startswith(".~"):
        return "lock or temporary file"
    if path.suffix == ".safetensors" and size_mb > max_weights:
        return f"weights of {size_mb:.0f} MB (over {max_weights:g} MB)"
    if size_mb > max_file:
        return f"{size_mb:.0f} MB (over {max_file:g} MB)"
    return None


def publish(run: str | Path, dest: str | Path, *, max_file_mb: float = 20.0, max_weights_mb: float = 25.0
            ) -> Published:
    """Copy ``run`` into ``dest`` (created; existing files of the same names are replaced)."""
    run, dest = Path(run), Path(dest)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a run folder")
    if dest.resolve() == run.resolve() or run.resolve() in dest.resolve().parents:
        raise ConfigError(f"publish {run} into a folder outside it, not {dest}")
    check_out(dest, "DEST")  # not a file, nor under one, and writable
    copied, skipped, manifest = [], [], {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run)
        why = _why_not(path, rel, max_file_mb, max_weights_mb)
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
