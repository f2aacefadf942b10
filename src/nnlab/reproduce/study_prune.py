"""ViT pruning (P-ViT, AP-ViT, CP-ViT and token merging) in ``nnlab reproduce``.

Stages: ``prune-base`` trains the base ViT with the engine (resumable), ``prune-sweep`` prunes it with
every method at every ratio and measures top-1/top-5, GFLOPs and images/s
(:func:`nnlab.prune.sweep.run_prune_sweep`, resumable row by row); its table is the seed's Table 1.

In the ``cpu`` preset, when the published CIFAR-10 base model is present (``docs/results/vit-cifar/base``
under the working directory, with ``config.yaml`` and ``model.safetensors``), ``prune-base`` uses it
as it is (no training) and the sweep runs on CIFAR-10 at the nine ratios, starting from the rows of the
published sweep (``docs/results/vit-cifar/sweep``) when they are of the same model and settings, so that
only missing rows are computed; otherwise the MNIST stand-in is trained as in the ``quick`` preset.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from nnlab.report import Section, write_csv
from nnlab.reproduce.common import check_preset, data_dir_for, pct, work_dir
from nnlab.reproduce.stages import Stage, StageContext, StageResult

METHODS = ("p-vit", "ap-vit", "cp-vit", "tome")
NAMES = {"p-vit": "P-ViT", "ap-vit": "AP-ViT", "cp-vit": "CP-ViT", "tome": "ToMe"}
SEED_METHODS = ("p-vit", "ap-vit", "cp-vit")  # the seed report has no token-merging numbers

SECTION = Section(
    "prune", "ViT pruning: P-ViT, AP-ViT, CP-ViT and token merging",
    "A ViT is trained, then pruned by each method at each ratio without fine-tuning, and every "
    "pruned model is measured: top-1/top-5, GFLOPs (multiply-accumulates) per image and images/s "
    "on this machine (batch 64). Token methods remove or merge patch tokens; P-ViT removes "
    "attention and MLP dimensions and builds a smaller dense ViT, so the speed-ups are real.",
    headline=[("base_top1", "unpruned ViT, test top-1 (%)", "base_top1", 100.0),
              *[(f"{m}_top1_r{r:g}", f"{NAMES[m]} at ratio {r:g}, test top-1 (%)",
                 f"{m}_top1_r{r:g}" if m in SEED_METHODS else None, 100.0) for r in (0.5, 0.9) for m in METHODS],
              *[(f"{m}_speedup_r0.5", f"{NAMES[m]} at ratio 0.5, images/s vs unpruned (x)", None, 1.0)
                for m in METHODS]])

# Base-model training (TrainConfig fields) per preset. The seed fine-tunes ViT-B/16 (ImageNet-21k)
# on CIFAR-10 at 224 px; that needs Google's ViT-B_16.npz and a GPU (configs/vit-b16-finetune.yaml).
BASE: dict[str, dict[str, Any]] = {
    "quick": dict(model="vit-mnist", data="mnist-5k", epochs=8, batch_size=64, eval_batch_size=500,
                  optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="cosine", warmup_steps=60,
                  label_smoothing=0.1, grad_clip=1.0),
    "cpu": dict(model="vit-mnist", data="mnist", epochs=2, batch_size=64, eval_batch_size=500,
                optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine", warmup_steps=300,
                label_smoothing=0.1, grad_clip=1.0),
    "paper": dict(model="vit-small-cifar", model_options={"drop_path": 0.1}, data="cifar10", epochs=200,
                  batch_size=128, eval_batch_size=500, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                  schedule="cosine", warmup_steps=1955, label_smoothing=0.1, grad_clip=1.0, augment=True,
                  flip=True, eval_every=5),
}
RATIOS = [round(0.1 * i, 1) for i in range(1, 10)]
PUBLISHED_BASE = Path("docs/results/vit-cifar/base")  # the CIFAR-10 base model, as `nnlab publish` left it
PUBLISHED_SWEEP = Path("docs/results/vit-cifar/sweep")  # its sweep (configs/prune-cifar.yaml)
SWEEP_ROWS = ("sweep.json", "results.csv", "apvit_thresholds.csv")  # what a sweep folder's finished rows are
# the sweep on the published CIFAR-10 model: the settings of configs/prune-cifar.yaml (a test checks it),
# so that the published sweep's folder (docs/results/vit-cifar/sweep) also serves this stage, row for row
CIFAR_SWEEP: dict[str, Any] = dict(ratios=RATIOS, pvit=dict(gate_epochs=1, train_limit=10_000, finetune_epochs=1),
                                   apvit=dict(joint_epochs=1, joint_train_limit=10_000))
# Sweep settings (nnlab.prune.sweep.PruneSweepConfig fields; pvit/apvit: their option dataclasses).
SWEEP: dict[str, dict[str, Any]] = {
    "quick": dict(ratios=[0.3, 0.5, 0.7, 0.9], test_limit=500, calib_size=256, timing_repeats=5,
                  pvit=dict(gate_epochs=1, train_limit=2000), apvit=dict(epochs=10, candidates=8)),
    "cpu": dict(ratios=RATIOS, pvit=dict(gate_epochs=1, train_limit=10_000)),
    "paper": dict(ratios=RATIOS),
}


def _schedule(base: dict[str, Any]) -> str:
    """How the base run config ``base`` trained: "from scratch for 56 epochs", or for a run that started from
    another run's weights (``init_from``) "for 2 epochs from the weights of DIR (56 epochs from scratch)", the
    earlier run's epochs read from its config.yaml where it is readable (one step back)."""
    from nnlab.engine.runs import RunDir
    from nnlab.errors import CheckpointError

    epochs, init = base.get("epochs"), base.get("init_from")
    if not init:
        return f"from scratch for {epochs} epochs"
    here = f"for {epochs} epochs from the weights of {init}"
    try:
        before = RunDir(init, create=False).load_config()
    except CheckpointError:  # not a run folder here (a .safetensors file, or moved): name it only
        return here
    if not before.get("epochs"):
        return here
    return f"{here} ({before['epochs']} epochs{'' if before.get('init_from') else ' from scratch'})"


