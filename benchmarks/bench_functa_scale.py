"""A/B of the scale-modulated meta-step (session 21): the fast path with the FiLM scale folded into a
per-image weight in the backward pass and w0 (a scale + shift) in one pass, against the previous code (the
scale multiplied into every (B, P, W) activation, kept below as ``unfolded_*``), in one process,
interleaved rounds of nnlab's trainer step.

    python benchmarks/bench_functa_scale.py [--rounds 6] [--repeat 5] [--latent-dim 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_functa_sincos import interleaved_ms  # noqa: E402  (the interleaved A/B of trainer steps)

from nnlab.functa import meta  # noqa: E402
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren  # noqa: E402


def unfolded_layer_arg(model, shared, shift, scale, i, h):
    """meta._layer_arg before session 21 (scale case): three passes over (B, P, W) after the GEMM."""
    if scale is None:
        return FOLDED[0](model, shared, shift, scale, i, h)
    a = shared.pre1.unsqueeze(0) if i == 0 else torch.matmul(h, model.hidden[i - 1].weight.t()) + model.hidden[i - 1].bias
    u = a * scale[:, None, i]
    if shift is not None:
        u = u + shift[:, None, i]
    return a, model.config.w0 * u


def unfolded_backprop(model, saved, scale, g_h):
    """meta._backprop before session 21: the scale multiplied into g_u before each GEMM."""
    w0 = model.config.w0
    for i in reversed(range(len(saved))):
        a, cos = saved[i]
        g_u = g_h * cos
        yield g_u, a
        if i > 0:
            g = g_u if scale is None else g_u * scale[:, None, i]
            g_h = torch.matmul(g, w0 * model.hidden[i - 1].weight)


FOLDED = (meta._layer_arg, meta._backprop)
UNFOLDED = (unfolded_layer_arg, unfolded_backprop)


def _use(fns) -> None:
    meta._layer_arg, meta._backprop = fns


def ab(latent_dim: int, rounds: int, repeat: int) -> dict[str, list[float]]:
    """ms per trainer step (depth 5, width 64, batch 16, 28 x 28) for each version, interleaved."""
    torch.manual_seed(0)
    model = LatentModulatedSiren(FunctaConfig(width=64, depth=5, latent_dim=latent_dim, meta_sgd=True,
                                              modulate_scale=True))
    try:
        return interleaved_ms(model, torch.rand(16, 1, 28, 28), {"folded": lambda: _use(FOLDED),
                                                                "unfolded": lambda: _use(UNFOLDED)}, rounds, repeat)
    finally:
        _use(FOLDED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--latent-dim", type=int, default=256)
    args = p.parse_args(argv)
    res = ab(args.latent_dim, args.rounds, args.repeat)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"scale-modulated step, latent {args.latent_dim}, {torch.get_num_threads()} threads: folded "
          f"{med['folded']:.0f} ms, unfolded {med['unfolded']:.0f} ms (medians of {args.rounds} rounds): "
          f"{med['unfolded'] / med['folded']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
