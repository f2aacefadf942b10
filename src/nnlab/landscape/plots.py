"""Figures of a landscape sweep, built from its ``RUN/metrics.jsonl`` (never from live objects).

Like the seed's Figs 20-22 and the paper's Fig. 4; BN and no-BN in contrasting colours on the
same axes, optional log-scale y axes:

- ``curves.png``: training loss (per probe step) and test top-1 (per epoch), every lr;
- ``loss_band.png``: loss landscape band: over step sizes at one lr (left), across lrs (right);
- ``gpred_band.png``: gradient predictiveness band, the same two views;
- ``beta.png``: effective beta-smoothness (left), the same-batch beta along the actual step
  (middle) and the seed's consecutive-batch beta_t (right; labelled as mixing batch noise, and its
  lr ||g_t|| denominator is the distance moved only at momentum 0);
- ``hessian.png``: top Hessian eigenvalue, when it was probed, with the power iteration's
  residual ||Hv - lambda v|| / |lambda| beside it (hollow markers: not converged).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nnlab.engine.metrics import read_jsonl
from nnlab.errors import CheckpointError
from nnlab.landscape.bands import GRADDIST, LANDSCAPE, Band, diverged, eta_band, lr_band, series
from nnlab.report.figures import plt, save_figure

COLORS = {"on": "tab:red", "off": "tab:blue"}
LABELS = {"on": "with BN", "off": "without BN"}


def load_records(run: str | Path) -> list[dict]:
    """All records of a sweep (``RUN/metrics.jsonl``, each with ``bn`` and ``lr_run`` keys)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: run 'nnlab landscape run --out {run}' first")
    records = read_jsonl(path)
    if any("bn" not in r or "lr_run" not in r for r in records):
        raise CheckpointError(f"{path} is not a landscape sweep's log (records without bn and lr_run); pass the "
                              "folder that 'nnlab landscape run' wrote")
    return records


def group(records: Sequence[dict]) -> dict[str, dict[float, list[dict]]]:
    """bn ("on"/"off") -> lr -> that run's records."""
    out: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        out.setdefault(r["bn"], {}).setdefault(float(r["lr_run"]), []).append(r)
    return {bn: dict(sorted(runs.items())) for bn, runs in sorted(out.items())}


def pick_lr(lrs: Sequence[float], target: float = 0.1) -> float:
    return min(lrs, key=lambda lr: abs(lr - target))


def _fill(ax, band: Band, bn: str, label: str) -> None:
    if band.steps:
        ax.fill_between(band.steps, band.low, band.high, color=COLORS[bn], alpha=0.35, lw=0, label=label)
        ax.plot(band.steps, band.low, color=COLORS[bn], lw=0.6)
        ax.plot(band.steps, band.high, color=COLORS[bn], lw=0.6)


