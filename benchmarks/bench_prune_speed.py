"""Real speed-up of token pruning: CP-ViT, ToMe and AP-ViT at ratio 0.5 against the unpruned ViT, one run.

    python benchmarks/bench_prune_speed.py                                   # vit-small-cifar, random weights
    python benchmarks/bench_prune_speed.py --checkpoint runs/vit-cifar --json runs/bench_prune_speed.json
    python benchmarks/bench_prune_speed.py --model vit-test --repeats 2      # quick check of the script

Targets (issue 13): at batch 64 on CPU, the pruned model's throughput at ratio 0.5 is at least 1.6x
the unpruned model's for CP-ViT (patches alone, and with its heads) and ToMe, and at least 90% of
each one's own FLOP ratio; AP-ViT (fixed-count batching) at least 1.3x; AP-ViT with APT's per-image
threshold (padded batches) is timed beside it without a target. The AP-ViT agents are random
(their threshold is calibrated on the batch), as their weights change which tokens go, not how
many. The reference is the unpruned model (fused attention) measured in
the same process on the same batch; the variants are timed in interleaved rounds (base, cp-vit, tome,
..., base, cp-vit, ...), each round keeping the best of ``--inner`` passes per variant. images/s is
the median over rounds, and a speed-up is the median over rounds of the round's own ratio to the
base, so load from other processes that drifts between rounds cancels. GFLOPs (1e9 MACs per image,
:mod:`nnlab.prune.flops`) and the FLOP ratio (the ideal speed-up) are printed beside the measured
ones. Timing does not depend on the weights (only which tokens go does), so random weights are fine
without ``--checkpoint``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from nnlab.engine.io import write_json
from nnlab.errors import NnlabError
from nnlab.models import create_model
from nnlab.prune import methods
from nnlab.prune.runners import TokenRunner

TARGETS = {"cp-vit": 1.6, "cp-vit-heads": 1.6, "tome": 1.6, "ap-vit": 1.3, "ap-vit-padded": None}
FLOP_SHARE = 0.9  # of the FLOP ratio, for the methods of FLOP_CHECKED
FLOP_CHECKED = ("cp-vit", "cp-vit-heads", "tome")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-small-cifar", help="ViT preset (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="run folder of a trained ViT (nnlab train --out)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--inner", type=int, default=3, help="passes per round (best is kept)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (timing synchronises the GPU)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "threads": torch.get_num_threads(), "load_avg_1min": load, "torch": torch.__version__}


def build(args):
    """The base ViT, its images (B, C, H, W) and the three runners to time."""
    if args.checkpoint:
        from nnlab.prune.sweep import load_base
        from nnlab.prune.common import calibration_batch
        vit, data = load_base(args.checkpoint)
        x, _ = calibration_batch(data, vit.config.image_size, args.batch_size)
    else:
        vit = create_model(args.model, num_classes=10, in_chans=args.in_chans, image_size=args.image_size).eval()
        x = torch.randn(args.batch_size, args.in_chans, args.image_size, args.image_size)
    from nnlab.prune import apvit

    from nnlab.engine.distributed import resolve_device

    device = resolve_device(args.device)
    vit, x = vit.to(device), x.to(device)
    ranges = methods.attention_ranges(vit, x)
    positions = apvit.agent_positions(vit.config.depth)
    torch.manual_seed(0)
    agents = torch.nn.ModuleList(apvit.Agent(vit.config.dim) for _ in positions).eval().to(device)
    runners = {"base": TokenRunner(vit),
               "cp-vit": methods.build_cpvit(vit, args.ratio, ranges, x, methods.CPViTOptions(heads=False)),
               "cp-vit-heads": methods.build_cpvit(vit, args.ratio, ranges, x, methods.CPViTOptions()),
               "tome": methods.build_tome(vit, args.ratio),
               "ap-vit": methods.build_apvit(vit, agents, positions, args.ratio, x),
               "ap-vit-padded": methods.build_apvit(vit, agents, positions, args.ratio, x, fixed_count=False)}
    return vit, x, runners


@torch.no_grad()
def time_interleaved(runners: dict, x: torch.Tensor, repeats: int, inner: int) -> dict[str, list[float]]:
    """Images per second per runner in each of ``repeats`` rounds (the best of ``inner`` passes)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # GPU kernels run asynchronously
    for r in runners.values():  # warm-up
        r(x)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            best = float("inf")
            for _ in range(inner):
                sync()
                t0 = time.perf_counter()
                r(x)
                sync()
                best = min(best, time.perf_counter() - t0)
            samples[name].append(x.shape[0] / best)
    return samples


def paired_speedups(samples: dict[str, list[float]], ref: str = "base") -> dict[str, float]:
    """Median over rounds of (runner's images/s) / (``ref``'s images/s in the same round): load that
    drifts between rounds cancels in each round's ratio."""
    return {k: statistics.median(a / b for a, b in zip(v, samples[ref])) for k, v in samples.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        vit, x, runners = build(args)
    except NnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        for r in runners.values():
            r.reset_stats()
            r(x)
    gflops = {k: r.macs() / 1e9 for k, r in runners.items()}
    achieved = {k: r.achieved_ratio() for k, r in runners.items()}
    samples = time_interleaved(runners, x, args.repeats, args.inner)
    ips = {k: statistics.median(v) for k, v in samples.items()}
    speedups = paired_speedups(samples)
    report = {"model": args.checkpoint or args.model, "batch_size": args.batch_size, "ratio": args.ratio,
              "machine": machine(), "targets": TARGETS, "flop_share": FLOP_SHARE, "methods": {}}
    print(f"{report['model']}, batch {args.batch_size}, ratio {args.ratio}, machine {report['machine']}")
    print(f"{'method':13s} {'img/s':>9s} {'speed-up':>9s} {'GFLOPs':>9s} {'FLOP ratio':>10s} {'achieved':>9s} "
          f"{'heads':>6s}")
    ok = True
    for name, r in runners.items():
        speed, flop = speedups[name], gflops["base"] / gflops[name]
        target = TARGETS.get(name)
        passed = target is None or (speed >= target and (name not in FLOP_CHECKED or speed >= FLOP_SHARE * flop))
        ok &= passed
        report["methods"][name] = {"images_per_s": ips[name], "images_per_s_rounds": samples[name],
                                   "speedup": speed, "gflops": gflops[name],
                                   "flop_ratio": flop, "achieved_ratio": achieved[name],
                                   "heads_kept": r.heads_kept(), "target": target, "meets_target": passed}
        verdict = "" if target is None else ("  ok" if passed else f"  below {target}x or {FLOP_SHARE:.0%} of FLOPs")
        print(f"{name:13s} {ips[name]:9.1f} {speed:8.2f}x {gflops[name]:9.4f} {flop:9.2f}x {achieved[name]:9.3f} "
              f"{r.heads_kept():6.2f}" + verdict)
    if args.json:
        write_json(args.json, report)
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
