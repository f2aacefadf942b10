"""Checkpoints: model weights in safetensors plus a state file, loaded with ``weights_only=True``.

Layout of a checkpoint folder::

    model-00000123.safetensors   weights (tensors only)
    state-00000123.pt            optimiser/scheduler state, RNG states, counters (torch.save)
    latest.json                  {"step": 123, "model": ..., "state": ..., "sha256": {file: hex}}, written last

Both files are written atomically, then ``latest.json`` is replaced atomically, so a kill at any
moment leaves the previous complete checkpoint in force. Older pairs are removed after.
``latest.json`` holds the SHA-256 of both files and :func:`load_checkpoint` verifies them, so bytes
changed on disk after the write (a bad copy, a flipped bit) are refused, never resumed from
(checkpoints written before the hashes existed load unverified).
"""
from __future__ import annotations

import hashlib
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nnlab.engine.io import atomic_write, read_json, write_json
from nnlab.errors import CheckpointError, DivergenceError


@dataclass
class Checkpoint:
    """A loaded checkpoint. tensors: name -> tensor; state: the state file's dict."""

    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA) and Python RNG states, in a weights_only-loadable form."""
    py = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep: int = 1) -> Path:
    """Write a checkpoint for ``step`` into ``folder`` and make it the latest; keep ``keep`` of them
    (0: all). Checkpoints of later steps (left by a run rolled back or restarted) are deleted after
    the new one is in place, so ``latest.json`` never names a missing file."""
    folder = Path(folder)
    model_name, state_name = f"model-{step:08d}.safetensors", f"state-{step:08d}.pt"
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(folder, step, flat)
    atomic_write(folder / model_name, lambda tmp: save_file(flat, tmp))
    atomic_write(folder / state_name, lambda tmp: torch.save(state, tmp))
    sums = {name: sha256(folder / name) for name in (model_name, state_name)}
    write_json(folder / "latest.json", {"step": step, "model": model_name, "state": state_name, "sha256": sums})
    _prune(folder, step, keep)
    return folder / model_name


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's content (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _verify(folder: Path, meta: dict) -> None:
    for name, expected in (meta.get("sha256") or {}).items():
        if sha256(folder / name) != expected:
            raise CheckpointError(f"checkpoint file {folder / name} is corrupted (its SHA-256 differs from the one "
                                  "recorded when it was written); restore the folder from a copy, or start a new "
                                  "--out folder")


def check_finite(folder: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    """A :class:`DivergenceError` instead of a checkpoint of non-finite weights: the newest checkpoint
    on disk stays the last finite one, so ``--resume`` (with a lower learning rate) can go on from it."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is None:
        return
    last = read_json(folder / "latest.json")["step"] if has_checkpoint(folder) else None
    kept = f"the newest checkpoint (step {last}) is the last finite one" if last is not None else "none was written"
    raise DivergenceError(f"weights are not finite at step {step} ({bad}), so they were not checkpointed and "
                          f"{kept}; start again with a lower learning rate")


def _prune(folder: Path, step: int, keep: int) -> None:
    """Delete checkpoints after ``step``, and all but the last ``keep`` up to it."""
    steps = sorted({int(p.stem.split("-")[1]) for p in folder.glob("model-*.safetensors")})
    earlier = [s for s in steps if s <= step]
    for s in [s for s in steps if s > step] + (earlier[:-keep] if keep > 0 else []):
        (folder / f"model-{s:08d}.safetensors").unlink(missing_ok=True)
        (folder / f"state-{s:08d}.pt").unlink(missing_ok=True)


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "latest.json").is_file()


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load the latest checkpoint in ``folder``; a :class:`CheckpointError` if missing or corrupt."""
    folder = Path(folder)
    if not has_checkpoint(folder):
        raise CheckpointError(f"no checkpoint in {folder} (expected {folder / 'latest.json'}); "
                              "train first, or point to the run's checkpoint folder")
    try:
        meta = read_json(folder / "latest.json")
        _verify(folder, meta)
        tensors = load_file(folder / meta["model"], device=str(map_location))
        state = torch.load(folder / meta["state"], map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{folder / meta['state']} is not an nnlab state file (it holds Python objects, "
                              "which nnlab never unpickles); restore the folder from a copy, or start a new "
                              "--out folder") from None
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint in {folder} is unreadable ({type(exc).__name__}: {exc}); restore "
                              "the folder from a copy, or start a new --out folder") from None
    return Checkpoint(step=int(meta["step"]), tensors=tensors, state=state)
