"""Functasets: the latents of a whole split, fitted in batches, saved as safetensors.

File layout (one safetensors file; metadata holds the JSON model config and model hash)::

    latents (N, latent_dim) float32    labels (N,) int64    psnr (N,) float32
    inner_mse (N, steps) before each inner step    mse (N,) after the last step

The metadata also records ``fit_seconds`` (the fitting time summed over the chunks, whichever process or
attempt fitted each; data loading and file writing excluded) and ``images_per_s`` (N / fit_seconds), the
fitting throughput of one process.

Fitting is resumable: finished chunks go to ``FILE.parts/chunk-XXXXX.safetensors`` (atomic), and
the final file is assembled from them. ``shard=(i, n)`` fits only chunks ``i, i+n, ...`` into the
shared parts folder, so n processes can split a split; the last one to finish (or a later call
with no shard) assembles the file.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from nnlab.engine.checkpoint import tensors_sha256
from nnlab.engine.io import atomic_write, read_json, write_json
from nnlab.errors import CheckpointError, ConfigError, DataError
from nnlab.functa import meta
from nnlab.functa.model import LatentModulatedSiren, config_hash
from nnlab.functa.parallel import ChunkRunner, chunk_runner

_clock = time.perf_counter  # a module attribute, so that tests can replace the clock


@dataclass
class FitResult:
    """latents (N, D); psnr (N,) per-image PSNR in dB of the clamped reconstruction; inner_mse
    (N, steps) MSE before each inner step; mse (N,) after the last step."""

    latents: torch.Tensor
    psnr: torch.Tensor
    inner_mse: torch.Tensor
    mse: torch.Tensor


def _fit_chunk(model: LatentModulatedSiren, shared: meta.Shared, x: torch.Tensor, steps: int):
    """x (B, C, H, W) -> (latents (B, D), psnr (B,), inner_mse (B, steps), mse (B,))."""
    res = meta.inner_loop(model, x, steps, create_graph=False, shared=shared)
    mse = (res.output.clamp(0, 1) - meta.images_to_targets(x)).pow(2).mean(dim=(1, 2))
    return res.latents, meta.psnr(mse), res.inner_mse, res.mse


_COMPILED = {}


def _chunk_fn(compile: bool):
    if not compile:
        return _fit_chunk
    if "fit" not in _COMPILED:
        _COMPILED["fit"] = torch.compile(_fit_chunk, dynamic=False)
    return _COMPILED["fit"]


@torch.no_grad()
def fit_batch(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, chunk: int | None = None,
              shared: meta.Shared | None = None, compile: bool = False,
              runner: ChunkRunner | None = None) -> FitResult:
    """Fit latents to float images (B, C, H, W) in [0, 1], ``chunk`` images at a time (small
    chunks keep the activations in cache; ``runner`` spreads them over threads). ``compile`` uses
    torch.compile (fused elementwise loops; the first call compiles for a while); a short last
    chunk is then padded to keep one shape. Default chunk: 8 eager, 16 compiled (for mnist-cpu on 2
    CPU cores, 8 was clearly fastest eager; compiled, 16 was 2-13% faster than 8 and 32 slower)."""
    chunk = chunk or (16 if compile else 8)
    shared = shared if shared is not None else meta.shared_terms(model, tuple(images.shape[2:]))
    fn = _chunk_fn(compile)

    def one(x: torch.Tensor) -> list[torch.Tensor]:
        n = len(x)
        if compile and n < chunk:
            x = torch.cat([x, x[-1:].expand(chunk - n, *x.shape[1:])])
        with torch.no_grad():
            return [t[:n] for t in fn(model, shared, x, steps)]

    parts = (runner or ChunkRunner(1)).map(one, images.split(chunk))
    return FitResult(*(torch.cat(t) for t in zip(*parts)))


def fit_images(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, batch_size: int = 256,
               progress: bool = True, compile: bool = False, workers: int = 0,
               runner: ChunkRunner | None = None) -> FitResult:
    """Fit uint8 images (N, C, H, W) batch by batch -> :class:`FitResult` over all N.

    Chunks run on ``runner``, or on ``workers`` single-torch-thread threads (0: torch's thread count).
    """
    model.eval()
    with torch.no_grad():
        shared = meta.shared_terms(model, tuple(images.shape[2:]))
    device = model.out.weight.device
    if runner is None:
        with chunk_runner(1 if device.type != "cpu" else workers) as own:
            return fit_images(model, images, steps, batch_size, progress, compile, runner=own)
    results = [fit_batch(model, images[i:i + batch_size].to(device).float().div_(255), steps, shared=shared,
                         compile=compile, runner=runner)
               for i in tqdm(range(0, len(images), batch_size), desc="fit", disable=None if progress else True)]
    return FitResult(*(torch.cat([getattr(r, f) for r in results]) for f in FitResult.__dataclass_fields__))


def _chunk_path(parts: Path, i: int) -> Path:
    return parts / f"chunk-{i:05d}.safetensors"


def _claim_parts(parts: Path, key: dict[str, str]) -> None:
    """``FILE.parts/fit.json`` records what the chunks there are fitted with (model hash, inner steps,
    chunk size, the images' labels): chunks a killed fit left with other settings are refused, never
    mixed into this fit's file. The first shard to start writes it (the same bytes from any shard)."""
    record = parts / "fit.json"
    if record.is_file():
        old = read_json(record)
        diff = [f"{k}: {old.get(k)} -> {key.get(k)}" for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)]
        if diff:
            raise ConfigError(f"{parts} holds the chunks of another fit ({', '.join(diff)}); fit with those settings "
                              "to finish it, or delete that folder to start over")
    elif any(parts.glob("chunk-*.safetensors")):
        raise ConfigError(f"{parts} holds chunks without a record of their settings (an older nnlab); delete that "
                          "folder to start over")
    else:
        write_json(record, key)


def fit_functaset(model: LatentModulatedSiren, images: torch.Tensor, labels: torch.Tensor,
                  out: str | Path, *, steps: int = 3, chunk_size: int = 1000,
                  shard: tuple[int, int] = (0, 1), meta_info: dict | None = None,
                  compile: bool = False) -> Path | None:
    """Fit a split (images (N, C, H, W) uint8, labels (N,)) into the functaset ``out``.

    Returns ``out`` once the file is complete, or None when other shards still have chunks to do.
    """
    index, count = shard
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size (--chunk-size) must be >= 1 image, got {chunk_size}; the default is 1000")
    if steps < 0:
        raise ConfigError(f"inner steps (--inner-steps) must be >= 0, got {steps}; leave it out to use the run's own")
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    _claim_parts(parts, {"model_hash": config_hash(model), "inner_steps": str(steps), "chunk_size": str(chunk_size),
                         "images": str(len(images)), "labels_sha256": tensors_sha256({"labels": labels}),
                         "chunk_format": "2"})  # 2: chunks record their fit_seconds
    n_chunks = -(-len(images) // chunk_size)
    todo = [i for i in range(index, n_chunks, count) if not _chunk_path(parts, i).exists()]
    for i in tqdm(todo, desc=f"functaset {out.name}", disable=None):
        sl = slice(i * chunk_size, (i + 1) * chunk_size)
        t0 = _clock()
        r = fit_images(model, images[sl], steps, progress=False, compile=compile)
        tensors = {"latents": r.latents, "psnr": r.psnr, "inner_mse": r.inner_mse, "mse": r.mse,
                   "labels": labels[sl], "fit_seconds": torch.tensor([_clock() - t0], dtype=torch.float64)}
        atomic_write(_chunk_path(parts, i), lambda tmp, t=tensors: save_file(
            {k: v.contiguous().cpu() for k, v in t.items()}, tmp))
    if any(not _chunk_path(parts, i).exists() for i in range(n_chunks)):
        return None
    chunks = [load_file(_chunk_path(parts, i)) for i in range(n_chunks)]
    seconds = float(sum(c.pop("fit_seconds").sum() for c in chunks))
    tensors = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    info = {"model_config": json.dumps(asdict(model.config)), "model_hash": config_hash(model),
            "inner_steps": str(steps), "fit_seconds": f"{seconds:.6f}",
            "images_per_s": f"{len(images) / max(seconds, 1e-9):.1f}",
            **{k: str(v) for k, v in (meta_info or {}).items()}}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=info))
    for i in range(n_chunks):
        _chunk_path(parts, i).unlink()
    (parts / "fit.json").unlink()
    parts.rmdir()
    return out


