"""Pruning by Gamma's order: filters (conv) or weights (linear) that entered Gamma's support
earlier are more important; ties (same entry epoch, or never) are broken by the magnitude of W,
larger first. ``ratio`` of the layer's filters/weights, least important first, is set to zero.

The original DessiLBI code ranks by ``||W_g|| - entry_epoch``, which lets a large weight jump
ahead of filters that entered earlier; here the order is strictly lexicographic.
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnlab.data import BatchLoader
from nnlab.data.transforms import Normalize
from nnlab.engine.io import atomic_write_text
from nnlab.engine.trained import load_trained_run
from nnlab.engine.train import Callback, EvalResult, TrainConfig, evaluate, train
from nnlab.errors import CheckpointError, ConfigError
from nnlab.lbi.callback import LBI_FILE, read_lbi_file
from nnlab.report import write_csv


def importance_order(entry: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Indices, most important first: by entry epoch ascending (inf = never last), then magnitude
    descending. entry, magnitude: (S,) -> (S,) int64."""
    by_mag = torch.argsort(magnitude, descending=True, stable=True)
    return by_mag[torch.argsort(entry[by_mag], stable=True)]


def importance_order_reference(entry: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Plain reference of :func:`importance_order` (Python sort on (entry, -magnitude, index))."""
    keys = [(float(e), -float(m), i) for i, (e, m) in enumerate(zip(entry, magnitude))]
    return torch.tensor([k[2] for k in sorted(keys)], dtype=torch.int64)


def keep_mask(entry: torch.Tensor, magnitude: torch.Tensor, ratio: float) -> torch.Tensor:
    """(S,) bool: True for the ``S - round(ratio * S)`` most important units."""
    if not 0 <= ratio <= 1:
        raise ConfigError(f"pruning ratio must be in [0, 1], got {ratio}")
    n = entry.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[importance_order(entry, magnitude)[: n - round(ratio * n)]] = True
    return keep


def unit_magnitude(weight: torch.Tensor, per_filter: bool) -> torch.Tensor:
    """Per-filter norms (C_out,) of a conv weight (C_out, ...), or |W| flattened (numel,)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1) if per_filter else weight.abs().reshape(-1)


@torch.no_grad()
def apply_keep(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the pruned units of ``module``: filters (and bias entries) where keep (C_out,) is False
    for conv; weights where keep (numel,) is False for linear."""
    w = module.weight
    if keep.numel() == w.shape[0] and w.ndim == 4:
        w[~keep] = 0
        if module.bias is not None:
            module.bias[~keep] = 0
    else:
        w.mul_(keep.reshape(w.shape).to(w.dtype))


@dataclass
class PruneTable:
    """rows: (layer, ratio, top1, top5) with accuracies in [0, 1]; markdown: the table as text."""

    rows: list[tuple[str, float, float, float]]
    markdown: str


def markdown_table(rows: list[tuple[str, float, float, float]]) -> str:
    """Ratios as columns, top-1 and top-5 (percent) as rows, like the seed's table."""
    head = "| ratio | " + " | ".join(f"{r[1]:g}" for r in rows) + " |"
    sep = "| --- |" + " --- |" * len(rows)
    top1 = "| top-1 | " + " | ".join(f"{100 * r[2]:.2f}" for r in rows) + " |"
    top5 = "| top-5 | " + " | ".join(f"{100 * r[3]:.2f}" for r in rows) + " |"
    return "\n".join([f"layer `{rows[0][0]}`" if rows else "", "", head, sep, top1, top5]) + "\n"


@dataclass
class LoadedRun:
    """A finished LBI run: its config, data, model with the final weights, and entry epochs."""

    config: TrainConfig
    data: object
    model: nn.Module
    entry: dict[str, torch.Tensor]


def load_run(run: str | Path, data_dir: str | None = None) -> LoadedRun:
    """Rebuild a run's model with its weights and test subset (:func:`nnlab.engine.trained.load_trained_run`)
    and read its ``lbi.safetensors``."""
    trained = load_trained_run(run, data_dir=data_dir)
    lbi_path = trained.run.path / LBI_FILE
    if not lbi_path.is_file():
        raise CheckpointError(f"{trained.run.path} has no {LBI_FILE}; prune runs of `nnlab lbi train "
                              "--optimizer slbi` (or slbi-adam) that finished at least one epoch")
    entry = {k[len("entry."):]: v for k, v in read_lbi_file(lbi_path).items() if k.startswith("entry.")}
    return LoadedRun(trained.config, trained.data, trained.model, entry)


def _test_loader(loaded: LoadedRun) -> BatchLoader:
    d = loaded.data
    return BatchLoader(d.test, loaded.config.eval_batch_size, transform=Normalize(d.mean, d.std))


def _layer(model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    modules = dict(model.named_modules())
    name = layer[: -len(".weight")] if layer.endswith(".weight") else layer
    if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
        raise ConfigError(f"layer {layer!r} is not a weighted module of this model; choose one of: "
                          + ", ".join(n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))))
    return modules[name], f"{name}.weight"


