"""Functa (Dupont et al. 2022) in ``nnlab reproduce``.

Stages: a latent-size sweep of meta-trained SIRENs (``functa-latent-<D>``, one resumable
:func:`nnlab.functa.trainer.train_functa` run each; the main run is the one at the preset's main
latent size), reconstructions at several output sizes (``functa-reconstruct``), functasets of both
splits (``functa-fit``, resumable chunk by chunk), the MLP classifier on the latents
(``functa-classify``), the ResNet-18 CD-PreAct pixel baseline on the same split
(``functa-pixels``) and the figures (``functa-figures``: PSNR and inner-MSE histograms, latent
sweep, learning curves).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from nnlab.report import Section, write_csv
from nnlab.reproduce.functa_generate import HEADLINE as GENERATE_HEADLINE
from nnlab.reproduce.functa_generate import generate_stages
from nnlab.reproduce.common import check_preset, data_dir_for, work_dir
from nnlab.reproduce.stages import Stage, StageContext, StageResult

SECTION = Section(
    "functa", "Functa: images as latent-modulated SIRENs (Dupont et al. 2022)",
    "A shared SIREN is meta-learned so that 3 gradient steps on a per-image latent (shift "
    "modulations) fit each image; the latents of a whole split form a functaset, on which an MLP "
    "classifier is trained and compared with a ResNet-18 CD-PreAct trained on the pixels of the "
    "same split. PSNR is the mean per-image PSNR on the test split (data in [0, 1]).",
    headline=[("mnist_test_psnr", "test PSNR after 3 inner steps, main latent size (dB)", "mnist_test_psnr", 1.0),
              ("test_mse", "test MSE after the inner steps, main latent size", None, 1.0),
              ("functaset_test_psnr", "test functaset mean PSNR (dB)", None, 1.0),
              ("fit_images_per_s", "functaset fitting, both splits, images per second of fitting (no data loading)",
               None, 1.0),
              ("functa_mlp_top1", "MLP on functa latents, test top-1 (%)", "functa_mlp_top1", 100.0),
              ("pixel_resnet_top1", "ResNet-18 CD-PreAct on pixels, test top-1 (%)", None, 100.0),
              ("celeba64_test_psnr", "CelebA (aligned, 64x64) test PSNR, latent 256 (dB)", None, 1.0),
              ("celeba64_psnr_latent_64", "CelebA (aligned, 64x64) test PSNR, latent 64 (dB)", None, 1.0),
              ("pixel_lenet_top1", "LeNet-5 on pixels (quick stand-in for the ResNet), test top-1 (%)", None,
               100.0), *GENERATE_HEADLINE])

# Generators of the cpu (and paper) preset: time-limited, as measured in BENCHMARKS.md.
GENERATE_CPU = dict(mnist=[dict(model="diffusion", time_limit_min=20.0, steps=1_000_000),
                           dict(model="diffusion", conditional=True, time_limit_min=20.0, steps=1_000_000),
                           dict(model="flow", time_limit_min=15.0, steps=1_000_000)],
                    faces=[dict(model="diffusion", time_limit_min=20.0, steps=1_000_000, samples=5000)])

# The 60-minute CelebA run of issue 17 (22.08 dB), as `nnlab publish` left it: the cpu preset's main faces
# stage uses it as it is when it is there (relative to the working directory, as the published ViT)
PUBLISHED_FACES = "docs/results/functa-celeba/l256-60min-s14"

# Per preset: data set, functa preset, main latent size, latent sweep, meta-training overrides,
# functaset chunk size, classifier settings, pixel-baseline epochs, reconstruction sizes.
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(data="mnist-5k", preset="mnist-cpu", main=256, latents=[64, 256, 1024],
                  train=dict(steps=100, val_images=200, val_every=50, log_every=10, ckpt_every=20),
                  chunk=500, classify=dict(hidden=[512, 512], epochs=30), pixel_epochs=10,
                  pixel_options=dict(model="lenet5"), sizes=[28, 64, 128],
                  generate=dict(mnist=[dict(model="diffusion", conditional=True, steps=400, width=256, blocks=2,
                                            samples=1000, sample_steps=50, feature_epochs=3)])),
    "cpu": dict(data="mnist", preset="mnist-cpu", main=256, latents=[64, 128, 256, 512, 1024],
                train=dict(time_limit_min=30.0), sweep_train=dict(time_limit_min=10.0), chunk=1000,
                classify=dict(), pixel_epochs=1, pixel_options=dict(), sizes=[28, 64, 128],
                faces=dict(preset="celeba64-cpu", latents=[64, 256], main=256, train=dict(time_limit_min=15.0),
                           main_train=dict(time_limit_min=60.0, schedule="cosine"), published=PUBLISHED_FACES),
                generate=GENERATE_CPU),
    "paper": dict(data="mnist", preset="mnist-seed", main=512, latents=[64, 128, 256, 512, 1024],
                  train=dict(), chunk=1000, classify=dict(), pixel_epochs=30, pixel_options=dict(),
                  sizes=[28, 64, 128],
                  faces=dict(preset="celeba64-paper", latents=[64, 128, 256, 512, 1024], main=256, train=dict()),
                  generate=GENERATE_CPU),
}
SEED_STEPS = 100_000  # mnist-seed: the seed's meta-training length (batch 4)


def notes_for(s: dict[str, Any]) -> list[str]:
    """One sentence per difference from the seed's set-up (full MNIST, 15x512 SIREN, latent 512)."""
    notes = []
    if s["data"] == "mnist-5k":
        notes.append("Data: the embedded mnist-5k digits (3,800 train images for meta-training, 200 held "
                     "out for validation, 1,000 test) instead of full MNIST.")
    if s["preset"] != "mnist-seed":
        notes.append("Model: the mnist-cpu SIREN (width 64, 3 sine layers, Meta-SGD) instead of the seed's "
                     "15 layers of 512 (mnist-seed).")
    if s["main"] != 512:
        notes.append(f"Latent: main latent size {s['main']} instead of the seed's 512.")
    t = s["train"]
    if "steps" in t:
        notes.append(f"Schedule: {t['steps']} meta-training steps per latent size instead of days of GPU "
                     "training.")
    elif "time_limit_min" in t:
        sweep = s.get("sweep_train", t).get("time_limit_min", t["time_limit_min"])
        notes.append(f"Schedule: at most {t['time_limit_min']:g} minutes of meta-training for the main latent "
                     f"size and {sweep:g} for each other size, on 2 CPU cores, instead of days of GPU training.")
    return notes


