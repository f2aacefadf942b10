"""``nnlab functa generate``: train a generator on a functaset, sample, decode, evaluate, draw.

``GEN/`` holds config.yaml (options, input paths, torch thread count), metrics.jsonl, checkpoint/,
model.safetensors (final EMA weights and the latent standardisation), test-functaset.safetensors
(unless one was given), summary.json (see :func:`evaluate`), class_accuracy.csv (conditional
models) and the figures: samples.png, samples-gaussian.png, samples-by-class.png (conditional),
interpolations-<size>.png.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nnlab.engine.metrics import MetricsLogger
from nnlab.engine.runs import RunDir, check_out
from nnlab.errors import ConfigError
from nnlab.functa.functaset import Functaset, fit_functaset, load_functaset
from nnlab.functa.generate import features as F
from nnlab.functa.generate.flow import bits_per_dim
from nnlab.functa.generate.gaussian import GaussianModel
from nnlab.functa.generate.metrics import fid, memorisation, precision_recall
from nnlab.config import from_dict
from nnlab.functa.generate.model import GenerateConfig, Generator, save_generator
from nnlab.functa.generate.plots import decode, interpolation_grid, plot_training, save_tiles
from nnlab.functa.generate.train import ema_generator, resume_or_new, train
from nnlab.functa.model import config_hash
from nnlab.report import write_csv


def _check_resume(cfg: GenerateConfig, run: RunDir, resume: bool) -> None:
    has_config = (run.path / "config.yaml").is_file()
    if not resume:
        if (run.checkpoint_dir / "latest.json").is_file():
            raise ConfigError(f"{run.path} already holds a generator run; pass --resume to continue it, "
                              "or choose a new --out")
        return
    if not has_config:
        return
    old = from_dict(GenerateConfig, run.load_config().get("generate", {}))
    changed = [k for k, v in asdict(cfg).items() if k not in GenerateConfig.EVAL_FIELDS and getattr(old, k) != v]
    if changed:
        raise ConfigError(f"--resume with changed option(s) {', '.join(changed)} (the run in {run.path} used "
                          f"{', '.join(f'{k}={getattr(old, k)}' for k in changed)}); drop them or use a new --out")


def _inputs(run_path: Path, functaset: Path, data: str | None):
    from nnlab.functa.reconstruct import load_model

    siren = load_model(run_path)
    fs = load_functaset(functaset)
    if fs.metadata.get("model_hash") not in (None, config_hash(siren)):
        raise ConfigError(f"functaset {functaset} was fitted by another model than run {run_path}; "
                          f"fit it with 'nnlab functa fit {run_path} ...'")
    data = data or fs.metadata.get("data")
    if not data:
        raise ConfigError(f"functaset {functaset} does not name its data set; pass --data")
    return siren, fs, data


def _test_functaset(siren, splits, path: Path | None, out: Path, steps: int) -> Functaset:
    if path is not None:
        fs = load_functaset(path)
        if fs.metadata.get("model_hash") not in (None, config_hash(siren)):
            raise ConfigError(f"--test-functaset {path} was fitted by another model; fit the test split with "
                              "the same functa run")
        return fs
    target = out / "test-functaset.safetensors"
    if not target.is_file():
        fit_functaset(siren, splits.test.images, splits.test.labels, target, steps=steps)
    return load_functaset(target)


def generate(run: str | Path, functaset: str | Path, out: str | Path, config: GenerateConfig = GenerateConfig(), *,
             data: str | None = None, data_dir: str | Path | None = None, test_functaset: str | Path | None = None,
             feature_net: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config.model`` on the train functaset of functa run ``run``; evaluate; write ``out``
    (inputs are checked before ``out`` is created; it is locked while written)."""
    from nnlab.data import load_dataset
    from nnlab.engine.runs import folder_lock

    out = Path(out)
    check_out(out)
    siren, fs, data = _inputs(Path(run), Path(functaset), data)
    num_classes = _num_classes(fs, config)
    splits = load_dataset(data, data_dir)
    if splits.shape[0] != siren.config.out_channels:
        raise ConfigError(f"data set {data} has {splits.shape[0]} channel(s) but run {run} renders "
                          f"{siren.config.out_channels}; pass the --data the functa run was trained on")
    with folder_lock(out):
        rd = RunDir(out)
        _check_resume(config, rd, resume)
        rd.save_config({"generate": asdict(config), "run": str(run), "run_relative": os.path.relpath(run, out),
                        "functaset": str(functaset), "data": data, "data_dir": str(data_dir) if data_dir else None,
                        "image_size": splits.shape[1], "torch_threads": torch.get_num_threads()})
        state = resume_or_new(config, fs.latents, num_classes, rd, resume)
        with MetricsLogger(rd.metrics_path, resume_step=state.step if resume else None) as log:
            train(state, state.gen.norm(fs.latents), fs.labels if num_classes else None, rd, log, progress)
        return _finish(state, siren, splits, fs, Path(run), out, rd, config, test_functaset, feature_net,
                       data, progress)