@dataclass
class Functaset:
    """A loaded functaset: latents (N, D), labels (N,), psnr (N,), inner_mse (N, steps) before each
    inner step, mse (N,) after the last (unclamped), metadata."""

    latents: torch.Tensor
    labels: torch.Tensor
    psnr: torch.Tensor
    inner_mse: torch.Tensor
    mse: torch.Tensor
    metadata: dict

    @property
    def images_per_s(self) -> float | None:
        """Fitting throughput of one process (images per second of fitting); None for older files."""
        return float(self.metadata["images_per_s"]) if "images_per_s" in self.metadata else None


def load_functaset(path: str | Path) -> Functaset:
    """Read a functaset written by :func:`fit_functaset`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"functaset {path} does not exist; make it with 'nnlab functa fit'")
    try:
        t = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"functaset {path} is unreadable ({exc}); fit it again") from None
    missing = {"latents", "labels", "psnr"} - set(t)
    if missing:
        raise DataError(f"{path} is not a functaset (missing {sorted(missing)})")
    return Functaset(t["latents"], t["labels"], t["psnr"], t.get("inner_mse", torch.zeros(0)),
                     t.get("mse", torch.zeros(0)), metadata)


def fit_split(run: str | Path, data: str, split: str, out: str | Path, *, data_dir: str | Path | None = None,
              chunk_size: int = 1000, shard: tuple[int, int] = (0, 1), inner_steps: int | None = None,
              device: str = "cpu", compile: bool = False) -> Path | None:
    """Fit split ``split`` of data set ``data`` with the model of run folder ``run`` into ``out``."""
    from nnlab.data import load_dataset
    from nnlab.functa.reconstruct import load_model, load_train_config

    from nnlab.engine.runs import check_out_file

    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got {split!r}")
    check_out_file(out)
    model = load_model(run, device)
    steps = inner_steps if inner_steps is not None else int(load_train_config(run).get("inner_steps", 3))
    images = getattr(load_dataset(data, data_dir), split)
    if images.shape[0] != model.config.out_channels:
        raise ConfigError(f"{data} has {images.shape[0]} channel(s) but run {run} models "
                          f"{model.config.out_channels}; use a run trained on this data set")
    return fit_functaset(model, images.images, images.labels, out, steps=steps, chunk_size=chunk_size,
                         shard=shard, meta_info={"data": data, "split": split, "run": str(run)},
                         compile=compile)
