"""DessiLBI cost on VGG-A: optimiser step and end-to-end training step against torch baselines.

Measured in one run, same model, same inputs:

* optimiser step alone (gradients fixed): DessiLBI (SGD flavour) vs ``torch.optim.SGD(momentum=0.9)``
  and DessiLBI-Adam vs ``torch.optim.Adam``; target ratio <= 1.5;
* one training step (forward + backward + step on a random CIFAR-sized batch), the unit of an epoch;
  target ratio <= 1.1.

Times the vectorised path (``foreach``), the fused step of each flavour (``compiled=True``: the
C++ kernel of :mod:`nnlab.lbi.kernels` for conv weights and ``torch.compile`` for the rest, built
during the warm-up) and, for information, the plain per-parameter reference path
(``foreach=False``). Optimiser steps are timed in interleaved rounds (each baseline with its own
flavour's optimisers, once each per round; median over rounds), because the torch SGD baseline
alone drifts between 3 and 5 ms from one measurement to the next.

    python benchmarks/bench_lbi_step.py                       # the timed measurement (quiet machine)
    python benchmarks/bench_lbi_step.py --rounds 2 --steps 2 --train-steps 2 --warmup 1 \
        --batch-size 8 --width 0.125                        # smoke
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nnlab.lbi import build_slbi, build_slbi_adam
from nnlab.models import create_model


def optimizers(model: nn.Module) -> dict:
    """name -> optimiser over ``model`` (hyperparameters as in the DessiLBI runs)."""
    return {
        "sgd": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "slbi": build_slbi(model, lr=0.1, momentum=0.9, mu=20.0),
        "slbi-compiled": build_slbi(model, lr=0.1, momentum=0.9, mu=20.0, compiled=True),
        "slbi-ref": build_slbi(model, lr=0.1, momentum=0.9, mu=20.0, foreach=False),
        "adam": torch.optim.Adam(model.parameters(), lr=1e-3),
        "slbi-adam": build_slbi_adam(model, lr=1e-3, mu=20.0),
        "slbi-adam-compiled": build_slbi_adam(model, lr=1e-3, mu=20.0, compiled=True),
        "slbi-adam-ref": build_slbi_adam(model, lr=1e-3, mu=20.0, foreach=False),
    }


# optimisers timed together (interleaved): a baseline with the fast paths compared against it; the
# reference paths (slow, with large temporaries) on their own
FAMILIES = (("sgd", "slbi", "slbi-compiled"), ("adam", "slbi-adam", "slbi-adam-compiled"),
            ("slbi-ref", "slbi-adam-ref"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_times(setups: dict, rounds: int, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms of one ``opt.step()`` per optimiser, timed in interleaved rounds (A, B, C, A, B, C, ...)
    so that slow drifts of the machine (memory placement, other load) hit every optimiser alike."""
    for _, opt in setups.values():
        for _ in range(warmup):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (_, opt) in setups.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                opt.step()
            _sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def bench(args) -> dict[str, dict[str, float]]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    def make() -> nn.Module:
        return create_model("vgg-a", num_classes=10, in_chans=3, image_size=32, width=args.width).to(device)

    base = make()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    setups = {}
    for name in optimizers(base):
        model = make()
        model.load_state_dict(base.state_dict())
        opt = optimizers(model)[name]
        nn.functional.cross_entropy(model(x), y).backward()  # fixed gradients for the step timing
        setups[name] = (model, opt)
    steps = {}
    for family in FAMILIES:  # each baseline is timed in rounds with its own flavour only
        steps.update(step_times({n: setups[n] for n in family}, args.rounds, args.steps, args.warmup, device))
    results = {}
    for name, (model, opt) in setups.items():
        def train_step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        full = time_it(train_step, args.train_steps, 2, device)
        results[name] = {"step_ms": steps[name], "train_step_ms": 1e3 * full}
    return results


def report(results: dict[str, dict[str, float]]) -> None:
    print(f"{'optimizer':<20}{'step ms':>10}{'train step ms':>15}{'step ratio':>12}{'train ratio':>13}")
    for name, r in results.items():
        ref = "adam" if "adam" in name else "sgd"
        b = results[ref]
        print(f"{name:<20}{r['step_ms']:>10.2f}{r['train_step_ms']:>15.2f}"
              f"{r['step_ms'] / b['step_ms']:>11.2f}x{r['train_step_ms'] / b['train_step_ms']:>12.2f}x")
    for name, ref in (("slbi", "sgd"), ("slbi-compiled", "sgd"), ("slbi-adam", "adam"),
                      ("slbi-adam-compiled", "adam")):
        s = results[name]["step_ms"] / results[ref]["step_ms"]
        e = results[name]["train_step_ms"] / results[ref]["train_step_ms"]
        print(f"{name} vs {ref}: optimiser step {s:.2f}x (target <= 1.5x: {'met' if s <= 1.5 else 'MISSED'}), "
              f"training step {e:.2f}x (target <= 1.1x: {'met' if e <= 1.1 else 'MISSED'})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds of optimiser steps")
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per round (median of rounds reported)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0, help="VGG-A width multiplier (1 = the real model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"VGG-A width {args.width}, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    report(bench(args))


if __name__ == "__main__":
    main()
