"""Figures of generated functa: sample grids, class-conditional grids, latent interpolations.

Images are rendered by the functa run's SIREN at any size and tiled into one PNG array.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nnlab.functa.model import LatentModulatedSiren
from nnlab.functa.reconstruct import _to_uint8, save_grid


@torch.no_grad()
def decode(siren: LatentModulatedSiren, latents: torch.Tensor, size: int, batch: int = 256) -> torch.Tensor:
    """latents (N, D) -> images (N, C, size, size) in [0, 1] (clamped renders)."""
    siren.eval()
    if len(latents) == 0:
        return torch.zeros(0, siren.config.out_channels, size, size)
    return torch.cat([siren.render(z, size).clamp(0, 1) for z in latents.split(batch)])


def tile(images: torch.Tensor, rows: int, pad: int = 2) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1] -> one (C, H', W') grid of ``rows`` rows, white padding."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_tiles(images: torch.Tensor, rows: int, path: str | Path) -> Path:
    """Write ``images`` (N, C, H, W) as a ``rows``-row PNG grid."""
    return save_grid(_to_uint8(tile(images, rows)), path)


def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear interpolation between latents a, b (D,): (steps, D), a first, b last."""
    w = torch.linspace(0, 1, steps)[:, None]
    return (1 - w) * a[None] + w * b[None]


def interpolation_grid(siren: LatentModulatedSiren, pairs: list[tuple[torch.Tensor, torch.Tensor]], size: int,
                       path: str | Path, steps: int = 8) -> Path:
    """One row per latent pair: ``steps`` renders at ``size`` from the first latent to the second."""
    lat = torch.cat([interpolate(a, b, steps) for a, b in pairs])
    return save_tiles(decode(siren, lat, size), len(pairs), path)


def plot_training(run: str | Path, path: str | Path) -> Path:
    """Training loss against minutes from ``run/metrics.jsonl`` (diffusion: eps MSE; flow: nats/dim)."""
    from nnlab.engine.metrics import read_jsonl
    from nnlab.report.figures import plt, save_figure

    recs = [r for r in read_jsonl(Path(run) / "metrics.jsonl") if "loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["minutes"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("training minutes")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
