"""``nnlab train``: train a classifier from the model zoo on a data set; thin over nnlab.engine.train."""
from __future__ import annotations

import argparse

import yaml

from nnlab.data import DATASETS
from nnlab.engine.optim import OPTIMIZERS, SCHEDULES
from nnlab.models import MODELS


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
    from nnlab.config import add_dataclass_options
    from nnlab.engine.train import TrainConfig

    p = subparsers.add_parser("train", help="train a classifier; writes RUN/summary.json",
                              description="Train a classifier from the model zoo on a data set; writes "
                              "RUN/config.yaml, metrics.jsonl, checkpoint/ and summary.json. Every option but "
                              "--config, --out and --resume is a field of nnlab.engine.train.TrainConfig "
                              f"(its defaults). Models: {', '.join(MODELS.names())}. Data sets: "
                              f"{', '.join(DATASETS.names())}. Optimizers: {', '.join(OPTIMIZERS.names())}. "
                              f"Schedules: {', '.join(SCHEDULES.names())}.")
    p.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys as below); flags win")
    p.add_argument("--out", required=True, help="run folder (config, metrics, checkpoints, summary)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (starts fresh when it has none); "
                        "lr, grad clip and schedule may change (recorded), nothing else")
    add_dataclass_options(p, TrainConfig)
    add_option_dicts(p)
    p.set_defaults(func=run, _parser=p)


def add_option_dicts(parser: argparse.ArgumentParser) -> None:
    """``--model-option``, ``--data-option``, ``--optimizer-option``, ``--schedule-option``: the dict
    fields of TrainConfig, one KEY=VALUE at a time."""
    examples = {"model": ", e.g. width=0.25", "data": "", "optimizer": ", e.g. nesterov=true",
                "schedule": ", e.g. min_factor=0.1"}
    for kind, example in examples.items():
        parser.add_argument(f"--{kind}-option", dest=f"{kind}_options", action=KeyValues, default=None,
                            metavar="KEY=VALUE", help=f"extra {kind} option{example} (repeatable)")


def run(args: argparse.Namespace) -> int:
    from nnlab.engine import distributed
    from nnlab.engine.train import TrainConfig, train

    from nnlab.config import dataclass_from_args

    result = train(dataclass_from_args(TrainConfig, args), args.out, resume=args.resume)
    if distributed.is_main():
        s = result.summary
        print(f"test top-1 {s['test_top1']:.4f}, top-5 {s['test_top5']:.4f} after {s['epochs']} epochs "
              f"({s['train_time_s']:.0f} s); results in {result.run.path}/ (summary.json, metrics.jsonl, "
              f"config.yaml, checkpoint/)")
    distributed.shutdown()
    return 0