def notes_for(base: dict[str, Any], sweep: dict[str, Any]) -> list[str]:
    """One sentence per difference from the seed's set-up (ViT-B/16 fine-tuned on CIFAR-10, 224 px)."""
    from nnlab.prune.methods import CPViTOptions, PViTOptions

    notes = []
    if base["data"] in ("mnist-5k", "mnist"):
        what = "the embedded mnist-5k digits (4,000 train / 1,000 test)" if base["data"] == "mnist-5k" \
            else "full MNIST"
        notes.append(f"Data: {what} as a stand-in for CIFAR-10, so accuracies are not comparable with "
                     "the seed's.")
    if base["model"] != "vit-b16":
        notes.append(f"Model: {base['model']} trained {_schedule(base)} instead of ViT-B/16 pre-trained on "
                     "ImageNet-21k and fine-tuned at 224 px (Google's weights cannot be downloaded here).")
    if base.get("distill_from"):
        t = base.get("distill_temperature") or 0
        how = f"soft targets at T = {t:g}" if t else "hard teacher labels"
        notes.append(f"Training: distilled ({how}, weight {base.get('distill_alpha', 0.5):g}) from the teacher "
                     f"model of the run {base['distill_from']}, not trained on the labels alone.")
    if sweep.get("test_limit"):
        notes.append(f"Evaluation: the first {sweep['test_limit']:,} test images.")
    if sweep["ratios"] != RATIOS:
        notes.append(f"Ratios: {', '.join(f'{r:g}' for r in sweep['ratios'])} instead of 0.1 to 0.9.")
    pvit = PViTOptions(**sweep.get("pvit", {}))
    if pvit.train_limit:
        tune = pvit.finetune_epochs
        notes.append(f"P-ViT: gates trained for {pvit.gate_epochs} epoch(s) on "
                     f"{pvit.train_limit:,} training images, "
                     + (f"{tune} epoch(s) of fine-tuning after slimming (VTP's third stage)." if tune else
                        "no fine-tuning after slimming."))
    cpvit = CPViTOptions(**sweep.get("cpvit", {}))
    if cpvit.heads:
        notes.append(f"CP-ViT: heads pruned as well, towards {cpvit.head_share:g} x the patch ratio "
                     "(heads picked per model from calibration images, not per image; heads_kept in cost.csv).")
    return notes


