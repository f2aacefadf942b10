"""BatchNorm and the optimisation landscape (Santurkar et al. 2018) in ``nnlab reproduce``.

Two stages: ``landscape-sweep`` trains VGG-A with and without BN at each learning rate with landscape
probes (:func:`nnlab.landscape.run_landscape`, resumable pair by pair and mid-pair), and
``landscape-figures`` draws the curves, loss-landscape, gradient-predictiveness and beta figures from
the sweep's files (:func:`nnlab.landscape.plots.make_figures`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from nnlab.report import Section, write_csv
from nnlab.reproduce.common import check_preset, data_dir_for, pct, work_dir
from nnlab.reproduce.stages import Stage, StageContext, StageResult

SECTION = Section(
    "landscape", "BatchNorm and the optimisation landscape (VGG-A, Santurkar et al. 2018)",
    "VGG-A trained with plain SGD (no momentum, constant learning rate) with and without BatchNorm; "
    "every few steps the probes measure the loss and the gradient along the gradient direction at "
    "several step sizes (loss landscape, gradient predictiveness, effective beta-smoothness). "
    "Band medians are taken over the last half of training.",
    headline=[("vgg_a_top1_lr0.1", "VGG-A without BN, test top-1 at lr 0.1 (%)", "vgg_a_top1_lr0.1", 100.0),
              ("vgg_a_bn_top1_lr0.1", "VGG-A with BN, test top-1 at lr 0.1 (%)", "vgg_a_bn_top1_lr0.1", 100.0),
              ("loss_band_off", "loss-landscape band over step sizes, without BN", None, 1.0),
              ("loss_band_on", "loss-landscape band over step sizes, with BN", None, 1.0),
              ("gdist_band_off", "gradient-predictiveness band, without BN", None, 1.0),
              ("gdist_band_on", "gradient-predictiveness band, with BN", None, 1.0),
              ("beta_off", "effective beta-smoothness, without BN", None, 1.0),
              ("beta_on", "effective beta-smoothness, with BN", None, 1.0)])

# LandscapeConfig fields per preset.
QUICK: dict[str, Any] = dict(model="vgg-a", bn="both", data="mnist-5k", lrs=[0.05, 0.1], epochs=3,
                             batch_size=128, every=10, eta_count=4, width=0.25, augment=False,
                             checkpoint_every=20)
PAPER: dict[str, Any] = dict(model="vgg-a", bn="both", data="cifar10", lrs=[0.05, 0.075, 0.1, 0.125, 0.15],
                             epochs=20, batch_size=128, every=30, hessian_every=300, hessian_iters=100)
# cpu-full (issue 14): the seed's Table 3 pair (lr 0.1) at full width, two pairs at once, then the
# Table 4 band at width 0.5 on the full data (the whole band at full width takes about a week of
# both cores: ~2 s per step per pair plus the probes).
CPU_FULL_PAIR: dict[str, Any] = dict(PAPER, lrs=[0.1], jobs=2)
CPU_FULL_BAND: dict[str, Any] = dict(PAPER, width=0.5, jobs=2)


def sweep_settings(preset: str) -> dict[str, Any]:
    """LandscapeConfig fields of ``preset``; ``cpu`` is the landscape study's documented REDUCED_CPU."""
    from nnlab.landscape.sweep import REDUCED_CPU

    return dict({"quick": QUICK, "cpu": REDUCED_CPU, "paper": PAPER, "cpu-full": CPU_FULL_PAIR}[check_preset(preset)])


def notes_for(sweep: dict[str, Any]) -> list[str]:
    """One sentence per difference from the seed's set-up (CIFAR-10, full VGG-A, 20 epochs, 5 lrs)."""
    notes = []
    if sweep["data"] == "mnist-5k":
        notes.append("Data: the embedded mnist-5k digits (4,000 train / 1,000 test, 28x28 grey, no "
                     "augmentation) stand in for CIFAR-10, so accuracies are not comparable with the seed's.")
    if sweep.get("width") not in (None, 1.0):
        notes.append(f"Model: VGG-A at width x{sweep['width']:g} (all conv and hidden widths scaled) "
                     "instead of the full 9.8M-parameter network.")
    if sweep.get("train_subset"):
        notes.append(f"Data: a seeded random subset of {sweep['train_subset']:,} training images "
                     "instead of all 50,000.")
    if sweep["epochs"] != 20:
        notes.append(f"Schedule: {sweep['epochs']} epochs instead of the seed's 20.")
    lrs = sorted(sweep["lrs"])
    if lrs != [0.05, 0.075, 0.1, 0.125, 0.15]:
        notes.append(f"Learning rates: {', '.join(f'{x:g}' for x in lrs)} instead of 0.05 to 0.15 in "
                     "steps of 0.025.")
    return notes


