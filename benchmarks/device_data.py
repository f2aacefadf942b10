"""A small CIFAR-10 image-folder archive for the GPU check (``benchmarks/device_check.sh``), whose
machine reaches no data: the first N train and M test JPEGs of each class, copied from the full
archive, as ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (what nnlab's ``cifar10`` loader reads).

    python benchmarks/device_data.py ../shared/data/cifar10/cifar10-jpg.tar.gz runs/device-data/cifar10-small.tar.gz
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections import Counter
from pathlib import Path


def subset(src: Path, dst: Path, train: int, test: int) -> Counter:
    """Copy up to ``train`` / ``test`` images per class from archive ``src`` into ``dst``."""
    limits, kept = {"train": train, "test": test}, Counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".partial")
    with tarfile.open(src) as tin, tarfile.open(tmp, "w:gz") as tout:
        for member in tin:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits:
                continue
            key = parts[:2]
            if kept[key] >= limits[parts[0]]:
                continue
            data = tin.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
            kept[key] += 1
    tmp.replace(dst)
    return kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="the full CIFAR-10 JPEG archive (.tar.gz)")
    p.add_argument("out", type=Path, help="the small archive to write (.tar.gz)")
    p.add_argument("--train", type=int, default=200, help="train images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class")
    args = p.parse_args(argv)
    if not args.source.is_file():
        print(f"error: {args.source} is not a file; give the CIFAR-10 JPEG archive", file=sys.stderr)
        return 2
    kept = subset(args.source, args.out, args.train, args.test)
    print(f"{args.out}: {sum(v for k, v in kept.items() if k[0] == 'train')} train and "
          f"{sum(v for k, v in kept.items() if k[0] == 'test')} test images, {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