def _train_base(ctx: StageContext) -> StageResult:
    from nnlab.engine.train import TrainConfig, train

    c = dict(ctx.config["train"])
    cfg = TrainConfig(**c, data_dir=data_dir_for(ctx, c["data"]), checkpoint_every=200)
    s = train(cfg, work_dir(ctx, "run"), resume=ctx.resume).summary
    return StageResult(metrics={"base_train_test_top1": s["test_top1"]})


def sweep_config(settings: dict[str, Any], checkpoint: str | Path, out: str | Path, data_dir: str | None):
    """A :class:`~nnlab.prune.sweep.PruneSweepConfig` of the report's methods from a preset's
    ``settings`` (SWEEP / CIFAR_SWEEP: sweep fields, with pvit / apvit / cpvit option dicts)."""
    from nnlab.prune.methods import APViTOptions, CPViTOptions, PViTOptions
    from nnlab.prune.sweep import PruneSweepConfig

    c = dict(settings)
    pvit, apvit = PViTOptions(**c.pop("pvit", {})), APViTOptions(**c.pop("apvit", {}))
    cpvit = CPViTOptions(**c.pop("cpvit", {}))
    return PruneSweepConfig(checkpoint=str(checkpoint), out=str(out), methods=list(METHODS), pvit=pvit, apvit=apvit,
                            cpvit=cpvit, data_dir=data_dir, **c)


def _sweep_config(ctx: StageContext):
    run = ctx.config.get("checkpoint") or ctx.results["prune-base"].dir / "run"
    return sweep_config(ctx.config["sweep"], run, work_dir(ctx, "sweep"), data_dir_for(ctx, ctx.config["data"]))


def _run_sweep(ctx: StageContext):
    """The sweep's rows; a fresh stage of the published model first takes the published sweep's rows,
    which :func:`~nnlab.prune.sweep.run_prune_sweep` accepts only if of the same base and settings."""
    import shutil

    from nnlab.errors import ConfigError
    from nnlab.prune.sweep import run_prune_sweep

    config = _sweep_config(ctx)  # finished rows of an interrupted sweep are kept
    published = Path(ctx.config.get("published_sweep") or "")
    if ctx.resume or not ctx.config.get("published_sweep") or not (published / "sweep.json").is_file():
        return run_prune_sweep(config).rows
    Path(config.out).mkdir(parents=True, exist_ok=True)
    for name in SWEEP_ROWS:
        if (published / name).is_file():
            shutil.copy2(published / name, Path(config.out) / name)
    try:
        return run_prune_sweep(config).rows
    except ConfigError:  # rows of another base model or other settings: sweep from scratch
        shutil.rmtree(config.out)
        return run_prune_sweep(config).rows


def _sweep(ctx: StageContext, notes: tuple[str, ...] = ()) -> StageResult:
    rows = _run_sweep(ctx)
    metrics = sweep_metrics(rows)
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "base"})
    get = {(r["method"], round(r["ratio"], 4)): r for r in rows}
    header = ["ratio", *(f"{NAMES[m]} {k} (%)" for m in METHODS for k in ("top1", "top5"))]
    table = [[r, *(pct(get[(m, round(r, 4))][k]) if (m, round(r, 4)) in get else None
                   for m in METHODS for k in ("top1", "top5"))] for r in ratios]
    write_csv(ctx.dir / "table1.csv", header, table)
    cost = [[r["method"], r["ratio"], round(r["achieved_ratio"], 3), round(r["gflops"], 5),
             round(r["images_per_s"], 1), r.get("heads_kept")] for r in rows]
    write_csv(ctx.dir / "cost.csv", ["method", "ratio", "achieved_ratio", "gflops", "images_per_s", "heads_kept"],
              cost)
    return StageResult(metrics=metrics, tables=["table1.csv", "cost.csv"],
                       figures=["sweep/accuracy_vs_ratio.png", "sweep/accuracy_vs_gflops.png",
                                "sweep/accuracy_vs_throughput.png"],
                       notes=list(notes))


