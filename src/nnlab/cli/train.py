"""``nnlab train``: train a classifier from the model zoo on a data set; thin over nnlab.engine.train."""
from __future__ import annotations

import argparse
import dataclasses

import yaml

from nnlab.data import DATASETS
from nnlab.engine.optim import OPTIMIZERS, SCHEDULES
from nnlab.models import MODELS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class KeyValues(argparse.Action):
    """``--x-option KEY=VALUE`` (repeatable; VALUE read as YAML) merged into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, raw = values.partition("=")
        if not sep or not key.strip():
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        merged = dict(getattr(namespace, self.dest) or {})
        merged[key.strip().replace("-", "_")] = value
        setattr(namespace, self.dest, merged)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a classifier; writes RUN/summary.json",
                              description="Train a classifier from the model zoo on a data set; writes "
                              "RUN/config.yaml, metrics.jsonl, checkpoint/ and summary.json.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    p.add_argument("--model", choices=MODELS.names(), default="lenet5", metavar="MODEL",
                   help=f"one of {', '.join(MODELS.names())}")
    p.add_argument("--data", choices=DATASETS.names(), default="mnist-5k", metavar="NAME",
                   help=f"one of {', '.join(DATASETS.names())}")
    p.add_argument("--data-dir", help="data folder or .tar.gz (not needed for mnist-5k)")
    p.add_argument("--out", required=True, help="run folder (config, metrics, checkpoints, summary)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (starts fresh when it has none)")
    p.add_argument("--epochs", type=_positive_int, default=10, help="passes over the train split")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="per process")
    p.add_argument("--eval-batch-size", type=_positive_int, default=1000, help="per process")
    p.add_argument("--optimizer", choices=OPTIMIZERS.names(), default="sgd", help="%(choices)s")
    p.add_argument("--lr", type=_float, default=0.05, help="peak learning rate")
    p.add_argument("--momentum", type=_float, default=0.9, help="SGD momentum / Adam beta1")
    p.add_argument("--weight-decay", type=_float, default=5e-4, help="L2 (decoupled for adamw)")
    p.add_argument("--schedule", choices=SCHEDULES.names(), default="cosine", help="per-step lr schedule")
    p.add_argument("--warmup-steps", type=_nonneg_int, default=0, help="linear lr warm-up")
    p.add_argument("--label-smoothing", type=_float, default=0.0, help="in [0, 1)")
    p.add_argument("--grad-clip", type=_float, default=0.0, help="max grad norm; 0 = off")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random crop with padding (and --flip)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips with --augment (not for digits)")
    p.add_argument("--crop-padding", type=int, default=None, metavar="PIXELS",
                   help="padding of the --augment random crop (default 4 for 28+ pixel images, else 2)")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order, augmentation")
    p.add_argument("--log-every", type=_positive_int, default=50, help="steps between metric records")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=0, help="steps; 0 = epoch ends only")
    p.add_argument("--eval-every", type=_positive_int, default=1, help="epochs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: GPU if any")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only)")
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels (slower)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after N steps without changing the schedule (--resume without it continues)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice); config.yaml records the count used")
    p.add_argument("--train-limit", type=_positive_int, default=None, help="use N random train images")
    p.add_argument("--test-limit", type=_positive_int, default=None, help="use N random test images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no bars or epoch lines")
    for kind in ("model", "data", "optimizer", "schedule"):
        p.add_argument(f"--{kind}-option", dest=f"{kind}_options", action=KeyValues, default={},
                       metavar="KEY=VALUE", help=f"extra {kind} option (repeatable)")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from nnlab.engine import distributed
    from nnlab.engine.train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    result = train(config, args.out, resume=args.resume)
    if distributed.is_main():
        s = result.summary
        print(f"test top-1 {s['test_top1']:.4f}, top-5 {s['test_top5']:.4f} after {s['epochs']} epochs "
              f"({s['train_time_s']:.0f} s); results in {result.run.path}/ (summary.json, metrics.jsonl, "
              f"config.yaml, checkpoint/)")
    distributed.shutdown()
    return 0
