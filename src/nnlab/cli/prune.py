"""``nnlab prune``: ViT pruning sweeps (P-ViT, AP-ViT, CP-ViT, ToMe) and pruned-model evaluation."""
from __future__ import annotations

import argparse

from nnlab.cli import add_command_group
from nnlab.config import float_list, str_list


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
    s.add_argument("--arch", help="architecture of a weights file, for its head count: deit-tiny, deit-small, "
                                  "deit-base, vit-tiny16, vit-s16, vit-b16, vit-l16")
    s.add_argument("--methods", type=str_list, default=["p-vit", "ap-vit", "cp-vit", "tome"],
                   help="comma-separated: p-vit,ap-vit,cp-vit,tome")
    s.add_argument("--ratios", type=float_list, default=[round(0.1 * i, 1) for i in range(1, 10)],
                   help="comma-separated pruning ratios in [0, 1)")
    s.add_argument("--data", help="data set (default: the run's)")
    s.add_argument("--data-dir", help="data folder or .tar.gz")
    s.add_argument("--out", required=True, help="output folder (resumable: finished rows are skipped)")
    s.add_argument("--batch-size", type=int, default=64, help="batch size of the throughput timing")
    s.add_argument("--eval-batch-size", type=int, default=256)
    s.add_argument("--calib-size", type=int, default=512, help="train images used to calibrate")
    s.add_argument("--test-limit", type=int, default=None, help="evaluate on N random test images (seeded)")
    s.add_argument("--timing-repeats", type=int, default=5)
    s.add_argument("--pvit-gate-epochs", type=int, default=3)
    s.add_argument("--pvit-l1", type=float, default=1e-4, help="L1 weight on the P-ViT gates")
    s.add_argument("--pvit-finetune-epochs", type=int, default=0)
    s.add_argument("--train-limit", type=int, default=None, help="P-ViT trains on N random train images (seeded)")
    s.add_argument("--apvit-epochs", type=int, default=30)
    s.add_argument("--apvit-candidates", type=int, default=16, help="tokens per image with a measured reward")
    s.add_argument("--no-save-models", dest="save_models", action="store_false")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_prune_sweep, _parser=s)
    e = sub.add_parser("eval", help="evaluate a saved pruned model (DIR/models/METHOD-RATIO)")
    e.add_argument("--model", required=True, help="folder with pruned.json")
    e.add_argument("--data", required=True)
    e.add_argument("--data-dir")
    e.add_argument("--test-limit", type=int, default=None, help="N random test images (seeded, as in sweep)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=run_eval, _parser=e)


def run_prune_sweep(args: argparse.Namespace) -> int:
    from nnlab.prune import methods, sweep

    config = sweep.PruneSweepConfig(
        checkpoint=args.checkpoint, arch=args.arch, out=args.out, methods=args.methods, ratios=args.ratios,
        data=args.data,
        data_dir=args.data_dir, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        calib_size=args.calib_size, test_limit=args.test_limit, timing_repeats=args.timing_repeats,
        save_models=args.save_models, seed=args.seed,
        pvit=methods.PViTOptions(gate_epochs=args.pvit_gate_epochs, l1_weight=args.pvit_l1,
                                 finetune_epochs=args.pvit_finetune_epochs, train_limit=args.train_limit),
        apvit=methods.APViTOptions(epochs=args.apvit_epochs, candidates=args.apvit_candidates))
    result = sweep.run_prune_sweep(config)
    print(f"{len(result.rows)} rows in {result.out}/results.csv; table in results.md; "
          "plots accuracy_vs_ratio.png, accuracy_vs_gflops.png, accuracy_vs_throughput.png")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from nnlab.data import load_dataset
    from nnlab.prune.common import accuracy, eval_transform
    from nnlab.prune.io import load_pruned

    runner = load_pruned(args.model)
    data = load_dataset(args.data, args.data_dir)
    test = data.test.random_subset(args.test_limit, args.seed)
    acc = accuracy(runner, test, eval_transform(data, runner.vit.config.image_size))
    print(f"{runner.method}: top-1 {100 * acc.top1:.2f}%, top-5 {100 * acc.top5:.2f}% on {acc.n} images, "
          f"{runner.macs() / 1e9:.4f} GFLOPs per image")
    return 0
