"""bf16 autocast and channels-last memory against float32, for the CPU ViT's teacher and student.

    python benchmarks/bench_precision.py                        # cnn-fast-cifar and vit-cifar-cpu, 2 threads
    python benchmarks/bench_precision.py --models cnn-fast-cifar --json runs/bench/precision.json
    python benchmarks/bench_precision.py --rounds 1 --steps 1 --batch-size 8   # quick check of the script

For each model, images/s of the eval forward and of a training step (SGD with momentum, cross-entropy,
random data, batch 128) in four variants: float32, float32 in
channels-last memory, bf16 autocast, bf16 autocast in channels-last memory. The reference is float32,
measured in the same process; the variants run in interleaved rounds and each figure is the median over
rounds, with the ratio to float32 of the same round. It also times a 1024^3 matmul in both precisions.
bf16 pays only where the CPU computes it natively (AMX or AVX512-BF16,
:func:`nnlab.engine.precision.native_bf16`, printed); elsewhere PyTorch emulates it and it is slower.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nnlab.engine.io import write_json
from nnlab.engine.precision import bf16_autocast, native_bf16
from nnlab.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_zoo_throughput import machine_info, matmul_gflops  # noqa: E402  (the zoo benchmark's machine and peak)

VARIANTS = {"fp32": (False, False), "fp32-cl": (False, True), "bf16": (True, False), "bf16-cl": (True, True)}
OPTIONS = {"vit-cifar-cpu": {"stem": [64, 128], "patch_dropout": 0.5}}   # the distilled base's student


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn-fast-cifar,vit-cifar-cpu", help="comma-separated model names")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per variant and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def images_per_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, train: bool,
                 steps: int) -> float:
    """Images/s of ``steps`` eval forwards or training steps on x (B, C, H, W), y (B,), after one untimed."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None

    def once():
        if not train:
            with torch.no_grad(), bf16_autocast(bf16, "cpu"):
                model.eval()(x)
            return
        with bf16_autocast(bf16, "cpu"):
            logits = model.train()(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    once()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    return steps * len(x) / (time.perf_counter() - start)


def bench_model(name: str, args) -> dict:
    """Median images/s and ratio to float32 for each variant x {forward, step}."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3, image_size=32, **OPTIONS.get(name, {}))
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    rows = {(v, k): [] for v in VARIANTS for k in ("forward", "step")}
    for _ in range(args.rounds):
        for variant, (bf16, cl) in VARIANTS.items():
            fmt = torch.channels_last if cl else torch.contiguous_format
            model, xv = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            rows[variant, "forward"].append(images_per_s(model, xv, y, bf16, False, 2 * args.steps))
            rows[variant, "step"].append(images_per_s(model, xv, y, bf16, True, args.steps))
    out = {}
    for (variant, kind), speeds in rows.items():
        ratios = [s / r for s, r in zip(speeds, rows["fp32", kind])]
        out[f"{variant}/{kind}"] = {"images_per_s": statistics.median(speeds), "ratio": statistics.median(ratios)}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    result = {"machine": {**machine_info(cpu), "native_bf16": native_bf16(cpu)},
              "matmul_gflops": {"fp32": matmul_gflops(cpu), "bf16": matmul_gflops(cpu, dtype=torch.bfloat16)}}
    print(f"{result['machine']}\n1024^3 matmul: {result['matmul_gflops']['fp32']:.0f} GFLOP/s float32, "
          f"{result['matmul_gflops']['bf16']:.0f} bf16")
    for name in args.models.split(","):
        result[name] = bench_model(name, args)
        for key, row in result[name].items():
            print(f"{name:16s} {key:16s} {row['images_per_s']:8.0f} images/s  {row['ratio']:5.2f}x float32")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
