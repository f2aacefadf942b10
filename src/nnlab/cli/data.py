"""``nnlab data list`` and ``nnlab data info NAME [--data-dir DIR] [--download] [--image-size N]``."""
from __future__ import annotations

import json

from nnlab.cli import add_command_group


def register(subparsers) -> None:
    sub = add_command_group(subparsers, "data", "list data sets, or describe one as JSON")

    p = sub.add_parser("list", help="the data set names and what they are")
    p.set_defaults(func=run_list, _parser=p)

    p = sub.add_parser("info", help="load a data set (decoding it into the cache once) and print "
                                    "train_size, test_size, shape, num_classes, ... as JSON")
    p.add_argument("name", help="data set name (see 'nnlab data list')")
    p.add_argument("--data-dir", help="folder or .tar.gz holding the data set (or their parent); "
                                      "default: the cache folder ($NNLAB_DATA or ~/.cache/nnlab)")
    p.add_argument("--download", action="store_true",
                   help="fetch the official files first if absent (mnist, cifar10)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize to N x N after a centre crop (celeba64, imagefolder)")
    p.add_argument("--no-cache", action="store_true", help="decode again, ignoring the cache")
    p.set_defaults(func=run, _parser=p)


def run_list(args) -> int:
    from nnlab.data import DATASETS, dataset_summary

    for name in DATASETS.names():
        print(f"{name:12s} {dataset_summary(name)}")
    return 0


def run(args) -> int:
    from nnlab.data import load_dataset

    options = {"download": args.download}
    if args.image_size is not None:
        options["image_size"] = args.image_size
    if args.no_cache:
        options["cache"] = False
    splits = load_dataset(args.name, args.data_dir, **options)
    info = splits.info()
    info.update(mean=list(splits.mean), std=list(splits.std))
    print(json.dumps(info, indent=2))
    return 0
