"""Training throughput of every model in the zoo, in images/s (forward + backward + SGD step).

    python benchmarks/bench_zoo_throughput.py                      # all models, 3x32x32, batch 64
    python benchmarks/bench_zoo_throughput.py --models lenet5,resnet56 --steps 5 --json runs/zoo.json

Each model trains on one fixed random batch (data loading is not measured) with SGD (momentum
0.9): ``--warmup`` untimed steps, then ``--repeats`` timed runs of ``--steps`` steps; the table
shows the median run. As a reference measured in the same run, the script times a dense fp32
matmul on the same threads; each model's training FLOPs per image (counted with
``torch.utils.flop_counter``: convolutions and matrix products, forward and backward) turn its
throughput into GFLOP/s and a fraction of that matmul rate, which compares across machines
better than images/s alone. The machine (CPU model, cores, torch version, threads, load
average) is printed and written to the JSON file.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from nnlab.engine.io import write_json
from nnlab.errors import NnlabError
from nnlab.models import MODELS, count_parameters, create_model


@dataclass
class ModelResult:
    model: str
    params: int
    images_per_s: float                 # median over repeats
    images_per_s_runs: list[float]
    ms_per_step: float
    train_gflop_per_image: float        # forward + backward, convs and matmuls only
    achieved_gflops: float
    fraction_of_matmul: float           # achieved_gflops / reference matmul GFLOP/s


@dataclass
class Report:
    machine: dict
    settings: dict
    reference_matmul_gflops: float
    results: list[ModelResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Reference: best GFLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` over ``repeats`` timings."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step on x (B, C, H, W), y (B,)."""
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def train_flops_per_image(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one forward + backward pass, per image (x: (B, C, H, W))."""
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def measure(name: str, args, device: torch.device, reference: float) -> ModelResult:
    """Throughput of model ``name`` on a fixed random batch (args.batch_size, C, S, S)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=args.in_chans, image_size=args.image_size).to(device)
    model.train()
    x = torch.randn(args.batch_size, args.in_chans, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    flops = train_flops_per_image(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(args.warmup):
        train_step(model, optimizer, x, y)
    runs = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, x, y)
        _sync(device)
        runs.append(args.batch_size * args.steps / (time.perf_counter() - start))
    ips = statistics.median(runs)
    return ModelResult(name, count_parameters(model), ips, runs, 1000 * args.batch_size / ips,
                       flops / 1e9, flops * ips / 1e9, flops * ips / 1e9 / reference)


def run(args) -> Report:
    """Measure every model in ``args.models`` (default: the whole registry)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = {k: vars(args)[k] for k in ("batch_size", "steps", "warmup", "repeats", "in_chans", "image_size")}
    report = Report(machine_info(device), settings, matmul_gflops(device))
    for name in tqdm(args.models or MODELS.names(), desc="models", disable=None):
        try:
            report.results.append(measure(name, args, device, report.reference_matmul_gflops))
        except NnlabError as exc:  # e.g. a model that does not take this image size
            report.skipped[name] = str(exc)
    report.machine["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return report


def format_report(report: Report) -> str:
    m = report.machine
    lines = [
        f"machine: {m['cpu']} | {m['usable_cores']} usable / {m['logical_cores']} logical cores | "
        f"torch {m['torch']} | {m['threads']} threads | device {m['device']} | "
        f"load {m['load_average_1min']:.2f} before, {m['load_average_1min_after']:.2f} after",
        f"settings: {report.settings}",
        f"reference: fp32 1024x1024 matmul {report.reference_matmul_gflops:.1f} GFLOP/s",
        "",
        f"| {'model':<20} | {'params':>11} | {'images/s':>9} | {'ms/step':>8} | {'GFLOP/img':>9} "
        f"| {'GFLOP/s':>8} | {'of matmul':>9} |",
        f"|{'-' * 22}|{'-' * 12}:|{'-' * 10}:|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|{'-' * 10}:|",
    ]
    for r in report.results:
        lines.append(f"| {r.model:<20} | {r.params:>11,} | {r.images_per_s:>9.1f} | {r.ms_per_step:>8.1f} "
                     f"| {r.train_gflop_per_image:>9.3f} | {r.achieved_gflops:>8.1f} "
                     f"| {r.fraction_of_matmul:>9.1%} |")
    lines += [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model; the median is reported")
    p.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=None,
                   help=f"comma-separated subset of: {', '.join(MODELS.names())}")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    args = p.parse_args(argv)
    for opt in ("batch_size", "steps", "repeats", "in_chans", "image_size"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    unknown = [m for m in args.models or () if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS.names())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        write_json(args.json, asdict(report))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
