"""Cost of the landscape probes: training time with probes against plain training, same run.

    python benchmarks/bench_landscape_probe.py                        # vgg-a-bn x0.25, CIFAR-10 if found
    python benchmarks/bench_landscape_probe.py --data mnist-5k --width 0.0625 --steps 12 --every 3
    python benchmarks/bench_landscape_probe.py --json runs/bench_landscape.json

Target: with probes every 30 steps at 8 step sizes, total training time at most 1.5x plain
training. Both variants run through the engine (``nnlab.engine.train.train``) on the same config
(plain SGD, batch 128, ``--steps`` optimiser steps, no evaluation cost counted: the figure is the
engine's ``train_time_s``), alternating plain / probed ``--repeats`` times; the median of each is
compared. A reference measured in the same run is the plain training itself. On a busy machine
the end-to-end times drift with the load, so the script also times training steps and probes
alternately in one loop (``interleaved``: median step, median probe, and the ratio they imply),
and prints the ideal ratio 1 + (step sizes + restore) / every (each step size costs one forward and
one backward, like a training step) so a ratio far above it points at overhead. The machine
(CPU, threads, load average) is printed and written to the JSON file.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnlab.engine.io import write_json
from nnlab.errors import NnlabError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg-a-bn")
    p.add_argument("--width", type=float, default=0.25, help="vgg-a width multiplier (the reduced schedule's)")
    p.add_argument("--data", default=None, help="default: cifar10 if --data-dir holds it, else mnist-5k")
    p.add_argument("--data-dir", default=os.environ.get("NNLAB_SHARED_DATA_CIFAR", "../shared/data/cifar10"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per timed run")
    p.add_argument("--every", type=int, default=30)
    p.add_argument("--eta-count", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def timed_run(args, data, probed: bool, folder: Path) -> float:
    """Seconds of training (engine's train_time_s) for ``args.steps`` steps, with or without probes."""
    from nnlab.engine.train import TrainConfig, train
    from nnlab.landscape.callback import LandscapeProbe
    from nnlab.landscape.probe import default_etas

    cfg = TrainConfig(model=args.model, model_options={"width": args.width}, data=data.name,
                      epochs=10_000, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      momentum=0.0, weight_decay=0.0, schedule="constant", augment=True, flip=True,
                      test_limit=args.batch_size, log_every=10_000, progress=False)
    callbacks = [LandscapeProbe(every=args.every, eta_factors=default_etas(1.0, args.eta_count))] if probed else []
    return float(train(cfg, folder, callbacks=callbacks, data=data).summary["train_time_s"])


def interleaved(args, data, rounds: int = 6) -> tuple[float, float]:
    """Median seconds of one training step and of one probe, timed alternately in one loop (robust
    to load that drifts on a shared machine): ``rounds`` x (``every`` steps, then one probe)."""
    import torch.nn.functional as F

    from nnlab.landscape.probe import default_etas, landscape_step
    from nnlab.models import create_model

    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.shape[0],
                         image_size=data.shape[1], width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    x = data.train.images[:args.batch_size].float().div(255)
    y = data.train.labels[:args.batch_size]
    steps, probes = [], []
    for _ in range(rounds):
        for _ in range(args.every):
            t = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append(time.perf_counter() - t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        t = time.perf_counter()
        landscape_step(model, F.cross_entropy, x, y, default_etas(args.lr, args.eta_count))
        probes.append(time.perf_counter() - t)
    return statistics.median(steps), statistics.median(probes)


def load(args):
    from nnlab.data import load_dataset

    name = args.data or ("cifar10" if Path(args.data_dir).exists() else "mnist-5k")
    return load_dataset(name, args.data_dir if name != "mnist-5k" else None)


def end_to_end(args, data) -> dict[str, list[float]]:
    """Engine train_time_s of plain and probed runs, alternating, ``args.repeats`` times each."""
    times: dict[str, list[float]] = {"plain": [], "probed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for kind in ("plain", "probed"):
                t = timed_run(args, data, kind == "probed", Path(tmp) / f"{kind}-{i}")
                times[kind].append(t)
                print(f"run {i + 1}/{args.repeats} {kind:>6}: {t:8.2f} s", file=sys.stderr)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load(args)
        times = end_to_end(args, data)
        step_s, probe_s = interleaved(args, data)
    except NnlabError as exc:
        print(f"bench_landscape_probe: error: {exc}", file=sys.stderr)
        return 2
    plain, probed = statistics.median(times["plain"]), statistics.median(times["probed"])
    estimate = 1 + probe_s / (args.every * step_s)
    probes = -(-args.steps // args.every)
    ideal = 1 + probes * args.eta_count / args.steps
    report = {"machine": machine(), "settings": vars(args) | {"data": data.name},
              "plain_s": plain, "probed_s": probed, "ratio": probed / plain, "ideal_ratio": ideal,
              "target_ratio": 1.5, "runs": times, "probes_per_run": probes, "step_s": step_s,
              "probe_s": probe_s, "interleaved_ratio": estimate}
    print(f"data {data.name}, model {args.model} width {args.width}, batch {args.batch_size}, "
          f"{args.steps} steps, probe every {args.every} steps at {args.eta_count} step sizes")
    print(f"plain training : {plain:8.2f} s (median of {args.repeats})")
    print(f"with probes    : {probed:8.2f} s")
    print(f"ratio          : {probed / plain:8.3f}  (target <= 1.5; ideal {ideal:.3f}: "
          f"{probes} probes x {args.eta_count} forward+backward)")
    print(f"interleaved    : step {1000 * step_s:.0f} ms, probe {1000 * probe_s:.0f} ms "
          f"({probe_s / step_s:.2f} steps) -> ratio {estimate:.3f} at every {args.every}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
