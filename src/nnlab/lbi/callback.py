"""Engine callback recording DessiLBI's structure per epoch: per-layer sparsity, a fixed sample of
Gamma entries (the Gamma paths), the epoch each filter/weight entered Gamma's support (the pruning
order) and, optionally, the test accuracy of the sparse model ``W * 1[Gamma != 0]``.

Per epoch it adds to the metrics record ``sparsity`` ({param: fraction}), ``gamma_path``
({param: [values]}: filter norms ``||Gamma_g||`` for conv, entries for linear) and
``test_top1_wstar`` / ``test_top5_wstar``, and rewrites ``RUN/lbi.safetensors`` with
``gamma.<param>`` and ``entry.<param>`` (1-based entry epoch, ``inf`` for never) atomically.
"""
from __future__ import annotations

import math

import torch
from safetensors.torch import save_file

from nnlab.data import BatchLoader
from nnlab.data.transforms import Normalize
from nnlab.engine.io import atomic_write
from nnlab.engine.train import Callback, TrainContext, evaluate
from nnlab.lbi.groups import layer_gammas, layer_sparsity, layer_supports
from nnlab.lbi.base import LBIBase

LBI_FILE = "lbi.safetensors"


def read_lbi_file(path) -> dict:
    """The tensors of a run's ``lbi.safetensors``; a CheckpointError if it is cut short or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nnlab.errors import CheckpointError

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is unreadable ({first}); copy the run folder again, or retrain the run") from None


def update_entry(entry: torch.Tensor, supported: torch.Tensor, epoch: int) -> torch.Tensor:
    """First epoch in support: entry (S,) float with inf = never, supported (S,) bool -> (S,)."""
    return torch.where(supported & torch.isinf(entry), torch.full_like(entry, float(epoch)), entry)


def gamma_path_values(gamma: torch.Tensor, index: torch.Tensor, per_filter: bool) -> list[float]:
    """Values followed along the path: ``||Gamma_g||`` of filters ``index`` (per_filter) or the
    flat entries ``index`` of Gamma. gamma: weight-shaped; index: (K,) int64 -> K floats."""
    if per_filter:
        return gamma.reshape(gamma.shape[0], -1).norm(dim=1)[index].tolist()
    return gamma.reshape(-1)[index].tolist()


class LBICallback(Callback):
    """Records sparsity, Gamma paths, support entry epochs (see module docstring).

    sample: Gamma entries (filters for conv) followed per layer; eval_wstar: evaluate W* per epoch.
    A no-op unless the run's optimiser is a DessiLBI flavour.
    """

    def __init__(self, sample: int = 16, eval_wstar: bool = True, seed: int = 0):
        self.sample_size, self.eval_wstar, self.seed = sample, eval_wstar, seed
        self.entry: dict[str, torch.Tensor] = {}
        self.index: dict[str, torch.Tensor] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.active = isinstance(ctx.optimizer, LBIBase)
        if not self.active or self.index:
            return
        g = torch.Generator().manual_seed(self.seed)
        for name, sup in layer_supports(ctx.model, ctx.optimizer).items():
            n = sup.numel()
            self.index[name] = torch.randperm(n, generator=g)[: min(self.sample_size, n)].sort().values
            self.entry[name] = torch.full((n,), math.inf)

    def on_epoch_end(self, ctx: TrainContext, record: dict) -> None:
        if not self.active:
            return
        model, opt = ctx.model, ctx.optimizer
        supports = layer_supports(model, opt)
        gammas = layer_gammas(model, opt)
        for name, sup in supports.items():
            self.entry[name] = update_entry(self.entry[name], sup.reshape(-1).cpu(), ctx.epoch + 1)
        record["sparsity"] = layer_sparsity(model, opt)
        record["gamma_path"] = {n: gamma_path_values(gammas[n].cpu(), self.index[n], supports[n].ndim == 1
                                                     and gammas[n].ndim > 1)
                                for n in gammas}
        if self.eval_wstar:
            ev = self._eval_wstar(ctx)
            record.update(test_top1_wstar=ev.top1, test_top5_wstar=ev.top5)
        if ctx.rank == 0:
            self._write(ctx, gammas, supports)

    def _eval_wstar(self, ctx: TrainContext):
        d = ctx.data
        loader = BatchLoader(d.test, ctx.config.eval_batch_size, transform=Normalize(d.mean, d.std))
        with ctx.optimizer.w_star():
            return evaluate(ctx.model, loader, ctx.device, reduce=False)

    def _write(self, ctx: TrainContext, gammas: dict, supports: dict) -> None:
        tensors = {f"gamma.{n}": g.detach().cpu().contiguous() for n, g in gammas.items()}
        tensors.update({f"entry.{n}": self.entry[n].reshape(supports[n].shape).contiguous()
                        for n in gammas})
        atomic_write(ctx.run.path / LBI_FILE, lambda tmp: save_file(tensors, tmp))

    def state_dict(self) -> dict:
        return {"entry": dict(self.entry), "index": dict(self.index)}

    def load_state_dict(self, state: dict) -> None:
        self.entry, self.index = dict(state.get("entry", {})), dict(state.get("index", {}))