def _train(ctx: StageContext) -> StageResult:
    from nnlab.functa.presets import get_preset
    from nnlab.functa.trainer import train_functa

    c = ctx.config
    preset = get_preset(c["preset"], latent_dim=c["latent"], **c["train"])
    s = train_functa(preset, c["data"], work_dir(ctx, "run"), data_dir=data_dir_for(ctx, c["data"]),
                     resume=ctx.resume)
    metrics = {f"psnr_latent_{c['latent']}": s["test_psnr"]}
    if c["main"]:
        metrics.update(mnist_test_psnr=s["test_psnr"], test_mse=s["test_mse"])
    return StageResult(metrics=metrics)


def _reconstruct(ctx: StageContext) -> StageResult:
    """Originals over reconstructions of one test image per class (the first 10 classes), per size."""
    from nnlab.data import load_dataset
    from nnlab.functa.reconstruct import load_model, load_train_config, reconstruction_grid, save_grid

    c = ctx.config
    run = ctx.results[c["run"]].dir / "run"
    model, steps = load_model(run), int(load_train_config(run).get("inner_steps", 3))
    test = load_dataset(c["data"], data_dir_for(ctx, c["data"])).test
    labels = test.labels.tolist()
    pick = [labels.index(k) for k in sorted(set(labels))[:10]] if min(labels) >= 0 else list(range(10))
    images = test.images[pick]  # (n, C, H, W) uint8
    out = work_dir(ctx, "figures")
    paths = [save_grid(reconstruction_grid(model, images, size, steps), out / f"reconstruction-{size}.png")
             for size in c["sizes"]]
    return StageResult(figures=[Path(p).relative_to(ctx.dir).as_posix() for p in paths])


