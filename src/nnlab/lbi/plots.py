"""Figures of DessiLBI runs, built only from the run files (``metrics.jsonl``, ``config.yaml``,
the checkpoint): loss/accuracy curves, per-layer sparsity curves, Gamma paths and weight images."""
from __future__ import annotations

from pathlib import Path

import torch

from nnlab.engine.checkpoint import load_checkpoint
from nnlab.engine.metrics import read_jsonl
from nnlab.engine.runs import RunDir
from nnlab.errors import CheckpointError
from nnlab.lbi.callback import LBI_FILE, read_lbi_file
from nnlab.report.figures import plt, save_figure


def epoch_records(run: str | Path) -> list[dict]:
    """The per-epoch records of a run (those with ``train_loss`` and ``train_top1``), in order; a
    one-line CheckpointError for a folder without any (another command's run, or no epoch yet)."""
    path = RunDir(run, create=False).metrics_path
    if not path.is_file():
        raise CheckpointError(f"{run} has no metrics.jsonl; pass run folders of `nnlab lbi train`")
    records = [r for r in read_jsonl(path) if "train_loss" in r and "train_top1" in r]
    if not records:
        raise CheckpointError(f"{run} logs no finished epoch (no train_loss / train_top1 in metrics.jsonl); pass run "
                              "folders of `nnlab lbi train` or `nnlab train` with at least one epoch done")
    return records


def run_label(run: str | Path) -> str:
    """``<optimizer> (<folder>)`` from the run's config, e.g. ``slbi-adam (lbi-mnist-adam)``."""
    try:
        return f"{RunDir(run, create=False).load_config().get('optimizer', '?')} ({Path(run).name})"
    except CheckpointError:
        return Path(run).name


def plot_curves(runs: list[str | Path], out: Path) -> Path:
    """Train loss, test top-1 (dense W, and DessiLBI's W* dashed) and train top-1 (dotted) against
    epoch, one colour per run; any ``nnlab train`` run folder works (W* only where logged)."""
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    any_star = False
    for run in runs:
        recs, label = epoch_records(run), run_label(run)
        ep = [r["epoch"] for r in recs]
        line, = ax_l.plot(ep, [r["train_loss"] for r in recs], label=label)
        tested = [r for r in recs if "test_top1" in r]
        ax_a.plot([r["epoch"] for r in tested], [100 * r["test_top1"] for r in tested], color=line.get_color(),
                  label=label)
        ax_a.plot(ep, [100 * r["train_top1"] for r in recs], ":", color=line.get_color(), label=f"{label} train")
        star = [r for r in recs if "test_top1_wstar" in r]
        if star:
            any_star = True
            ax_a.plot([r["epoch"] for r in star], [100 * r["test_top1_wstar"] for r in star], "--",
                      color=line.get_color(), label=f"{label} W*")
    ax_l.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    dense = [100 * r["test_top1"] for run in runs for r in epoch_records(run) if "test_top1" in r]
    ax_a.set(xlabel="epoch", ylabel="top-1 (%)", title="test top-1 (train dotted" + (", W* dashed)" if any_star else ")"),
             ylim=(max(0.0, min(dense) - 5), 100))  # from the dense curve: an early W* collapse would squash it
    for ax in (ax_l, ax_a):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, out / "curves.png", dpi=110)


def plot_sparsity(runs: list[str | Path], out: Path) -> Path | None:
    """Per-layer fraction of Gamma non-zero against epoch; one panel per layer, a line per run."""
    data = {run_label(r): epoch_records(r) for r in runs}
    data = {k: v for k, v in data.items() if v and "sparsity" in v[-1]}
    if not data:
        return None
    layers = list(next(iter(data.values()))[-1]["sparsity"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for label, recs in data.items():
            pts = [(r["epoch"], r["sparsity"][layer]) for r in recs if layer in r.get("sparsity", {})]
            ax.plot(*zip(*pts), label=label) if pts else None
        ax.set(title=layer.removesuffix(".weight"), xlabel="epoch", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of Gamma non-zero")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out / "sparsity.png", dpi=110)


def plot_gamma_paths(run: str | Path, out: Path) -> Path | None:
    """Sampled Gamma entries (filter norms for conv) against epoch, one panel per layer."""
    recs = [r for r in epoch_records(run) if "gamma_path" in r]
    if not recs:
        return None
    layers = list(recs[-1]["gamma_path"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3 * len(layers), 3), squeeze=False)
    ep = [r["epoch"] for r in recs]
    for ax, layer in zip(axes[0], layers):
        values = torch.tensor([r["gamma_path"][layer] for r in recs])  # (epochs, K)
        ax.plot(ep, values.numpy(), lw=1)
        ax.set(title=layer.removesuffix(".weight"), xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Gamma (filter norm for conv)")
    fig.suptitle(f"Gamma paths: {run_label(run)}")
    return save_figure(fig, out / f"gamma_paths_{Path(run).name}.png", dpi=110)


def plot_weights(runs: list[str | Path], out: Path, layer: str = "conv3") -> Path:
    """Weights of ``layer`` per run as an image: one row per filter (C_out, C_in*kh*kw)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        w = load_checkpoint(RunDir(run, create=False).checkpoint_dir).tensors.get(f"{layer}.weight")
        if w is None:
            raise CheckpointError(f"{run}'s model has no {layer}.weight; choose another --layer")
        mat = w.reshape(w.shape[0], -1).float()
        lim = float(mat.abs().max()) or 1.0
        ax.imshow(mat.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set(title=f"{run_label(run)}{_support_note(run, layer, w.shape[0])}", xlabel="input x kernel",
               ylabel="filter")
    return save_figure(fig, out / f"weights_{layer.replace('.', '_')}.png", dpi=110)


def _support_note(run: str | Path, layer: str, filters: int) -> str:
    """`` (k/n filters in Gamma's support)`` for DessiLBI runs, else empty."""
    path = RunDir(run, create=False).path / LBI_FILE
    key = f"gamma.{layer}.weight"
    if not path.is_file():
        return ""
    gammas = read_lbi_file(path)
    if key not in gammas:
        return ""
    k = int(gammas[key].reshape(filters, -1).ne(0).any(1).sum())
    return f" ({k}/{filters} filters in support)"


def plot_runs(runs: list[str | Path], out: str | Path, layer: str | None = "conv3") -> list[Path]:
    """All figures for ``runs`` into ``out`` (the weights image of ``layer`` unless None, as for runs
    of different models); returns the written paths."""
    out = Path(out)
    for run in runs:  # refuse unreadable runs before any figure is written
        if (Path(run) / LBI_FILE).is_file():
            read_lbi_file(Path(run) / LBI_FILE)
    paths = [plot_curves(runs, out), plot_sparsity(runs, out)]
    paths += [plot_gamma_paths(r, out) for r in runs]
    if layer:
        paths.append(plot_weights(runs, out, layer))
    return [p for p in paths if p is not None]
