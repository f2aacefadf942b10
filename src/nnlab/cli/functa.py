"""``nnlab functa``: meta-train a latent-modulated SIREN, fit functasets, reconstruct, classify, generate."""
from __future__ import annotations

import json
import sys

from nnlab.cli import add_command_group
from nnlab.config import int_list
from nnlab.errors import ConfigError


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    return i, n


def register(subparsers) -> None:
    from nnlab.functa.presets import PRESETS

    sub = add_command_group(subparsers, "functa", "functa: images as latent-modulated SIRENs", __doc__)
    t = sub.add_parser("train", help="meta-train a preset; writes RUN/summary.json with test_psnr")
    t.add_argument("--preset", required=True, choices=sorted(PRESETS))
    t.add_argument("--data", required=True, help="data set name (mnist, mnist-5k, celeba64, cifar10, ...)")
    t.add_argument("--data-dir", help="folder or .tar.gz of the data set")
    from nnlab.config import add_dataclass_options
    from nnlab.functa.model import FunctaConfig
    from nnlab.functa.presets import FLAGS, MetaTrainConfig

    meta = t.add_argument_group("meta-training (override the preset's MetaTrainConfig)")
    add_dataclass_options(meta, MetaTrainConfig, aliases=FLAGS, default_note="the preset's")

    arch = t.add_argument_group("model (override the preset's FunctaConfig)")
    add_dataclass_options(arch, FunctaConfig, skip=("in_dims", "out_channels"), default_note="the preset's")
    t.add_argument("--device", default="auto")
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.set_defaults(func=run_train, _parser=t)

    f = sub.add_parser("fit", help="fit latents for a whole split into a safetensors functaset")
    f.add_argument("run", metavar="RUN")
    f.add_argument("--data", required=True)
    f.add_argument("--data-dir")
    f.add_argument("--split", choices=["train", "test"], default="test")
    f.add_argument("--out", required=True, help="output .safetensors file")
    f.add_argument("--chunk-size", type=int, default=1000, help="images per resumable chunk")
    f.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: fit every n-th chunk from i")
    f.add_argument("--inner-steps", type=int, help="default: the run's")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile the fitting loop (about 2x faster after a 30-120 s compile)")
    f.set_defaults(func=run_fit, _parser=f)

    r = sub.add_parser("reconstruct", help="PNG grid of originals over reconstructions at --size")
    r.add_argument("run", metavar="RUN")
    r.add_argument("--data", required=True)
    r.add_argument("--data-dir")
    r.add_argument("--split", choices=["train", "test"], default="test")
    r.add_argument("--count", type=int, default=8)
    r.add_argument("--size", type=int_list, default=None, help="output size(s), e.g. 28,64,128 (default: data size)")
    r.add_argument("--out", required=True, help="output folder")
    r.set_defaults(func=run_reconstruct, _parser=r)

    c = sub.add_parser("classify", help="MLP on latents; writes RUN/summary.json with test_top1")
    c.add_argument("train_set", metavar="TRAIN_FUNCTASET")
    c.add_argument("test_set", metavar="TEST_FUNCTASET")
    from nnlab.functa.classify import ClassifyConfig

    add_dataclass_options(c, ClassifyConfig)
    c.add_argument("--out", required=True)
    c.add_argument("--resume", action="store_true", help="continue the killed run in --out from its last epoch")
    c.set_defaults(func=run_classify, _parser=c)
    _register_extra(sub)


