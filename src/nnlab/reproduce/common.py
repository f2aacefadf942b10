"""Helpers shared by the study modules of ``nnlab reproduce``: data folders, fresh stage
folders and the preset check (tables: :func:`nnlab.report.write_csv`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from nnlab.errors import ConfigError
from nnlab.reproduce.stages import StageContext

PRESET_NAMES = ("quick", "cpu", "paper", "cpu-full")
# data set name -> its folder under --data-dir (the layout of ../shared/data)
DATA_FOLDERS = {"mnist": "mnist", "cifar10": "cifar10", "celeba64": "celeba"}


def check_preset(preset: str) -> str:
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return preset


def data_dir_for(ctx: StageContext, data: str) -> str | None:
    """The folder of data set ``data`` under ``--data-dir`` (``DIR/cifar10`` ...); None for the
    embedded ``mnist-5k`` or without ``--data-dir`` (nnlab then looks in ``$NNLAB_DATA/<name>``)."""
    if data == "mnist-5k" or ctx.data_dir is None:
        return None
    return str(Path(ctx.data_dir) / DATA_FOLDERS.get(data, data))


def work_dir(ctx: StageContext, name: str) -> Path:
    """``ctx.dir / name``, emptied first unless the stage is resuming an interrupted attempt
    (so a changed config never meets the files of the old one)."""
    path = ctx.dir / name
    if not ctx.resume and path.exists():
        shutil.rmtree(path)
    return path


def pct(value: float | None, digits: int = 2) -> float | None:
    """A fraction in [0, 1] as a rounded percentage (None stays None)."""
    return None if value is None else round(100 * value, digits)
