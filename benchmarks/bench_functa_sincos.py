"""A/B of issue 17's first lever: nnlab's trainer meta-step with :class:`nnlab.functa.meta.SinCos`
(sine and cosine in one node whose backward reuses both) against plain ``torch.sin`` / ``torch.cos``
(whose backwards recompute the other function), in one process, interleaved rounds.

    python benchmarks/bench_functa_sincos.py [--rounds 6] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_functa_peers as peers  # noqa: E402  (its configs: COIN++'s and mnist-cpu)

from nnlab.functa import meta  # noqa: E402
from nnlab.functa.parallel import chunk_runner  # noqa: E402
from nnlab.functa.presets import MetaTrainConfig  # noqa: E402
from nnlab.functa.trainer import TrainState, meta_step  # noqa: E402


def plain_sincos(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sin(u), torch.cos(u)


def interleaved_ms(model, x: torch.Tensor, variants: dict, rounds: int, repeat: int) -> dict[str, list[float]]:
    """ms per trainer step (3 inner steps, batch x) under each variant, ``rounds`` interleaved rounds of
    ``repeat`` steps. ``variants``: name -> a function that switches that variant on (called before each
    of its rounds; the caller restores the code afterwards)."""
    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=1e-6))
    cfg, out = MetaTrainConfig(batch_size=len(x), inner_steps=3), {k: [] for k in variants}
    with chunk_runner(0) as runner:
        for _ in range(rounds):
            for key, switch_on in variants.items():
                switch_on()
                meta_step(state, x, cfg, runner)  # warm-up after the switch
                t = time.perf_counter()
                for _ in range(repeat):
                    meta_step(state, x, cfg, runner)
                out[key].append(1000 * (time.perf_counter() - t) / repeat)
    return out


def ab(name: str, rounds: int, repeat: int) -> dict[str, list[float]]:
    """ms per trainer step with each sincos, ``rounds`` interleaved rounds of ``repeat`` steps."""
    model, x = peers._model_and_batch(name)
    fused = meta.sincos
    try:
        return interleaved_ms(model, x, {"SinCos": lambda: setattr(meta, "sincos", fused),
                                         "plain": lambda: setattr(meta, "sincos", plain_sincos)}, rounds, repeat)
    finally:
        meta.sincos = fused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    for name in peers.CONFIGS:
        res = ab(name, args.rounds, args.repeat)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{name:13s} SinCos {med['SinCos']:.0f} ms, plain {med['plain']:.0f} ms (medians, "
              f"{torch.get_num_threads()} threads): {med['plain'] / med['SinCos']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
