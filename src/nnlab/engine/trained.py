"""Trained runs rebuilt from their folders: config -> data -> model -> weights.

The one loader of ``nnlab train`` runs (the pruning sweep, DessiLBI pruning) and the builders the
trainer itself uses, so that a run is always rebuilt the way it was trained. Weights come from
``RUN/checkpoint/`` (the latest) or, in a published folder that ships no checkpoint,
``RUN/model.safetensors`` (the final weights alone, written when a run finishes).

>>> run = load_trained_run("runs/quickstart")
>>> run.model, run.data.test, run.config.epochs
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nnlab.config import from_dict
from nnlab.data import DatasetSplits, load_dataset
from nnlab.engine.checkpoint import has_checkpoint, load_checkpoint
from nnlab.engine.io import atomic_write
from nnlab.engine.runs import RunDir
from nnlab.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from nnlab.engine.train import TrainConfig

FINAL_WEIGHTS = "model.safetensors"


def run_data(config: "TrainConfig", data: DatasetSplits | None = None, *, subsets: bool = True) -> DatasetSplits:
    """The run's data set (``data`` if given, else loaded from ``config``); with ``subsets``, the
    seeded train / test subsets of ``train_limit`` / ``test_limit`` the run trained and tested on."""
    if data is None:
        data = load_dataset(config.data, config.data_dir, **config.data_options)
    if not subsets:
        return data
    return data.replace(train=data.train.random_subset(config.train_limit, config.seed),
                        test=data.test.random_subset(config.test_limit, config.seed + 1))


def build_model(config: "TrainConfig", data: DatasetSplits) -> nn.Module:
    """``config.model`` from the zoo, sized for ``data`` (channels, image size, classes)."""
    from nnlab.models import create_model

    ch, h, _ = data.shape
    try:
        return create_model(config.model, num_classes=data.num_classes, in_chans=ch, image_size=h,
                            **config.model_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build model {config.model!r} for {data.name} images {data.shape} with "
                          f"options {config.model_options}: {exc}") from None


def save_final_weights(model: nn.Module, run: RunDir) -> Path:
    """``RUN/model.safetensors``: the weights alone (no optimiser state), enough to publish and reuse."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(run.path / FINAL_WEIGHTS, lambda tmp: save_file(flat, tmp))


def load_weights(run: RunDir) -> dict[str, torch.Tensor]:
    """The latest checkpoint's weights, else ``model.safetensors``; a CheckpointError when neither."""
    final = run.path / FINAL_WEIGHTS
    if has_checkpoint(run.checkpoint_dir) or not final.is_file():
        return load_checkpoint(run.checkpoint_dir).tensors
    return read_weights_file(final)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``path``; a CheckpointError when it is corrupt."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{path} is unreadable ({exc}); copy it again from the trained run") from None


def load_init_weights(model: nn.Module, source: str | Path) -> None:
    """Copy into ``model`` the weights of ``source``: a run folder (:func:`load_weights`) or a
    ``.safetensors`` file. A CheckpointError names a missing source or weights that do not fit."""
    path = Path(source)
    if path.is_dir():
        tensors = load_weights(RunDir(path, create=False))
    elif path.is_file() and path.suffix == ".safetensors":
        tensors = read_weights_file(path)
    else:
        raise CheckpointError(f"init_from {source} is neither a run folder nor a .safetensors file; give "
                              "the folder of an 'nnlab train' run or its model.safetensors")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {source} do not fit this run's model "
                              f"({str(exc).splitlines()[0]}); init_from needs the same model and options") from None


@dataclass
class TrainedRun:
    """A run folder rebuilt: its config, data (see :func:`run_data`) and model (eval mode)."""

    run: RunDir
    config: "TrainConfig"
    data: DatasetSplits
    model: nn.Module


def load_trained_run(path: str | Path, *, data: str | None = None, data_dir: str | None = None,
                     subsets: bool = True) -> TrainedRun:
    """Rebuild run folder ``path`` (from ``nnlab train``, or a published copy of one). ``data`` /
    ``data_dir`` replace the run's data set name / folder; ``subsets`` as in :func:`run_data`."""
    from nnlab.engine.train import TrainConfig

    if not Path(path).is_dir():
        raise CheckpointError(f"run folder {path} does not exist; train one with 'nnlab train --out RUN'")
    run = RunDir(path, create=False)
    config = from_dict(TrainConfig, run.load_config())
    config = dataclasses.replace(config, data=data or config.data, data_dir=data_dir or config.data_dir)
    splits = run_data(config, subsets=subsets)
    return TrainedRun(run, config, splits, trained_model(run, config, splits))


def trained_model(run: RunDir, config: "TrainConfig", data: DatasetSplits) -> nn.Module:
    """Run ``run``'s model (eval mode), built from its ``config`` for ``data``, with its weights."""
    model = build_model(config, data)
    try:
        model.load_state_dict(load_weights(run))
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {run.path} do not fit model {config.model} of its config.yaml "
                              f"({str(exc).splitlines()[0]}); use the run's own files") from None
    return model.eval()