def _run_sweep(ctx: StageContext) -> StageResult:
    from nnlab.landscape.sweep import LandscapeConfig, run_landscape

    sweep = dict(ctx.config["sweep"])
    prefix = ctx.config.get("prefix", "")
    cfg = LandscapeConfig(**sweep, data_dir=data_dir_for(ctx, sweep["data"]))
    result = run_landscape(cfg, work_dir(ctx, "sweep"))  # continues an interrupted sweep on its own
    s = result.summary
    acc = [[r["bn"], r["lr"], pct(r["test_top1"]), pct(r["best_test_top1"]), r["diverged"], r["steps"]]
           for r in s["runs"]]
    write_csv(ctx.dir / "accuracy.csv", ["bn", "lr", "test_top1_pct", "best_test_top1_pct", "diverged", "steps"],
              acc)
    med = s["band_medians"]
    quantities = sorted({q for m in med.values() for q in m})
    write_csv(ctx.dir / "band_medians.csv", ["quantity", *(f"bn_{bn}" for bn in med)],
              [[q, *(med[bn].get(q) for bn in med)] for q in quantities])
    metrics = {f"{prefix}{k}": v for k, v in _metrics(s).items()}
    return StageResult(metrics=metrics, tables=["accuracy.csv", "band_medians.csv"],
                       notes=notes_for(sweep) + plateau_notes(s))


def plateau_notes(summary: dict[str, Any]) -> list[str]:
    """A sentence for each BN setting whose runs all stayed near chance (the initial loss plateau)."""
    notes = []
    for bn, label in (("off", "without"), ("on", "with")):
        best = [r["best_test_top1"] for r in summary["runs"] if r["bn"] == bn and r["best_test_top1"] is not None]
        if best and max(best) < 0.5:
            notes.append(f"Result: VGG-A {label} BN has not left the initial loss plateau in this schedule (best "
                         f"test top-1 {100 * max(best):.1f}%), so its landscape, predictiveness and beta "
                         "figures describe that plateau, not training, and are not comparable with the seed's.")
    return notes


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Headline metrics of a sweep summary (accuracies as fractions, as the sweep stores them)."""
    top1 = summary["top1"]
    out: dict[str, Any] = {}
    for lr in top1.get("off", {}):
        out[f"vgg_a_top1_lr{lr}"] = top1["off"][lr]
    for lr in top1.get("on", {}):
        out[f"vgg_a_bn_top1_lr{lr}"] = top1["on"][lr]
    for bn, m in summary["band_medians"].items():
        out.update({f"loss_band_{bn}": m.get("eta_loss_band"), f"gdist_band_{bn}": m.get("eta_gdist_band"),
                    f"beta_{bn}": m.get("beta_eff"), f"beta_t_{bn}": m.get("beta_t"),
                    f"hess_top_{bn}": m.get("hess_top")})
    return out


def _figures(ctx: StageContext) -> StageResult:
    from nnlab.landscape.plots import make_figures

    sweep_dir = ctx.results[ctx.config.get("stage", "landscape-sweep")].dir / "sweep"
    paths = make_figures(sweep_dir, work_dir(ctx, "figures"), log=ctx.config["log"])
    return StageResult(figures=[Path(p).relative_to(ctx.dir).as_posix() for p in paths])


def _sweep_stages(name: str, figures: str, title: str, sweep: dict[str, Any], prefix: str = "") -> list[Stage]:
    config = {"sweep": sweep, **({"prefix": prefix} if prefix else {})}
    train = Stage(name, "landscape", title, _run_sweep, config)
    figs = Stage(figures, "landscape", f"{title}: landscape, predictiveness and beta figures", _figures,
                 {"sweep": train.key(), "log": True, **({"stage": name} if name != "landscape-sweep" else {})},
                 needs=(name,))
    return [train, figs]


def stages(preset: str) -> list[Stage]:
    """The BN study's stages for ``preset`` (quick, cpu, paper, cpu-full)."""
    if check_preset(preset) == "cpu-full":
        return [*_sweep_stages("landscape-lr0.1", "landscape-lr0.1-figures", "VGG-A with and without BN at lr 0.1 (Table 3)",
                               CPU_FULL_PAIR),
                *_sweep_stages("landscape-band", "landscape-band-figures", "the lr band at width 0.5 (Table 4)",
                               CPU_FULL_BAND, prefix="band_")]
    return _sweep_stages("landscape-sweep", "landscape-figures", "VGG-A with and without BN: lr sweep with landscape probes",
                         sweep_settings(preset))
