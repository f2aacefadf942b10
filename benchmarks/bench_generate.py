"""Sampling speed of the generative functa models, in latents/s, all measured in one run.

    python benchmarks/bench_generate.py                                  # default-size models, latent 128
    python benchmarks/bench_generate.py --gen runs/gen-mnist-diffusion   # a trained generator's size
    python benchmarks/bench_generate.py --json runs/bench_generate.json

Rows: the diffusion model's full ancestral chain (DDPM, all T training timesteps), its fast
deterministic sampler (DDIM at 100 and 50 steps), the flow (one inverse pass) and the gaussian
baseline (one matrix product). The reference measured in the same run is the full chain: the
speed-up column is each sampler's latents/s over the full chain's. Weights do not change the cost,
so without ``--gen`` freshly initialised models of the default size are timed. The decoding by the
SIREN is not included (it is the same for every model).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from nnlab.engine.io import write_json
from nnlab.functa.classify import Normalizer
from nnlab.functa.generate.model import GenerateConfig, Generator, build_net, load_generator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gen", help="a generator folder (nnlab functa generate); default: default-size models")
    p.add_argument("--dim", type=int, default=128, help="latent size without --gen")
    p.add_argument("--n", type=int, default=2000, help="latents per timed call")
    p.add_argument("--chain-n", type=int, default=500, help="latents per timed call of the full chain")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def make(config: GenerateConfig, dim: int, num_classes: int = 0) -> Generator:
    net, sched = build_net(config, dim, num_classes)
    if config.model == "gaussian":
        net.fit(torch.randn(4 * dim, dim))
    return Generator(config, net.eval(), Normalizer(torch.zeros(dim), torch.ones(dim)), num_classes, sched)


def rate(gen: Generator, n: int, repeats: int) -> float:
    """Median latents/s of ``repeats`` calls of ``gen.sample(n)`` after one warm-up call."""
    gen.sample(min(n, 64))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        gen.sample(n, seed=r)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gen:
        base = load_generator(Path(args.gen) / "model.safetensors")
        diff_cfg, dim, k = base.config, base.dim, base.num_classes
    else:
        diff_cfg, dim, k = GenerateConfig(), args.dim, 0
    diffusion = make(replace(diff_cfg, model="diffusion"), dim, k)
    rows = [("diffusion, full chain (DDPM)", replace(diffusion, config=replace(diff_cfg, sampler="ddpm")),
             args.chain_n)]
    for steps in (100, 50):
        rows.append((f"diffusion, DDIM {steps} steps",
                     replace(diffusion, config=replace(diff_cfg, sampler="ddim", sample_steps=steps)), args.n))
    rows.append(("flow", make(replace(diff_cfg, model="flow"), dim, k), args.n))
    rows.append(("gaussian", make(GenerateConfig(model="gaussian"), dim), args.n))
    results = {name: rate(gen, n, args.repeats) for name, gen, n in rows}
    ref = results[rows[0][0]]
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; latent {dim}, "
          f"T={diff_cfg.timesteps}, width {diff_cfg.width}, blocks {diff_cfg.blocks}, classes {k}")
    print(f"{'sampler':34s} {'latents/s':>12s} {'x full chain':>13s}")
    for name, value in results.items():
        print(f"{name:34s} {value:12.1f} {value / ref:13.1f}")
    if args.json:
        write_json(args.json, {"latents_per_s": results, "dim": dim, "threads": torch.get_num_threads(),
                               "timesteps": diff_cfg.timesteps, "classes": k})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