def sweep_metrics(rows: list[dict]) -> dict[str, Any]:
    """Headline figures of the sweep rows (top-1 as fractions, as the sweep writes it)."""
    base = next(r for r in rows if r["method"] == "base")
    out: dict[str, Any] = {"base_top1": base["top1"], "base_images_per_s": base["images_per_s"],
                           "base_gflops": base["gflops"]}
    for r in rows:
        if r["method"] != "base":
            tag = f"{r['method']}_{{}}_r{r['ratio']:g}"
            out[tag.format("top1")] = r["top1"]
            out[tag.format("speedup")] = r["images_per_s"] / base["images_per_s"]
    return out


def published_base(root: Path | None = None) -> Path | None:
    """The published CIFAR-10 base model's folder under ``root`` (default: the working directory),
    or None when it is not there."""
    path = root / PUBLISHED_BASE if root else PUBLISHED_BASE  # relative: a stage's key must not hold the clone's place
    return path if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file() else None


def _use_published(ctx: StageContext) -> StageResult:
    from nnlab.engine.io import read_json

    summary = read_json(Path(ctx.config["checkpoint"]) / "summary.json")
    return StageResult(metrics={"base_train_test_top1": summary["test_top1"]},
                       notes=[f"Base model: the published {ctx.config['model']} in {ctx.config['checkpoint']} "
                              "(trained on CPU, not retrained here)."])


def _published_stages(path: Path) -> list[Stage]:
    """prune-base reads the published model (keyed by its weights' SHA-256); the sweep prunes it."""
    import yaml

    from nnlab.engine.checkpoint import sha256

    cfg = yaml.safe_load((path / "config.yaml").read_text())
    base = {"model": cfg["model"], "data": cfg["data"], "epochs": cfg.get("epochs"),
            **{k: cfg[k] for k in ("distill_from", "distill_alpha", "distill_temperature", "init_from") if k in cfg}}
    use = Stage("prune-base", "prune", f"base ViT (the published {cfg['model']} on {cfg['data']})", _use_published,
                {"checkpoint": str(path), "model": cfg["model"], "sha256": sha256(path / "model.safetensors")})
    published = path.parent / PUBLISHED_SWEEP.name
    prune = Stage("prune-sweep", "prune", "pruning sweep: methods x ratios (Table 1) and throughput",
                  partial(_sweep, notes=tuple(notes_for(base, CIFAR_SWEEP))),
                  {"base": use.key(), "sweep": CIFAR_SWEEP, "data": cfg["data"], "checkpoint": str(path),
                   "published_sweep": str(published) if (published / "sweep.json").is_file() else None},
                  needs=("prune-base",))
    return [use, prune]


def stages(preset: str) -> list[Stage]:
    """The ViT pruning study's stages for ``preset`` (quick, cpu, paper; none in cpu-full)."""
    if check_preset(preset) == "cpu-full":
        return []
    if preset == "cpu" and (path := published_base()) is not None:
        return _published_stages(path)
    base, sweep = BASE[preset], SWEEP[preset]
    train = Stage("prune-base", "prune", f"base ViT ({base['model']} on {base['data']})", _train_base,
                  {"train": base})
    prune = Stage("prune-sweep", "prune", "pruning sweep: methods x ratios (Table 1) and throughput",
                  partial(_sweep, notes=tuple(notes_for(base, sweep))),
                  {"base": train.key(), "sweep": sweep, "data": base["data"]}, needs=("prune-base",))
    return [train, prune]