def _fit(ctx: StageContext) -> StageResult:
    from nnlab.functa.functaset import fit_split, load_functaset

    c = ctx.config
    run = ctx.results[c["run"]].dir / "run"
    out = work_dir(ctx, "functasets")
    for split in ("train", "test"):  # finished chunks of an interrupted fit are kept and skipped
        fit_split(run, c["data"], split, out / f"{split}.safetensors", data_dir=data_dir_for(ctx, c["data"]),
                  chunk_size=c["chunk"])
    sets = {split: load_functaset(out / f"{split}.safetensors") for split in ("train", "test")}
    count = sum(len(fs.labels) for fs in sets.values())
    # the chunks' own fitting seconds (data loading excluded), whichever attempt fitted them
    seconds = sum(float(fs.metadata["fit_seconds"]) for fs in sets.values())
    return StageResult(metrics={"functaset_test_psnr": float(sets["test"].psnr.mean()),
                                "fit_images_per_s": count / seconds})


def _classify(ctx: StageContext) -> StageResult:
    from dataclasses import replace

    from nnlab.functa.classify import ClassifyConfig, train_classifier

    sets = ctx.results["functa-fit"].dir / "functasets"
    c = ctx.config["classify"]
    s = train_classifier(sets / "train.safetensors", sets / "test.safetensors", work_dir(ctx, "run"),
                         replace(ClassifyConfig(), **c), resume=ctx.resume)
    notes = [f"Classifier: MLP with hidden widths {c['hidden']} for {c.get('epochs', 30)} epochs instead "
             "of 3 x 1024."] if c.get("hidden") else []
    return StageResult(metrics={"functa_mlp_top1": s["test_top1"]}, notes=notes)


def _pixels(ctx: StageContext) -> StageResult:
    from nnlab.config import from_dict
    from nnlab.engine.runs import RunDir
    from nnlab.engine.train import TrainConfig, train
    from nnlab.functa.classify import pixel_baseline

    c, run = ctx.config, work_dir(ctx, "run")
    options = dict(c["options"])
    if ctx.resume and (run / "config.yaml").is_file():  # continue the killed run from its checkpoint
        s = train(from_dict(TrainConfig, RunDir(run, create=False).load_config()), run, resume=True).summary
    elif options.get("model") == "lenet5":  # the quick preset's stand-in
        s = train(TrainConfig(data=c["data"], epochs=c["epochs"], batch_size=128, optimizer="sgd", lr=0.1,
                              warmup_steps=32, **options), run).summary
    else:
        s = pixel_baseline(c["data"], run, data_dir=data_dir_for(ctx, c["data"]), epochs=c["epochs"],
                           checkpoint_every=200, **options)
    if options.get("model") == "lenet5":
        return StageResult(metrics={"pixel_lenet_top1": s["test_top1"]}, notes=[
            f"Pixel baseline: LeNet-5 ({c['epochs']} epochs) stands in for ResNet-18 CD-PreAct, which is too "
            "slow for this preset; the learning-curve figure shows the latent MLP only."])
    return StageResult(metrics={"pixel_resnet_top1": s["test_top1"]}, notes=[pixel_note(c["epochs"])])


def pixel_note(epochs: int) -> str:
    return (f"Pixel baseline: ResNet-18 CD-PreAct trained for {epochs} epoch{'s' if epochs != 1 else ''} "
            "(SGD, lr 0.05 with a cosine schedule, weight decay 5e-4, batch 128) on the same training images "
            "as the functaset.")


def _figures(ctx: StageContext, latent_stages: tuple[str, ...] = ()) -> StageResult:
    from nnlab.functa.plots import plot_histograms, plot_learning_curves, plot_psnr_curve, plot_sweep

    out = work_dir(ctx, "figures")
    sets = ctx.results["functa-fit"].dir / "functasets"
    runs = [ctx.results[n].dir / "run" for n in latent_stages]
    paths = plot_histograms(sets / "test.safetensors", out)
    pixels = None if ctx.config["pixel_stand_in"] else ctx.results["functa-pixels"].dir / "run"
    paths.append(plot_learning_curves(ctx.results["functa-classify"].dir / "run", pixels, out))
    sweep = plot_sweep(runs, out)
    main_run = ctx.results[ctx.config["main"]].dir / "run"
    paths += [p for p in sweep if p.suffix == ".png"] + [plot_psnr_curve(main_run, out)]
    write_csv(ctx.dir / "latent_sweep.csv", *_sweep_rows(runs))
    return StageResult(figures=[Path(p).relative_to(ctx.dir).as_posix() for p in paths],
                       tables=["latent_sweep.csv"])


