"""Run folders: the resolved config, metrics, checkpoints and summary of one experiment.

Layout of ``RUN/``::

    config.yaml       the final resolved config (written at start, so a crashed run still has it)
    metrics.jsonl     per-step / per-epoch records (:class:`nnlab.engine.metrics.MetricsLogger`)
    checkpoint/       latest checkpoint (:mod:`nnlab.engine.checkpoint`)
    summary.json      headline results, written at the end
    .lock             held (flock) by the one process writing the folder; a second one is refused
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nnlab.engine.io import to_jsonable, atomic_write_text, read_json, write_json
from nnlab.errors import CheckpointError, ConfigError


def check_out(out: str | Path, what: str = "--out") -> Path:
    """Refuse an ``--out`` that cannot become a run folder (a file, a path under a file, an
    unwritable parent) with a one-line ConfigError, before any work starts; returns it as a Path.
    ``what`` names the argument in the message."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file; give a folder path")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{what} {out} cannot be created: {parent} is a file; choose another path")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{what} {out} cannot be created ({parent} is not writable); choose another path")
    return out


def check_out_file(out: str | Path) -> Path:
    """Like :func:`check_out` for an ``--out`` that names a file: refuse an existing folder there."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path (e.g. {out / 'train.safetensors'})")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {out.parent} is a file; choose another path")
    check_out(out.parent)
    return out


class RunDir:
    """Paths and writers of one run folder. ``create``: make the folder now (writers); readers pass
    False, so that a mistyped path is never created. Writes create it anyway."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @contextlib.contextmanager
    def lock(self):
        """Hold ``RUN/.lock`` while writing the folder: a second process (a command rerun while the
        first still trains) gets a CheckpointError instead of interleaving checkpoints and metrics.
        An OS lock (flock), so a killed process never leaves a stale one. No-op without fcntl."""
        with folder_lock(self.path):
            yield self

    def save_config(self, config: Any) -> Path:
        """Write ``config`` (a dataclass or dict) as ``config.yaml``."""
        data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_jsonable(data), sort_keys=False))

    def load_config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise CheckpointError(f"{self.path} is not an nnlab run folder (no config.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid YAML ({' '.join(str(exc).split())}); restore it "
                                  "or train the run again") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a mapping of option: value; restore it or train "
                                  "the run again")
        return data

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            raise CheckpointError(f"{self.path} has no summary.json; the run has not finished")
        return read_json(self.summary_path)


@contextlib.contextmanager
def folder_lock(path: str | Path):
    """Exclusive, non-blocking lock of folder ``path`` (``path/.lock`` records the holder's pid and
    host). The OS releases it when the holder dies, so a lock left by a killed process is simply
    taken over. On a network file system without flock support the lock may not hold across hosts."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise CheckpointError(f"{path} is being written by {holder}; wait for it to finish (or stop it), "
                                  "or choose another --out folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"({' '.join(sys.argv[:3])})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock
