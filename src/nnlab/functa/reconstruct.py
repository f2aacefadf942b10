"""Load a trained functa run, and draw originals beside reconstructions at any resolution."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nnlab.config import from_dict
from nnlab.engine.runs import RunDir
from nnlab.engine.trained import load_weights
from nnlab.errors import CheckpointError, ConfigError
from nnlab.functa.functaset import fit_images
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren


def load_model(run: str | Path, device: str | torch.device = "cpu") -> LatentModulatedSiren:
    """The meta-learned model of run folder ``run``: config.yaml plus the latest checkpoint, or
    ``model.safetensors`` (the final weights alone, as published runs ship them)."""
    rd = RunDir(run, create=False) if Path(run).is_dir() else None
    if rd is None:
        raise CheckpointError(f"run folder {run} does not exist; train one with 'nnlab functa train'")
    config = rd.load_config()
    if not isinstance(config.get("model"), dict):
        what = f"its model is {config['model']!r}" if "model" in config else "config.yaml has no 'model' section"
        raise CheckpointError(f"{run} is not a functa run ({what}); pass a folder written by 'nnlab functa train'")
    model = LatentModulatedSiren(from_dict(FunctaConfig, config["model"]))
    try:
        model.load_state_dict(load_weights(rd))
    except RuntimeError:
        raise CheckpointError(f"the weights in {run} do not match its config.yaml; use the run's own files") from None
    return model.to(device).eval()


def load_train_config(run: str | Path) -> dict:
    return RunDir(run, create=False).load_config().get("train", {})


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W) or (H, W, 3) uint8."""
    a = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return a[..., 0] if a.shape[2] == 1 else a


def upsample_nearest(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size, size) by nearest neighbour (to show originals beside renders)."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")


def reconstruction_grid(model: LatentModulatedSiren, images: torch.Tensor, size: int, steps: int = 3,
                        pad: int = 2) -> np.ndarray:
    """uint8 images (N, C, h, w) -> grid array: row 1 originals (nearest-upsampled to ``size``),
    row 2 reconstructions rendered at ``size`` x ``size`` from the fitted latents."""
    fit = fit_images(model, images, steps, progress=False)
    with torch.no_grad():
        rec = model.render(fit.latents, size).clamp(0, 1)                   # (N, C, size, size)
    orig = upsample_nearest(images.float() / 255, size)
    n, c = images.shape[:2]
    grid = torch.ones(c, 2 * size + 3 * pad, n * (size + pad) + pad)
    for i in range(n):
        x0 = pad + i * (size + pad)
        grid[:, pad:pad + size, x0:x0 + size] = orig[i]
        grid[:, 2 * pad + size:2 * pad + 2 * size, x0:x0 + size] = rec[i]
    return _to_uint8(grid)


def save_grid(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def reconstruct_run(run: str | Path, data: str, out: str | Path, *, data_dir: str | Path | None = None,
                    split: str = "test", count: int = 8, sizes: list[int] | None = None) -> list[Path]:
    """Write ``out/reconstruction-{size}.png`` for each size: the first ``count`` images of a split."""
    from nnlab.data import load_dataset

    if count < 1:  # images[:-2] would silently draw all but two images of the split
        raise ConfigError(f"count (--count) must be >= 1 image, got {count}")
    model = load_model(run)
    steps = int(load_train_config(run).get("inner_steps", 3))
    images = getattr(load_dataset(data, data_dir), split).images[:count]
    sizes = sizes or [images.shape[-1]]
    return [save_grid(reconstruction_grid(model, images, s, steps), Path(out) / f"reconstruction-{s}.png")
            for s in sizes]