def _sweep_rows(runs: list[Path]) -> tuple[list[str], list[list[Any]]]:
    from nnlab.engine.io import read_json

    rows = []
    for run in runs:
        s = read_json(run / "summary.json")
        rows.append([s["latent_dim"], round(s["test_psnr"], 2), round(s["test_mse"], 5), s["steps"],
                     round(s["train_minutes"], 2)])
    return ["latent_dim", "test_psnr_db", "test_mse", "steps", "train_minutes"], sorted(rows)


def stages(preset: str) -> list[Stage]:
    """The functa study's stages for ``preset`` (quick, cpu, paper; none in cpu-full)."""
    if check_preset(preset) == "cpu-full":
        return []
    s = SETTINGS[preset]
    base = {"data": s["data"], "preset": s["preset"], "train": s["train"]}
    latent = [Stage(f"functa-latent-{d}", "functa", f"meta-train the SIREN, latent {d}"
                    + (" (main run)" if d == s["main"] else ""),
                    partial(_with_notes, _train, tuple(notes_for(s)) if d == s["main"] else ()),
                    {**base, "latent": d, "main": d == s["main"],
                     **({} if d == s["main"] else {"train": s.get("sweep_train", s["train"])})})
              for d in s["latents"]]
    main = next(st for st in latent if st.config["main"])
    data = {"data": s["data"], "run": main.name, "main_key": main.key()}
    recon = Stage("functa-reconstruct", "functa", "reconstructions at several sizes", _reconstruct,
                  {**data, "sizes": s["sizes"]}, needs=(main.name,))
    fit = Stage("functa-fit", "functa", "functasets of the train and test splits", _fit,
                {**data, "chunk": s["chunk"]}, needs=(main.name,))
    clf = Stage("functa-classify", "functa", "MLP classifier on the latents", _classify,
                {"fit": fit.key(), "classify": s["classify"]}, needs=("functa-fit",))
    pixel_model = "LeNet-5" if s["pixel_options"].get("model") == "lenet5" else "ResNet-18 CD-PreAct"
    pix = Stage("functa-pixels", "functa", f"{pixel_model} on the pixels of the same split", _pixels,
                {"data": s["data"], "epochs": s["pixel_epochs"], "options": s["pixel_options"]})
    names = tuple(st.name for st in latent)
    figs = Stage("functa-figures", "functa", "PSNR / inner-MSE histograms, latent sweep, learning curves",
                 partial(_figures, latent_stages=names),
                 {"main": main.name, "keys": [st.key() for st in (*latent, fit, clf, pix)],
                  "pixel_stand_in": s["pixel_options"].get("model") == "lenet5"},
                 needs=(*names, "functa-fit", "functa-classify", "functa-pixels"))
    # The time-limited stages (meta-training) first, so that a run can hand the epoch-limited rest to
    # parallel processes (``--only``) without starving a time budget.
    faces = _face_stages(s.get("faces"))
    faces_main = next((st.name for st in faces if st.config["main"]), None)
    gen = generate_stages(s.get("generate"), main.name, faces_main, s["data"])
    return [*latent, *faces, recon, fit, clf, pix, figs, *gen]


def _face_stages(f: dict[str, Any] | None) -> list[Stage]:
    """One CelebA stage per latent size (``functa-faces-<D>``); none when the preset has no faces. The main
    one trains for ``main_train`` if given, and uses the ``published`` run instead when it matches."""
    from nnlab.engine.checkpoint import sha256

    if not f:
        return []
    out = []
    for d in f["latents"]:
        main = d == f["main"]
        train = f.get("main_train", f["train"]) if main else f["train"]
        config = {"data": "celeba64", "preset": f["preset"], "latent": d, "main": main, "train": train}
        published = published_faces(f.get("published"), f["preset"], d, train) if main else None
        if published is not None:
            config = {**config, "published": published, "sha256": sha256(Path(published) / "model.safetensors")}
        out.append(Stage(f"functa-faces-{d}", "functa", f"faces: CelebA (aligned, 64x64), {f['preset']}, latent {d}"
                         + (" (the published run)" if published else ""),
                         _faces_published if published else _faces, config))
    return out


