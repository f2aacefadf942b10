"""``nnlab lbi train|prune|plot``: DessiLBI sparse training, pruning by Gamma, and figures."""
from __future__ import annotations

import argparse
import dataclasses

from nnlab.cli import add_command_group


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "lbi", "DessiLBI: sparse training, pruning by Gamma, figures",
                            __doc__.splitlines()[0])
    _register_train(sub)
    _register_prune(sub)
    _register_plot(sub)


def _layer_values(text: str, what: str) -> dict[str, float]:
    """``"conv3=4,fc1=0.5"`` -> ``{"conv3": 4.0, "fc1": 0.5}``; ``what`` names the value in errors."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected LAYER={what}[,LAYER={what}...], got {text!r}")
    return out


def _layer_lams(text: str) -> dict[str, float]:
    """argparse type of ``--layer-lam``."""
    return _layer_values(text, "LAM")


def _layer_mus(text: str) -> dict[str, float]:
    """argparse type of ``--layer-mu``."""
    return _layer_values(text, "MU")


def _register_train(sub) -> None:
    from nnlab.cli.train import add_option_dicts
    from nnlab.config import add_dataclass_options
    from nnlab.lbi.experiments import LBIOptions, LBIRecordOptions, LBITrainConfig

    p = sub.add_parser("train", help="train with sgd|slbi|slbi-adam|adam; records sparsity and Gamma paths",
                       description="Train with DessiLBI (or a baseline optimiser) and record sparsity, Gamma "
                                   "paths and the sparse model's accuracy. The training options are those of "
                                   "`nnlab train` (nnlab.lbi.experiments.LBITrainConfig holds the defaults).")
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_dataclass_options(p, LBITrainConfig)
    add_option_dicts(p)
    g = p.add_argument_group("DessiLBI (optimizer slbi or slbi-adam)")
    add_dataclass_options(g, LBIOptions, skip=("layer_lam", "layer_mu"))
    g.add_argument("--layer-lam", type=_layer_lams, metavar="LAYER=LAM,...",
                   help="per-layer lambda, e.g. conv3=4,fc1=0.5")
    g.add_argument("--layer-mu", type=_layer_mus, metavar="LAYER=MU,...", help="per-layer mu, e.g. conv3=50")
    add_dataclass_options(p.add_argument_group("recording"), LBIRecordOptions)
    p.set_defaults(func=run_train, _parser=p)


def run_train(args: argparse.Namespace) -> int:
    from nnlab.config import dataclass_from_args
    from nnlab.lbi.experiments import (LBI_OPTIMIZERS, LBIOptions, LBIRecordOptions, LBITrainConfig,
                                       lbi_train_config, train_lbi)

    config = dataclasses.asdict(dataclass_from_args(LBITrainConfig, args))
    given = any(getattr(args, f.name) is not None for f in dataclasses.fields(LBIOptions))
    lbi = dataclass_from_args(LBIOptions, args) if given or config["optimizer"] in LBI_OPTIMIZERS else None
    s = train_lbi(lbi_train_config(lbi, **config), args.out, resume=args.resume,
                  record=dataclass_from_args(LBIRecordOptions, args)).summary
    print(f"test top-1 {s['test_top1']:.4f}, top-5 {s['test_top5']:.4f}; sparsity "
          + ", ".join(f"{k}={v:.2f}" for k, v in s["sparsity"].items()) + f"; results in {args.out}/")
    return 0


def _register_prune(sub) -> None:
    from nnlab.config import add_dataclass_options
    from nnlab.lbi.gamma_prune import GammaPruneConfig

    p = sub.add_parser("prune", help="prune a layer of a DessiLBI run by Gamma's order; results.csv")
    p.add_argument("run", help="run folder of `nnlab lbi train --optimizer slbi|slbi-adam`")
    p.add_argument("--out", required=True, help="folder for results.csv and results.md")
    add_dataclass_options(p, GammaPruneConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue the fine-tuning runs already in --out (after a kill, or to rerun the table)")
    p.set_defaults(func=run_prune, _parser=p)


def run_prune(args: argparse.Namespace) -> int:
    from nnlab.config import dataclass_from_args
    from nnlab.lbi.gamma_prune import GammaPruneConfig, prune_run

    table = prune_run(args.run, args.out, dataclass_from_args(GammaPruneConfig, args), resume=args.resume)
    print(table.markdown)
    print(f"results in {args.out}/results.csv and results.md")
    return 0


def _register_plot(sub) -> None:
    p = sub.add_parser("plot", help="curves, Gamma paths and conv weight images from run folders")
    p.add_argument("runs", nargs="+", help="run folders of `nnlab lbi train`")
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    from nnlab.lbi.gamma_prune import GammaPruneConfig

    p.add_argument("--layer", default=GammaPruneConfig.layer,
                   help=f"layer whose weights are drawn (default {GammaPruneConfig.layer}, the one lbi prune prunes)")
    p.set_defaults(func=run_plot, _parser=p)


def run_plot(args: argparse.Namespace) -> int:
    from nnlab.lbi.plots import plot_runs

    for path in plot_runs(args.runs, args.out, layer=args.layer):
        print(path)
    return 0