def _register_extra(sub) -> None:
    b = sub.add_parser("baseline", help="ResNet-18 CD-PreAct on the pixels of the same split")
    b.add_argument("--data", required=True)
    b.add_argument("--data-dir")
    b.add_argument("--epochs", type=int, default=10)
    b.add_argument("--out", required=True)
    b.add_argument("--resume", action="store_true", help="continue the killed run in --out from its checkpoint")
    b.set_defaults(func=run_baseline, _parser=b)
    p = sub.add_parser("plot", help="figures: PSNR/inner-MSE histograms, learning curves, latent sweep")
    p.add_argument("--functaset", help="functaset for the PSNR and inner-MSE histograms")
    p.add_argument("--classify-run", help="functa classifier run (learning curve)")
    p.add_argument("--baseline-run", help="pixel baseline run (learning curve)")
    p.add_argument("--sweep", nargs="+", help="train runs of a latent-size sweep (PSNR vs latent size)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="train runs to compare: validation PSNR against "
                   "minutes in one figure (compare.png) and their test PSNR (compare.csv)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_plot, _parser=p)
    _register_generate(sub)


def _register_generate(sub) -> None:
    from nnlab.config import add_dataclass_options
    from nnlab.functa.generate.model import GenerateConfig

    g = sub.add_parser("generate", help="train diffusion / flow / gaussian on a functaset; sample, FID, figures",
                       description="Train a generative model on the latents of a train functaset, decode samples "
                                   "with the run's SIREN, and score them (FID in nnlab feature space, "
                                   "precision/recall, memorisation); writes GEN/summary.json and GEN/samples.png.")
    g.add_argument("run", metavar="RUN", help="functa training run (nnlab functa train)")
    g.add_argument("functaset", metavar="FUNCTASET", help="its train functaset (nnlab functa fit --split train)")
    add_dataclass_options(g, GenerateConfig, skip=("time_limit_min",))
    g.add_argument("--time-limit", type=float, dest="time_limit_min", metavar="MIN",
                   help="stop training after MIN minutes (default: no limit)")
    g.add_argument("--data", help="data set of the functaset (default: the one it records)")
    g.add_argument("--data-dir", help="folder or .tar.gz of the data set (for the FID reference images)")
    g.add_argument("--test-functaset", help="test-split functaset (default: fitted into GEN/)")
    g.add_argument("--feature-net", help="feature network .safetensors (default: trained once per data set, cached)")
    g.add_argument("--out", required=True, metavar="GEN")
    g.add_argument("--resume", action="store_true", help="continue GEN/checkpoint")
    g.set_defaults(func=run_generate, _parser=g)

    s = sub.add_parser("sample", help="PNG grid of samples from a trained generator (nnlab functa generate)")
    s.add_argument("gen", metavar="GEN")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--class", type=int, dest="klass", help="class to sample (conditional generators)")
    s.add_argument("--size", type=int, help="render size in pixels (default: the data's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--run", help="functa run to decode with (default: the one GEN records)")
    s.add_argument("--out", required=True, help="output .png")
    s.set_defaults(func=run_sample, _parser=s)


def run_generate(args) -> int:
    from nnlab.config import dataclass_from_args
    from nnlab.functa.generate.model import GenerateConfig
    from nnlab.functa.generate.run import generate

    config = dataclass_from_args(GenerateConfig, args)
    summary = generate(args.run, args.functaset, args.out, config, data=args.data, data_dir=args.data_dir,
                       test_functaset=args.test_functaset, feature_net=args.feature_net, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=1))
    return 0


def run_sample(args) -> int:
    from nnlab.functa.generate.run import sample_to_png

    print(sample_to_png(args.gen, args.out, n=args.n, klass=args.klass, size=args.size, seed=args.seed,
                        run=args.run))
    return 0


def preset_from_args(args):
    """The functa :class:`~nnlab.functa.presets.Preset` of ``functa train``'s parsed flags: the preset's values
    with every flag that was given on top."""
    from nnlab.functa.model import FunctaConfig
    from nnlab.functa.presets import MetaTrainConfig, get_preset

    model = {f: getattr(args, f) for f in FunctaConfig.__dataclass_fields__ if hasattr(args, f)}
    return get_preset(args.preset, model_overrides=model,
                      **{f: getattr(args, f) for f in MetaTrainConfig.__dataclass_fields__})


def run_train(args) -> int:
    from nnlab.engine import distributed
    from nnlab.functa.trainer import train_functa

    preset = preset_from_args(args)
    summary = train_functa(preset, args.data, args.out, data_dir=args.data_dir, resume=args.resume, device=args.device,
                           progress=args.progress)
    if distributed.is_main():
        print(json.dumps(summary, indent=1))
    distributed.shutdown()  # under torchrun: tear the process group down while Python is alive
    return 0


def run_fit(args) -> int:
    from nnlab.functa.functaset import fit_split, load_functaset

    path = fit_split(args.run, args.data, args.split, args.out, data_dir=args.data_dir,
                     chunk_size=args.chunk_size, shard=args.shard, inner_steps=args.inner_steps,
                     compile=args.compile)
    if path is None:
        print("shard done; other shards still running", file=sys.stderr)
        return 0
    fs = load_functaset(path)
    print(f"{path}: {len(fs.labels)} images, mean PSNR {fs.psnr.mean():.2f} dB, fitted in "
          f"{float(fs.metadata['fit_seconds']):.1f} s ({fs.images_per_s:.0f} images/s)", file=sys.stderr)
    return 0


def run_reconstruct(args) -> int:
    from nnlab.functa.reconstruct import reconstruct_run

    for path in reconstruct_run(args.run, args.data, args.out, data_dir=args.data_dir, split=args.split,
                                count=args.count, sizes=args.size):
        print(path)
    return 0


def run_classify(args) -> int:
    from nnlab.config import dataclass_from_args
    from nnlab.functa.classify import ClassifyConfig, train_classifier

    config = dataclass_from_args(ClassifyConfig, args)
    print(json.dumps(train_classifier(args.train_set, args.test_set, args.out, config, resume=args.resume), indent=1))
    return 0


def run_baseline(args) -> int:
    from nnlab.functa.classify import pixel_baseline

    summary = pixel_baseline(args.data, args.out, data_dir=args.data_dir, epochs=args.epochs, resume=args.resume)
    print(json.dumps(summary, indent=1))
    return 0


def run_plot(args) -> int:
    from nnlab.functa.plots import make_figures

    for path in make_figures(args.out, functaset=args.functaset, classify_run=args.classify_run,
                             baseline_run=args.baseline_run, sweep=args.sweep, compare=args.compare):
        print(path)
    return 0
