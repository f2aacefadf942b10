"""Run folders: the resolved config, metrics, checkpoints and summary of one experiment.

Layout of ``RUN/``::

    config.yaml       the final resolved config (written at start, so a crashed run still has it)
    metrics.jsonl     per-step / per-epoch records (:class:`nnlab.engine.metrics.MetricsLogger`)
    checkpoint/       latest checkpoint (:mod:`nnlab.engine.checkpoint`)
    summary.json      headline results, written at the end
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from nnlab.engine.io import to_jsonable, atomic_write_text, read_json, write_json
from nnlab.errors import CheckpointError


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
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

    def save_config(self, config: Any) -> Path:
        """Write ``config`` (a dataclass or dict) as ``config.yaml``."""
        data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_jsonable(data), sort_keys=False))

    def load_config(self) -> dict[str, Any]:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise CheckpointError(f"{self.path} is not an nnlab run folder (no config.yaml)")
        return yaml.safe_load(path.read_text()) or {}

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            raise CheckpointError(f"{self.path} has no summary.json; the run has not finished")
        return read_json(self.summary_path)
