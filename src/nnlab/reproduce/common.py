"""Helpers shared by the study modules of ``nnlab reproduce``: data folders, fresh stage
folders and the preset check (tables: :func:`nnlab.report.write_csv`)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from nnlab.errors import ConfigError
from nnlab.reproduce.stages import Stage, StageContext

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


def data_sets(config) -> set[str]:
    """The data set names a stage config reads (every ``data`` key, nested configs included)."""
    if isinstance(config, dict):
        return set().union(*(({v} if k == "data" and isinstance(v, str) else data_sets(v))
                             for k, v in config.items()))
    if isinstance(config, (list, tuple)):
        return set().union(*(data_sets(v) for v in config))
    return set()


def check_data_dir(stages: Sequence[Stage], data_dir: str | Path | None) -> None:
    """Before hours of stages: a one-line ConfigError when ``--data-dir`` is given but lacks a folder
    that the stages read (``DIR/mnist``, ``DIR/cifar10``, ``DIR/celeba``). Without ``--data-dir``
    the loaders' own search (``$NNLAB_DATA``, downloads) applies, stage by stage."""
    if data_dir is None:
        return
    needed = sorted(set().union(*(data_sets(s.config) for s in stages)) & set(DATA_FOLDERS))
    missing = [f"{DATA_FOLDERS[d]}/ ({d})" for d in needed if not (Path(data_dir) / DATA_FOLDERS[d]).exists()]
    if missing:
        raise ConfigError(f"--data-dir {data_dir} lacks {', '.join(missing)}, which the chosen stages read; "
                          "point --data-dir at a folder holding them (as ../shared/data) or choose studies with --only")


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
