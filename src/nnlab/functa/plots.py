"""Figures built from files: functasets (safetensors) and run folders (metrics.jsonl, summary.json)."""
from __future__ import annotations

from pathlib import Path

from nnlab.engine.metrics import read_jsonl
from nnlab.engine.runs import RunDir
from nnlab.errors import CheckpointError
from nnlab.functa.functaset import load_functaset
from nnlab.report import write_csv
from nnlab.report.figures import plt, save_figure


def plot_histograms(functaset: str | Path, out: Path) -> list[Path]:
    """Per-image PSNR histogram and inner-loop MSE histograms (one series per inner step)."""
    fs = load_functaset(functaset)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(fs.psnr.numpy(), bins=60)
    ax.set(xlabel="PSNR (dB)", ylabel="images", title=f"mean {fs.psnr.mean():.2f} dB, n={len(fs.psnr)}")
    paths = [save_figure(fig, out / "psnr-hist.png")]
    if fs.inner_mse.numel():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k in range(fs.inner_mse.shape[1]):
            ax.hist(fs.inner_mse[:, k].clamp_min(1e-6).log10().numpy(), bins=60, alpha=0.5, label=f"before step {k + 1}")
        if fs.mse.numel():
            ax.hist(fs.mse.clamp_min(1e-6).log10().numpy(), bins=60, alpha=0.5, label="after the last step")
        ax.set(xlabel="log10 inner-loop MSE", ylabel="images")
        ax.legend()
        paths.append(save_figure(fig, out / "inner-mse-hist.png"))
    return paths


def plot_learning_curves(classify_run: str | Path | None, baseline_run: str | Path | None, out: Path) -> Path:
    """Test top-1 against epoch for the latent MLP and the pixel baseline, in one plot."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run, label in ((classify_run, "MLP on functa latents"), (baseline_run, "ResNet-18 CD-PreAct on pixels")):
        if run is None:
            continue
        recs = [r for r in read_jsonl(Path(run) / "metrics.jsonl") if "test_top1" in r]
        ax.plot([r["epoch"] for r in recs], [100 * r["test_top1"] for r in recs], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="test top-1 (%)")
    ax.legend()
    return save_figure(fig, out / "learning-curves.png")


def _train_summary(run: str | Path) -> dict:
    """summary.json of a finished functa train run; a one-line CheckpointError for anything else."""
    summary = RunDir(run, create=False).read_summary() if Path(run).is_dir() else None
    if summary is None or "latent_dim" not in summary or "test_psnr" not in summary:
        raise CheckpointError(f"{run} is not a finished 'nnlab functa train' run (no summary.json with latent_dim "
                              "and test_psnr); pass the train runs of the sweep")
    return summary


def plot_sweep(runs: list[str | Path], out: Path) -> list[Path]:
    """Test PSNR against latent size from train runs' summary.json; also writes sweep.csv. Each point is
    labelled with its meta-training minutes, since a sweep may give its main size a longer budget."""
    rows = sorted((_train_summary(r) for r in runs), key=lambda s: s["latent_dim"])
    out.mkdir(parents=True, exist_ok=True)
    columns = ["latent_dim", "test_psnr", "steps", "train_minutes"]
    write_csv(out / "sweep.csv", columns, [[s[k] for k in columns] for s in rows])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([s["latent_dim"] for s in rows], [s["test_psnr"] for s in rows], marker="o")
    for s in rows:  # the budget beside each point: a longer-trained size must not pass for a better one
        ax.annotate(f"{s['train_minutes']:.0f} min", (s["latent_dim"], s["test_psnr"]), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    ax.set(xscale="log", xlabel="latent size", ylabel="test PSNR (dB)",
           title="labels: minutes of meta-training")
    return [out / "sweep.csv", save_figure(fig, out / "latent-sweep.png")]


def plot_psnr_curve(run: str | Path, out: Path) -> Path:
    """Train and validation PSNR against meta-training minutes of one run."""
    recs = read_jsonl(Path(run) / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("train_psnr", "val_psnr"):
        pts = [(r["minutes"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set(xlabel="meta-training minutes", ylabel="PSNR (dB)")
    ax.legend()
    return save_figure(fig, out / f"psnr-{Path(run).name}.png")


def plot_compare(runs: list[str | Path], out: Path) -> list[Path]:
    """Validation PSNR against meta-training minutes of several train runs in one figure (a curve per
    run, labelled with its folder name and test PSNR), and compare.csv with each run's summary."""
    summaries = [_train_summary(r) for r in runs]  # refuse a wrong folder before drawing anything
    out.mkdir(parents=True, exist_ok=True)
    columns = ["run", "latent_dim", "steps", "train_minutes", "test_psnr"]
    write_csv(out / "compare.csv", columns,
              [[Path(r).name, *(s.get(k) for k in columns[1:])] for r, s in zip(runs, summaries)])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, s in zip(runs, summaries):
        pts = [(r["minutes"], r["val_psnr"]) for r in read_jsonl(Path(run) / "metrics.jsonl") if "val_psnr" in r]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=f"{Path(run).name}: {s['test_psnr']:.2f} dB test")
    ax.set(xlabel="meta-training minutes", ylabel="validation PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [out / "compare.csv", save_figure(fig, out / "compare.png")]


def make_figures(out: str | Path, *, functaset=None, classify_run=None, baseline_run=None, sweep=None,
                 compare=None) -> list[Path]:
    out, paths = Path(out), []
    if functaset:
        paths += plot_histograms(functaset, out)
    if classify_run or baseline_run:
        paths.append(plot_learning_curves(classify_run, baseline_run, out))
    if sweep:
        paths += plot_sweep(sweep, out)
        paths += [plot_psnr_curve(r, out) for r in sweep]
    if compare:
        paths += plot_compare(compare, out)
    return paths