def _finish(state, siren, splits, fs, run: Path, out: Path, rd: RunDir, config: GenerateConfig,
            test_functaset, feature_net, data: str, progress: bool) -> dict:
    """Save the EMA generator, evaluate it against the test functaset, write the summary."""
    from nnlab.functa.reconstruct import load_train_config

    gen = ema_generator(state)
    save_generator(gen, out / "model.safetensors")
    steps = int(load_train_config(run).get("inner_steps", 3))
    test_fs = _test_functaset(siren, splits, Path(test_functaset) if test_functaset else None, out, steps)
    fnet = F.feature_net(splits, data, epochs=config.feature_epochs, path=feature_net, progress=progress)
    summary = evaluate(gen, siren, splits, fnet, fs, test_fs, out)
    summary |= {"steps": state.step, "train_minutes": state.elapsed / 60, "data": data}
    rd.write_summary(summary)
    return summary


def _num_classes(fs: Functaset, config: GenerateConfig) -> int:
    if not config.conditional:
        return 0
    if len(fs.labels) == 0 or (fs.labels < 0).any():
        raise ConfigError("--conditional needs a labelled functaset; this data set has no labels")
    return int(fs.labels.max()) + 1


def _timed_sample(gen: Generator, n: int, seed: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    lat = gen.sample(n, seed=seed)
    return lat, n / max(time.perf_counter() - t0, 1e-9)


def evaluate(gen: Generator, siren, splits, fnet: F.FeatureNet, train_fs: Functaset, test_fs: Functaset,
             out: Path) -> dict:
    """FID, precision/recall and memorisation of ``config.samples`` samples, beside the gaussian
    baseline and the test reconstructions (the SIREN's ceiling); flow bits/dim; class accuracy."""
    cfg, size = gen.config, splits.shape[1]
    real, _ = F.embed(fnet, splits.test.images)
    lat, per_s = _timed_sample(gen, cfg.samples, cfg.seed)
    feats, preds = F.embed(fnet, decode(siren, lat, size))
    gauss = GaussianModel(gen.dim).fit(gen.norm(train_fs.latents))
    g_lat = gauss.sample(cfg.samples, torch.Generator().manual_seed(cfg.seed)) * gen.norm.std + gen.norm.mean
    g_feats, _ = F.embed(fnet, decode(siren, g_lat, size))
    rec_feats, _ = F.embed(fnet, decode(siren, test_fs.latents, size))
    pr, g_pr = precision_recall(real, feats), precision_recall(real, g_feats)
    mem = memorisation(gen.norm(lat), gen.norm(train_fs.latents), gen.norm(test_fs.latents))
    s = {"fid": fid(real, feats), "fid_gaussian": fid(real, g_feats), "fid_reconstruction": fid(real, rec_feats),
         "fid_label": fnet.label, "precision": pr.precision, "recall": pr.recall,
         "precision_gaussian": g_pr.precision, "recall_gaussian": g_pr.recall, "knn_k": pr.k,
         "num_samples": cfg.samples, "num_reference": len(real), "reference": "test split pixels",
         "feature_net": {"kind": fnet.kind, "task": fnet.task, "test_accuracy": fnet.accuracy},
         "model": cfg.model, "conditional": gen.num_classes > 0, "sample_latents_per_s": per_s,
         "memorisation": vars(mem)}
    s["fid_ratio_to_gaussian"] = s["fid"] / max(s["fid_gaussian"], 1e-12)
    if cfg.model == "diffusion":
        s |= {"sampler": cfg.sampler, "sample_steps": cfg.sample_steps if cfg.sampler == "ddim" else cfg.timesteps,
              "guidance": cfg.guidance if gen.num_classes else 0.0}
    if cfg.model == "flow":
        with torch.no_grad():
            lp = torch.cat([gen.net.log_prob(x, y if gen.num_classes else None) for x, y in
                            zip(gen.norm(test_fs.latents).split(2000), test_fs.labels.split(2000))])
        s["test_bpd"] = bits_per_dim(lp, gen.dim)
        s["test_bpd_gaussian"] = bits_per_dim(gauss.log_prob(gen.norm(test_fs.latents)), gen.dim)
    if gen.num_classes:
        s |= _class_accuracy(preds, gen.num_classes, out)
    s["figures"] = _figures(gen, siren, lat, g_lat, test_fs, size, out)
    return s


def _class_accuracy(preds: torch.Tensor, k: int, out: Path) -> dict:
    """Samples were drawn with classes in turn (sample i asks for class i % k)."""
    asked = torch.arange(len(preds)) % k
    per = {c: (preds[asked == c] == c).float().mean().item() for c in range(k)}
    write_csv(out / "class_accuracy.csv", ["class", "samples", "accuracy"],
              [[c, int((asked == c).sum()), round(a, 4)] for c, a in per.items()])
    return {"class_accuracy": {str(c): a for c, a in per.items()},
            "class_accuracy_mean": (preds == asked).float().mean().item()}


def _figures(gen: Generator, siren, lat, g_lat, test_fs: Functaset, size: int, out: Path) -> list[str]:
    pick = torch.randperm(len(lat), generator=torch.Generator().manual_seed(0))[:64]
    paths = [save_tiles(decode(siren, lat[pick], size), 8, out / "samples.png"),
             save_tiles(decode(siren, g_lat[pick], size), 8, out / "samples-gaussian.png")]
    if gen.num_classes:
        per = 10
        y = torch.arange(gen.num_classes).repeat_interleave(per)
        grid = decode(siren, gen.sample(len(y), y, seed=gen.config.seed + 1), size)
        paths.append(save_tiles(grid, gen.num_classes, out / "samples-by-class.png"))
    n = len(test_fs.latents)
    pairs = [(test_fs.latents[i], test_fs.latents[(i + n // 2) % n]) for i in range(0, min(n, 4))]
    for s in sorted({size, 128}):
        paths.append(interpolation_grid(siren, pairs, s, out / f"interpolations-{s}.png"))
    if (out / "metrics.jsonl").is_file() and gen.config.model != "gaussian":
        paths.append(plot_training(out, out / "training-loss.png"))
    return [p.name for p in paths]


def sample_to_png(gen_dir: str | Path, out: str | Path, *, n: int = 64, klass: int | None = None,
                  size: int | None = None, seed: int = 0, run: str | Path | None = None) -> Path:
    """``nnlab functa sample``: ``n`` samples of the generator in ``gen_dir`` as one PNG grid."""
    from nnlab.functa.generate.model import load_generator
    from nnlab.functa.reconstruct import load_model

    gen_dir = Path(gen_dir)
    gen = load_generator(gen_dir / "model.safetensors")
    siren = load_model(run or _recorded_run(gen_dir))
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    y = None if klass is None else torch.full((n,), klass, dtype=torch.long)
    lat = gen.sample(n, y, seed=seed)
    size = _data_size(gen_dir) if size is None else size
    return save_tiles(decode(siren, lat, size), max(1, round(n ** 0.5)), out)


def _recorded_run(gen_dir: Path) -> Path:
    """The functa run of a generator folder: relative to the folder first (published copies move)."""
    cfg = RunDir(gen_dir, create=False).load_config()
    candidates = [gen_dir / cfg["run_relative"]] if cfg.get("run_relative") else []
    candidates += [Path(cfg["run"])] if cfg.get("run") else []
    for candidate in candidates:  # never the generator folder itself, whose config.yaml is no functa run
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"the functa run of {gen_dir} ({cfg.get('run')}) is not there; pass --run")


def _data_size(gen_dir: Path) -> int:
    return int(RunDir(gen_dir, create=False).load_config().get("image_size", 28))