def _finish(fig, axes, path: Path, log: bool, log_axes=None) -> Path:
    for ax in axes:
        if log and (log_axes is None or ax in log_axes):
            ax.set_yscale("log")
        ax.set_xlabel(ax.get_xlabel() or "step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(groups, path: Path, log: bool) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for bn, runs in groups.items():
        for i, (lr, recs) in enumerate(runs.items()):
            alpha = 0.35 + 0.65 * (i + 1) / len(runs)
            s = series(recs, LANDSCAPE, "train_loss")
            a.plot(sorted(s), [s[k] for k in sorted(s)], color=COLORS[bn], alpha=alpha, lw=1,
                   label=f"{LABELS[bn]}, lr {lr:g}")
            ep = [r for r in recs if r.get("probe") is None and r.get("test_top1") is not None]
            b.plot([r["epoch"] for r in ep], [100 * r["test_top1"] for r in ep], "o-", ms=3,
                   color=COLORS[bn], alpha=alpha, label=f"{LABELS[bn]}, lr {lr:g}")
    a.set(title="training loss (batch at each probe step)", ylabel="loss")
    b.set(title="test top-1", ylabel="top-1 (%)", xlabel="epoch")
    return _finish(fig, [a, b], path, log, log_axes=[a])


def plot_band(groups, quantity: str, path: Path, log: bool, lr: float | None) -> Path:
    """quantity "loss" or "gdist": band over step sizes at ``lr`` and band across lrs."""
    names = {"loss": ("loss landscape", "loss", "train_loss", LANDSCAPE),
             "gdist": ("gradient predictiveness", "||g' - g||", "grad_dist", GRADDIST)}
    title, ylabel, key, probe = names[quantity]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for bn, runs in groups.items():
        at = pick_lr(list(runs), lr if lr is not None else 0.1)
        _fill(a, eta_band(runs[at], quantity), bn, f"{LABELS[bn]}, lr {at:g}")
        _fill(b, lr_band({x: series(r, probe, key) for x, r in runs.items() if not diverged(r)}), bn,
              f"{LABELS[bn]}, lrs {', '.join(f'{x:g}' for x in runs)}")
    a.set(title=f"{title}: over step sizes [0.5, 4] x lr", ylabel=ylabel)
    b.set(title=f"{title}: across learning rates", ylabel=ylabel)
    return _finish(fig, [a, b], path, log)


def plot_beta(groups, path: Path, log: bool) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    keys = ((LANDSCAPE, "land_beta"), (GRADDIST, "beta_same"), (GRADDIST, "beta_t"))
    for bn, runs in groups.items():
        for i, (lr, recs) in enumerate(runs.items()):
            alpha = 0.35 + 0.65 * (i + 1) / len(runs)
            for ax, (probe, key) in zip(axes, keys):
                s = series(recs, probe, key)
                ax.plot(sorted(s), [s[k] for k in sorted(s)], color=COLORS[bn], alpha=alpha, lw=1,
                        label=f"{LABELS[bn]}, lr {lr:g}")
    axes[0].set(title="effective beta-smoothness: max ||g' - g|| / ||eta g||", ylabel="beta")
    axes[1].set(title="same batch: ||g(w_{t+1}; B_t) - g_t|| / ||w_{t+1} - w_t||", ylabel="beta_same")
    axes[2].set(title="seed's beta_t = ||g_{t+1} - g_t|| / (lr ||g_t||)\n(consecutive batches: "
                "includes batch noise)", ylabel="beta_t")
    return _finish(fig, list(axes), path, log)


def plot_hessian(groups, path: Path, log: bool) -> Path | None:
    fig, (ax, res) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for bn, runs in groups.items():
        for lr, recs in runs.items():
            s = series(recs, LANDSCAPE, "hess_top")
            drawn |= bool(s)
            ax.plot(sorted(s), [s[k] for k in sorted(s)], "-", color=COLORS[bn], label=f"{LABELS[bn]}, lr {lr:g}")
            done = {int(r["step"]) for r in recs if r.get("hess_converged") is not False and "hess_top" in r}
            for steps, face in ((sorted(k for k in s if k in done), COLORS[bn]),
                                (sorted(k for k in s if k not in done), "none")):
                ax.scatter(steps, [s[k] for k in steps], s=12, edgecolors=COLORS[bn], facecolors=face)
            r = series(recs, LANDSCAPE, "hess_residual")
            res.plot(sorted(r), [r[k] for k in sorted(r)], "o-", ms=3, color=COLORS[bn],
                     label=f"{LABELS[bn]}, lr {lr:g}")
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="top Hessian eigenvalue (power iteration; hollow: not converged)", ylabel="lambda_max")
    res.set(title="power-iteration residual ||Hv - lambda v|| / |lambda|", ylabel="residual")
    return _finish(fig, [ax, res], path, log)


def make_figures(run: str | Path, out: str | Path, *, log: bool = False, lr: float | None = None) -> list[Path]:
    """Draw every figure of sweep ``run`` into folder ``out``; returns the files written."""
    groups = group(load_records(run))
    if not groups:
        raise CheckpointError(f"{run}/metrics.jsonl has no records yet; let the sweep run longer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_curves(groups, out / "curves.png", log),
             plot_band(groups, "loss", out / "loss_band.png", log, lr),
             plot_band(groups, "gdist", out / "gpred_band.png", log, lr),
             plot_beta(groups, out / "beta.png", log),
             plot_hessian(groups, out / "hessian.png", log)]
    return [p for p in paths if p is not None]
