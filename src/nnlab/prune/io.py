"""Save and load pruned models: ``pruned.json`` (method, ratio, ViT config, kept indices or
token schedule) plus the weights in ``checkpoint/`` (:mod:`nnlab.engine.checkpoint`)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from nnlab.engine.checkpoint import load_checkpoint, save_checkpoint
from nnlab.engine.io import read_json, write_json
from nnlab.errors import CheckpointError
from nnlab.models.vit import ViT, ViTConfig
from nnlab.prune import apvit
from nnlab.prune.runners import APViTRunner, CPViTRunner, PViTRunner, ToMeRunner, TokenRunner


def save_pruned(runner: TokenRunner, folder: str | Path, *, ratio: float, **info) -> Path:
    """Write ``folder/pruned.json`` and the runner's weights (ViT and agents) to ``folder/checkpoint``."""
    folder = Path(folder)
    meta = {"method": runner.method, "ratio": ratio, "vit": runner.vit.config.to_dict(),
            "spec": runner.spec(), **info}
    if isinstance(runner, APViTRunner):
        meta["agent_hidden"] = runner.agents[0].fc1.out_features if len(runner.agents) else 0
    save_checkpoint(folder / "checkpoint", 0, runner.state_dict(), {"format": "nnlab-pruned-vit-1"})
    write_json(folder / "pruned.json", meta)
    return folder


def _build(meta: dict) -> TokenRunner:
    vit = ViT(ViTConfig(**meta["vit"]))
    spec, method = meta["spec"], meta["method"]
    if method == "cp-vit":
        return CPViTRunner(vit, spec["keep"], spec.get("heads"))
    if method == "tome":
        return ToMeRunner(vit, spec["r"])
    if method == "p-vit":
        return PViTRunner(vit, spec["attn_keep"], spec["mlp_keep"])
    if method == "ap-vit":
        agents = nn.ModuleList(apvit.Agent(vit.config.dim, meta["agent_hidden"]) for _ in spec["positions"])
        return APViTRunner(vit, agents, spec["positions"], spec["threshold"], spec.get("counts"))
    if method == "base":
        return TokenRunner(vit)
    raise CheckpointError(f"pruned.json names an unknown method {method!r}; it was written by another version")


def load_pruned(folder: str | Path) -> TokenRunner:
    """The runner saved by :func:`save_pruned` in ``folder``, in eval mode."""
    folder = Path(folder)
    if not (folder / "pruned.json").is_file():
        raise CheckpointError(f"{folder} holds no pruned.json; point to a folder written by "
                              "'nnlab prune sweep' (DIR/models/METHOD-RATIO)")
    meta = read_json(folder / "pruned.json")
    runner = _build(meta)
    try:
        runner.load_state_dict(load_checkpoint(folder / "checkpoint").tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {folder} do not fit pruned.json ({exc})") from None
    return runner.eval()
