"""``nnlab lbi train|prune|plot``: DessiLBI sparse training, pruning by Gamma, and figures."""
from __future__ import annotations

import argparse
import dataclasses

from nnlab.cli import add_command_group
from nnlab.cli.train import KeyValues
from nnlab.config import float_list
from nnlab.data import DATASETS
from nnlab.engine.optim import SCHEDULES
from nnlab.models import MODELS

OPTIMIZER_CHOICES = ("sgd", "slbi", "slbi-adam", "adam")


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
    p = sub.add_parser("train", help="train with sgd|slbi|slbi-adam|adam; records sparsity and Gamma paths")
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    p.add_argument("--model", choices=MODELS.names(), default="lenet5")
    p.add_argument("--model-option", dest="model_options", action=KeyValues, default={},
                   metavar="KEY=VALUE", help="extra model option, e.g. width=0.25 (repeatable)")
    p.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default="slbi")
    p.add_argument("--data", choices=DATASETS.names(), default="mnist-5k")
    p.add_argument("--data-dir", help="data folder or .tar.gz (not needed for mnist-5k)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, or Adam beta1")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--kappa", type=float, default=None, help="DessiLBI damping factor (default 1)")
    p.add_argument("--mu", type=float, default=None, help="DessiLBI coupling: W pulled to Gamma by 1/mu "
                   "(default 20)")
    p.add_argument("--lam", type=float, default=None, help="DessiLBI shrinkage threshold lambda (default 1)")
    p.add_argument("--conv-lam", type=float, default=None, help="lambda of conv weights (default --lam)")
    p.add_argument("--layer-lam", type=_layer_lams, default=None, metavar="LAYER=LAM,...",
                   help="lambda of named layers, e.g. conv3=4")
    p.add_argument("--layer-mu", type=_layer_mus, default=None, metavar="LAYER=MU,...",
                   help="mu of named layers, e.g. conv3=5 (a tighter coupling for the layer to be pruned)")
    p.add_argument("--gamma-lr", type=float, default=None, help="step of V (default: --lr)")
    p.add_argument("--compiled", action="store_const", const=True, default=None,
                   help="fused optimiser step: a C++ kernel for conv weights and torch.compile for the rest "
                        "(built on first use; needs a C++ compiler)")
    p.add_argument("--decoupled-wd", action="store_const", const=True, default=None,
                   help="slbi: decoupled weight decay (default: coupled L2 in the momentum buffer, as the "
                        "official code and torch SGD; slbi-adam always decouples)")
    p.add_argument("--schedule", choices=SCHEDULES.names(), default="cosine")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--crop-padding", type=int, default=None, metavar="PIXELS",
                   help="padding of the --augment random crop (default 4 for 28+ pixel images, else 2)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="in [0, 1)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=16, help="Gamma entries followed per layer")
    p.add_argument("--eval-wstar", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate W * 1[Gamma != 0] every epoch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N steps, schedule unchanged (--resume without it continues)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded in config.yaml)")
    p.add_argument("--train-limit", type=int, default=None, help="use N random train images")
    p.add_argument("--test-limit", type=int, default=None, help="use N random test images")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_train, _parser=p)


def run_train(args: argparse.Namespace) -> int:
    from nnlab.engine.train import TrainConfig
    from nnlab.lbi.experiments import (LBI_OPTIMIZERS, LBI_OPTION_NAMES, LBIOptions, lbi_train_config,
                                       train_lbi)

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: getattr(args, k) for k in LBI_OPTION_NAMES if getattr(args, k) is not None}
    config = lbi_train_config(LBIOptions(**given) if given or args.optimizer in LBI_OPTIMIZERS else None,
                              **{k: v for k, v in vars(args).items() if k in names})
    s = train_lbi(config, args.out, resume=args.resume, sample=args.sample, eval_wstar=args.eval_wstar).summary
    print(f"test top-1 {s['test_top1']:.4f}, top-5 {s['test_top5']:.4f}; sparsity "
          + ", ".join(f"{k}={v:.2f}" for k, v in s["sparsity"].items()) + f"; results in {args.out}/")
    return 0


def _register_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a layer of a DessiLBI run by Gamma's order; results.csv")
    p.add_argument("run", help="run folder of `nnlab lbi train --optimizer slbi|slbi-adam`")
    p.add_argument("--layer", default="conv3", help="module name, e.g. conv3 or features.conv5_2")
    p.add_argument("--ratios", type=float_list, default=[0, 0.1, 0.2, 0.4, 0.6, 0.8])
    p.add_argument("--out", required=True, help="folder for results.csv and results.md")
    p.add_argument("--data-dir", help="override the run's data folder")
    p.add_argument("--finetune-epochs", type=int, default=0, help="masked fine-tuning epochs per ratio")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.set_defaults(func=run_prune, _parser=p)


def run_prune(args: argparse.Namespace) -> int:
    from nnlab.lbi.gamma_prune import prune_run

    table = prune_run(args.run, layer=args.layer, ratios=args.ratios, out=args.out, data_dir=args.data_dir,
                      finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
    print(table.markdown)
    print(f"results in {args.out}/results.csv and results.md")
    return 0


def _register_plot(sub) -> None:
    p = sub.add_parser("plot", help="curves, Gamma paths and conv weight images from run folders")
    p.add_argument("runs", nargs="+", help="run folders of `nnlab lbi train`")
    p.add_argument("--out", required=True, help="folder for the PNG figures")
    p.add_argument("--layer", default="conv3", help="layer whose weights are drawn")
    p.set_defaults(func=run_plot, _parser=p)


def run_plot(args: argparse.Namespace) -> int:
    from nnlab.lbi.plots import plot_runs

    for path in plot_runs(args.runs, args.out, layer=args.layer):
        print(path)
    return 0
