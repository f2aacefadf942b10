"""Overhead of the training engine against a plain loop, measured in the same run.

    python benchmarks/bench_engine_overhead.py                       # lenet5 on mnist-5k, 30 steps
    python benchmarks/bench_engine_overhead.py --model mlp --batch-size 64 --steps 60 --json runs/engine.json

On a shared machine run it with OMP_NUM_THREADS=1 (busy cores make multi-thread timings noise).

Both sides train the same model on the same batches (``BatchLoader`` with the engine's train
transform, SGD momentum 0.9, cross-entropy). The reference is the textbook loop (forward, backward,
step); the engine adds its bookkeeping (finite-loss check, schedule, running sums, callbacks,
metrics, progress). Each side runs ``--repeats`` times, interleaved, after one warm-up; the median
is reported with the ratio engine/reference (1.0 = no overhead). Evaluation and checkpoints are
not timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

from nnlab.data import BatchLoader, load_dataset
from nnlab.data.transforms import train_transform
from nnlab.engine.io import write_json
from nnlab.engine.train import TrainConfig, train
from nnlab.models import create_model


def reference_loop(model_name: str, data, steps: int, batch_size: int) -> float:
    """Images/s of a plain SGD loop over the first ``steps`` batches of epoch 0."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=data.num_classes, in_chans=data.shape[0],
                         image_size=data.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tf = train_transform(data.mean, data.std, image_size=data.shape[1], augment=False, flip=False)
    loader = BatchLoader(data.train, batch_size, shuffle=True, transform=tf)
    loss_fn, seen = nn.CrossEntropyLoss(), 0
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def engine_run(model_name: str, data, steps: int, batch_size: int) -> float:
    """Images/s of ``train()`` over the same batches (its summary's pure loop time)."""
    cfg = TrainConfig(model=model_name, data=data.name, epochs=1, max_steps=steps, batch_size=batch_size,
                      log_every=10, progress=False, device="cpu", test_limit=100)
    with tempfile.TemporaryDirectory() as tmp:
        s = train(cfg, os.path.join(tmp, "run"), data=data).summary
    return s["steps"] * batch_size / s["train_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="mnist-5k")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    data = load_dataset(args.data)
    if args.steps > len(data.train) // args.batch_size:
        ap.error(f"--steps must be at most {len(data.train) // args.batch_size} (one epoch)")
    reference_loop(args.model, data, 3, args.batch_size)  # warm-up
    ref, eng = [], []
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both sides
        ref.append(reference_loop(args.model, data, args.steps, args.batch_size))
        eng.append(engine_run(args.model, data, args.steps, args.batch_size))
    r, e = statistics.median(ref), statistics.median(eng)
    print(f"{args.model} on {args.data}, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"reference loop {r:9.0f} images/s   runs {[round(v) for v in ref]}")
    print(f"engine train() {e:9.0f} images/s   runs {[round(v) for v in eng]}")
    print(f"engine / reference = {e / r:.3f}")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "steps": args.steps,
                               "batch_size": args.batch_size, "reference_images_per_s": ref,
                               "engine_images_per_s": eng, "ratio": e / r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