def published_faces(path: str | None, preset: str, latent: int, train: dict[str, Any]) -> str | None:
    """``path`` when it holds a published CelebA run of ``preset`` at ``latent`` trained with ``train``'s
    settings (config.yaml, summary.json and model.safetensors); else None (the stage then trains)."""
    import yaml

    from nnlab.functa.presets import get_preset

    folder = Path(path) if path else None
    if folder is None or not all((folder / n).is_file() for n in ("config.yaml", "summary.json", "model.safetensors")):
        return None
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    want = get_preset(preset, latent_dim=latent, **train)
    same = cfg.get("data") == "celeba64" and _same(cfg.get("model", {}), want.model) and _same(
        cfg.get("train", {}), want.train, ignore=("log_every", "val_every", "val_images", "ckpt_every", "eval_batch"))
    return str(folder) if same else None


def _same(saved: dict[str, Any], want, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a saved config section (YAML: lists for tuples; fields added since default) is ``want``."""
    import dataclasses
    import json

    for f in dataclasses.fields(want):
        default = f.default if f.default is not dataclasses.MISSING else getattr(want, f.name)
        value = json.loads(json.dumps(getattr(want, f.name)))
        if f.name not in ignore and saved.get(f.name, json.loads(json.dumps(default))) != value:
            return False
    return True


def _faces_published(ctx: StageContext) -> StageResult:
    """The published CelebA run: its weights and config are copied to the stage's ``run/`` (the generative
    stages read them there) and its test faces reconstructed here; the test PSNR is its summary's."""
    import shutil

    from nnlab.engine.io import read_json
    from nnlab.functa.plots import plot_psnr_curve
    from nnlab.functa.reconstruct import reconstruct_run

    c, run = ctx.config, work_dir(ctx, "run")
    run.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "model.safetensors"):
        if (Path(c["published"]) / name).is_file():
            shutil.copy2(Path(c["published"]) / name, run / name)
    s = read_json(run / "summary.json")
    paths = reconstruct_run(run, "celeba64", ctx.dir / "figures", data_dir=data_dir_for(ctx, "celeba64"), count=8,
                            sizes=[64, 128])
    paths.append(plot_psnr_curve(run, ctx.dir / "figures"))  # train / validation PSNR against minutes
    minutes = c["train"].get("time_limit_min")
    metrics = {f"celeba64_psnr_latent_{c['latent']}": s["test_psnr"], "celeba64_test_psnr": s["test_psnr"]}
    return StageResult(metrics=metrics,
                       figures=[Path(p).relative_to(ctx.dir).as_posix() for p in paths],
                       notes=["Faces: CelebA (aligned, 64x64; the first 10,000 images, centre-cropped) stand in "
                              "for CelebA-HQ.",
                              f"Faces, latent {c['latent']}: the published {minutes:g}-minute run in {c['published']} "
                              f"({s['steps']:,} meta-steps on this project's CPU; not retrained here)."])


def _faces(ctx: StageContext) -> StageResult:
    """Meta-train on CelebA (aligned, 64x64; a stand-in for CelebA-HQ) and reconstruct test faces."""
    from nnlab.functa.plots import plot_psnr_curve
    from nnlab.functa.presets import get_preset
    from nnlab.functa.reconstruct import reconstruct_run
    from nnlab.functa.trainer import train_functa

    c, data_dir = ctx.config, data_dir_for(ctx, "celeba64")
    run = work_dir(ctx, "run")
    s = train_functa(get_preset(c["preset"], latent_dim=c["latent"], **c["train"]), "celeba64", run,
                     data_dir=data_dir, resume=ctx.resume)
    paths = reconstruct_run(run, "celeba64", ctx.dir / "figures", data_dir=data_dir, count=8, sizes=[64, 128])
    paths.append(plot_psnr_curve(run, ctx.dir / "figures"))
    metrics = {f"celeba64_psnr_latent_{c['latent']}": s["test_psnr"]}
    if c["main"]:
        metrics["celeba64_test_psnr"] = s["test_psnr"]
    return StageResult(metrics=metrics,
                       figures=[Path(p).relative_to(ctx.dir).as_posix() for p in paths],
                       notes=["Faces: CelebA (aligned, 64x64; the first 10,000 images, centre-cropped) stand in "
                              "for CelebA-HQ."] if c["main"] else [])


def _with_notes(fn, notes: tuple[str, ...], ctx: StageContext) -> StageResult:
    result = fn(ctx)
    result.notes = list(notes) + result.notes
    return result
