"""``nnlab prune``: ViT pruning sweeps (P-ViT, AP-ViT, CP-ViT, ToMe) and pruned-model evaluation."""
from __future__ import annotations

import argparse

from nnlab.cli import add_command_group


RATIO_HELP = """what the pruning ratio removes:
  cp-vit, tome, ap-vit  patch tokens: ratio = 1 - mean over blocks of (patches in the block's MLP) / N
                        (CLS is never removed; CP-ViT and ToMe act between attention and MLP,
                        AP-ViT's agents before the blocks they sit in front of)
  p-vit                 dimensions: the fraction of all gated units removed (per-block q/k/v dims,
                        shared by heads, and MLP hidden units), by one global gate threshold
results.csv also has the achieved_ratio (token counts are whole numbers; ToMe and AP-ViT have ceilings)."""


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "prune", "ViT pruning: sweep methods x ratios, evaluate pruned models",
                            __doc__.splitlines()[0])
    s = sub.add_parser("sweep", help="every method at every ratio; writes DIR/results.csv, results.md, plots",
                       description="Prune a trained ViT with each method at each ratio and measure top-1/top-5, "
                                   "GFLOPs and images/s.", epilog=RATIO_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    s.add_argument("--checkpoint", required=True,
                   help="run folder of a trained ViT (nnlab train --out RUN), or a timm / DeiT / Hugging Face "
                        "ViT weights file (.safetensors or .pth; then give --arch and --data)")
    s.add_argument("--out", required=True, help="output folder (resumable: finished rows are skipped)")
    _add_sweep_options(s)
    s.set_defaults(func=run_prune_sweep, _parser=s)
    e = sub.add_parser("eval", help="evaluate a saved pruned model (DIR/models/METHOD-RATIO)")
    e.add_argument("--model", required=True, help="folder with pruned.json")
    e.add_argument("--data", required=True)
    e.add_argument("--data-dir")
    from nnlab.config import add_dataclass_options
    from nnlab.prune.sweep import PruneSweepConfig

    add_dataclass_options(e, PruneSweepConfig, only=("test_limit", "seed"))  # the sweep's test subset
    e.set_defaults(func=run_eval, _parser=e)


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """Flags of PruneSweepConfig and its P-ViT / AP-ViT option dataclasses (their defaults and help)."""
    from nnlab.config import add_dataclass_options
    from nnlab.prune.methods import APViTOptions, CPViTOptions, PViTOptions
    from nnlab.prune.sweep import PruneSweepConfig

    add_dataclass_options(parser, PruneSweepConfig, skip=("checkpoint", "out"))
    p = parser.add_argument_group("P-ViT (gate training and optional fine-tuning)")
    add_dataclass_options(p, PViTOptions, prefix="pvit", aliases={"l1_weight": "--pvit-l1",
                                                                  "train_limit": "--train-limit"})
    a = parser.add_argument_group("AP-ViT (the pruning agents)")
    add_dataclass_options(a, APViTOptions, prefix="apvit")
    c = parser.add_argument_group("CP-ViT (head pruning; patches are always pruned)")
    add_dataclass_options(c, CPViTOptions, prefix="cpvit")


def sweep_config_from_args(args: argparse.Namespace):
    """The PruneSweepConfig of parsed ``nnlab prune sweep`` options (prefixed option dataclasses nested)."""
    from nnlab.config import dataclass_from_args
    from nnlab.prune import methods, sweep

    return dataclass_from_args(sweep.PruneSweepConfig, args,
                               pvit=dataclass_from_args(methods.PViTOptions, args, prefix="pvit"),
                               apvit=dataclass_from_args(methods.APViTOptions, args, prefix="apvit"),
                               cpvit=dataclass_from_args(methods.CPViTOptions, args, prefix="cpvit"))


def run_prune_sweep(args: argparse.Namespace) -> int:
    from nnlab.prune import sweep

    result = sweep.run_prune_sweep(sweep_config_from_args(args))
    print(f"{len(result.rows)} rows in {result.out}/results.csv; table in results.md; "
          "plots accuracy_vs_ratio.png, accuracy_vs_gflops.png, accuracy_vs_throughput.png")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from nnlab.data import load_dataset
    from nnlab.errors import ConfigError
    from nnlab.prune.common import accuracy, eval_transform
    from nnlab.config import dataclass_from_args
    from nnlab.prune.io import load_pruned
    from nnlab.prune.sweep import PruneSweepConfig

    runner = load_pruned(args.model)
    data = load_dataset(args.data, args.data_dir)
    vc = runner.vit.config
    if (data.shape[0], data.num_classes) != (vc.in_chans, vc.num_classes):
        raise ConfigError(f"{args.model} takes {vc.in_chans}-channel images of {vc.num_classes} classes, but "
                          f"{args.data} has {data.shape[0]} channel(s) and {data.num_classes} classes; pass the --data "
                          "it was pruned on")
    c = dataclass_from_args(PruneSweepConfig, args, checkpoint=args.model, out="")  # the sweep's seed
    test = data.test.random_subset(c.test_limit, c.seed)
    acc = accuracy(runner, test, eval_transform(data, runner.vit.config.image_size))
    print(f"{runner.method}: top-1 {100 * acc.top1:.2f}%, top-5 {100 * acc.top5:.2f}% on {acc.n} images, "
          f"{runner.macs() / 1e9:.4f} GFLOPs per image")
    return 0