class _KeepPruned(Callback):
    """Masked fine-tuning: re-zero the pruned units after every optimiser step."""

    def __init__(self, module: nn.Module, keep: torch.Tensor):
        self.module, self.keep = module, keep

    def on_step_end(self, ctx) -> None:
        apply_keep(self.module, self.keep)


def finetune_pruned(loaded: LoadedRun, module: nn.Module, keep: torch.Tensor, out: Path, *,
                    epochs: int, lr: float, resume: bool = False) -> EvalResult:
    """Fine-tune the pruned model with SGD for ``epochs`` keeping pruned units at zero; ``resume``
    continues (or, when it finished, reloads) the fine-tuning run already in ``out``."""
    cfg = dataclasses.replace(loaded.config, optimizer="sgd", optimizer_options={}, lr=lr, epochs=epochs,
                              weight_decay=0.0, max_steps=None, progress=False)
    train(cfg, out, model=loaded.model, data=loaded.data, callbacks=[_KeepPruned(module, keep)], resume=resume)
    return evaluate(loaded.model, _test_loader(loaded), next(loaded.model.parameters()).device)


@dataclass
class GammaPruneConfig:
    """What :func:`prune_run` prunes and how (the defaults of ``nnlab lbi prune``)."""

    layer: str = "conv3"             # module whose weight is pruned, e.g. conv3 or features.conv5_2
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.4, 0.6, 0.8])  # fractions of units removed
    data_dir: str | None = None      # override the run's data folder
    finetune_epochs: int = 0         # masked fine-tuning epochs per ratio (0: evaluate right after pruning)
    finetune_lr: float = 0.01        # learning rate of that fine-tuning


def prune_run(run: str | Path, out: str | Path, config: GammaPruneConfig | None = None, *,
              resume: bool = False) -> PruneTable:
    """Prune ``config.layer`` of ``run`` at each ratio (no fine-tuning unless ``finetune_epochs``),
    evaluate on the test split, write ``out/results.csv`` (layer,ratio,top1,top5) and ``results.md``.
    ``resume``: the fine-tuning runs already in ``out`` (``finetune-<ratio>/``) are continued, not refused."""
    c = config or GammaPruneConfig()
    layer, ratios, finetune_epochs, finetune_lr = c.layer, c.ratios, c.finetune_epochs, c.finetune_lr
    loaded = load_run(run, c.data_dir)
    module, pname = _layer(loaded.model, layer)
    if pname not in loaded.entry:
        raise ConfigError(f"{pname} has no Gamma in {run}; it was not coupled (choose a conv or linear layer)")
    entry = loaded.entry[pname].reshape(-1)
    per_filter = entry.numel() == module.weight.shape[0] and module.weight.ndim == 4
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rows, out = [], Path(out)
    for ratio in ratios:
        loaded.model.load_state_dict(original)
        keep = keep_mask(entry, unit_magnitude(module.weight.detach(), per_filter), ratio)
        apply_keep(module, keep)
        if finetune_epochs > 0:
            ev = finetune_pruned(loaded, module, keep, out / f"finetune-{ratio:g}",
                                 epochs=finetune_epochs, lr=finetune_lr, resume=resume)
        else:
            ev = evaluate(loaded.model, _test_loader(loaded))
        rows.append((layer, float(ratio), ev.top1, ev.top5))
    loaded.model.load_state_dict(original)
    return write_table(rows, out)


def write_table(rows: list[tuple[str, float, float, float]], out: Path) -> PruneTable:
    write_csv(out / "results.csv", ["layer", "ratio", "top1", "top5"],
              [(a, f"{b:g}", f"{c:.6f}", f"{d:.6f}") for a, b, c, d in rows])
    md = markdown_table(rows)
    atomic_write_text(out / "results.md", md)
    return PruneTable(rows, md)


def read_table(path: str | Path) -> list[dict]:
    """Rows of a ``results.csv`` as dicts with float ratio/top1/top5."""
    with open(path) as f:
        return [{**r, **{k: float(r[k]) for k in ("ratio", "top1", "top5")}} for r in csv.DictReader(f)]
