"""``nnlab landscape``: BatchNorm and the optimisation landscape (Santurkar et al. 2018).

``nnlab landscape run``: train every (BN, lr) pair with landscape probes, resumably.
``nnlab landscape plot RUN --out DIR``: draw the figures from RUN's metrics.
"""
from __future__ import annotations

import argparse
import sys

from nnlab.cli import add_command_group
from nnlab.config import float_list


def _int(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "landscape", "BatchNorm and the optimisation landscape",
                            __doc__.splitlines()[0])
    _register_run(sub)
    _register_plot(sub)


def _register_run(sub) -> None:
    from nnlab.data import DATASETS
    from nnlab.landscape.sweep import LandscapeConfig
    from nnlab.models import MODELS

    d = LandscapeConfig()  # the one source of defaults

    p = sub.add_parser("run", help="train every (bn, lr) pair with probes; resumable",
                       description="Train every (bn, lr) pair with landscape probes into RUN; rerun the "
                                   "same command to continue a killed sweep.")
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    p.add_argument("--model", choices=MODELS.names(), default=d.model)
    p.add_argument("--bn", choices=["both", "on", "off"], default=d.bn)
    p.add_argument("--data", choices=DATASETS.names(), default=d.data)
    p.add_argument("--data-dir", help="data folder or .tar.gz (e.g. ../shared/data/cifar10)")
    p.add_argument("--lrs", type=float_list, default=d.lrs)
    p.add_argument("--epochs", type=_int(1), default=d.epochs)
    p.add_argument("--batch-size", type=_int(1), default=d.batch_size)
    p.add_argument("--every", type=_int(1), default=d.every, help="steps between probes")
    p.add_argument("--eta-count", type=_int(1), default=d.eta_count, help="step sizes per probe")
    p.add_argument("--eta-range", type=float_list, default=[d.eta_low, d.eta_high],
                   help="step sizes span LOW,HIGH x lr (geometric)")
    p.add_argument("--hessian-every", type=_int(0), default=d.hessian_every,
                   help="steps between top-Hessian-eigenvalue probes (a multiple of --every; 0 = off)")
    p.add_argument("--hessian-iters", type=_int(1), default=d.hessian_iters,
                   help="most power-iteration steps per Hessian probe (stops early once converged)")
    p.add_argument("--width", type=_positive_float, help="model width multiplier (vgg-a: channels x W)")
    p.add_argument("--train-subset", type=_int(1), help="train on a seeded random subset of N images")
    p.add_argument("--test-subset", type=_int(1), help="test on a seeded random subset of N images")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="random crop + flip (default on)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=_int(0), default=d.checkpoint_every,
                   help="steps; 0 = epoch ends only")
    p.add_argument("--max-steps", type=_int(1), help="stop every pair after N steps, schedule unchanged "
                   "(rerun without it to continue)")
    p.add_argument("--jobs", type=_int(1), default=d.jobs, help="pairs trained at once, one process each")
    p.add_argument("--threads", type=_int(1), help="torch CPU threads per pair (default: torch's choice, "
                   "or the CPU count / --jobs)")
    p.add_argument("--out", required=True, help="sweep folder RUN")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with 'nnlab train': a sweep always continues where it stopped")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run, _parser=p)


def _register_plot(sub) -> None:
    p = sub.add_parser("plot", help="figures of a sweep", description="Draw a sweep's figures from "
                       "RUN/metrics.jsonl: curves, loss and gradient-predictiveness bands, beta.")
    p.add_argument("run", metavar="RUN", help="sweep folder written by 'nnlab landscape run'")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--log", action="store_true", help="log-scale y axes")
    p.add_argument("--lr", type=_positive_float, help="lr of the step-size band panels (default: nearest 0.1)")
    p.set_defaults(func=plot, _parser=p)


def run(args) -> int:
    from nnlab.errors import ConfigError
    from nnlab.landscape.sweep import LandscapeConfig, run_landscape

    if len(args.eta_range) != 2:
        raise ConfigError(f"--eta-range takes LOW,HIGH, got {args.eta_range}")
    cfg = LandscapeConfig(model=args.model, bn=args.bn, data=args.data, data_dir=args.data_dir, lrs=args.lrs,
                      epochs=args.epochs, batch_size=args.batch_size, every=args.every,
                      eta_count=args.eta_count, eta_low=args.eta_range[0], eta_high=args.eta_range[1],
                      hessian_every=args.hessian_every, hessian_iters=args.hessian_iters, width=args.width,
                      train_subset=args.train_subset, test_subset=args.test_subset, momentum=args.momentum,
                      weight_decay=args.weight_decay, augment=args.augment, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, jobs=args.jobs,
                      threads=args.threads, progress=args.progress)
    result = run_landscape(cfg, args.out)
    for r in result.summary["runs"]:
        top1 = "-" if r["test_top1"] is None else f"{100 * r['test_top1']:.2f}%"
        print(f"bn {r['bn']:>3}  lr {r['lr']:<6g} test top-1 {top1}")
    print(f"summary: {args.out}/summary.json", file=sys.stderr)
    return 0


def plot(args) -> int:
    from nnlab.landscape.plots import make_figures

    for path in make_figures(args.run, args.out, log=args.log, lr=args.lr):
        print(path)
    return 0
