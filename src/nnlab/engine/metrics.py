"""Metrics as JSON lines: one record per step or epoch, appended and flushed as they come."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nnlab.engine.io import to_jsonable, atomic_write_text


class MetricsLogger:
    """Appends JSON records to ``path``.

    With ``resume_step`` set, records with ``"step" > resume_step`` (written after the checkpoint a
    run resumes from) are dropped first, so a resumed run's file matches an uninterrupted run's.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            self._keep_until(resume_step)
        self._file = open(self.path, "a")

    def _keep_until(self, step: int) -> None:
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def truncate(self, step: int) -> None:
        """Drop the records after ``step`` (a run rolled back to that step)."""
        self._file.close()
        self._keep_until(step)
        self._file = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a kill is skipped); a missing
    file is a one-line CheckpointError naming it."""
    from nnlab.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a run folder that nnlab wrote (it logs metrics.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
