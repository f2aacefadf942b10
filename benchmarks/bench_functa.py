"""Functa speed: fast batched meta-step vs the plain reference, and functaset fitting throughput.

    python benchmarks/bench_functa.py [--data-dir ../shared/data/mnist] [--preset mnist-cpu]

Prints, in one run and on the same batch and config: the wall time of one meta-training step
(second-order, 3 inner steps) for the fast path and the reference, and their ratio (target >= 2x);
then fitting throughput in images/s (3 inner steps, no outer gradient) for the eager fast path,
the torch.compile'd fast path and the reference (target >= 1,000 images/s for mnist-cpu). Also
prints the process CPU seconds per image, which is steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from nnlab.functa import meta, reference
from nnlab.functa.functaset import fit_images
from nnlab.functa.model import LatentModulatedSiren
from nnlab.functa.presets import get_preset


def timed(fn, repeat: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per call, after one warm-up call."""
    fn()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - w) / repeat, (time.process_time() - c) / repeat


def load_images(data_dir: str | None, n: int) -> torch.Tensor:
    """(n, 1, 28, 28) uint8: MNIST test images if data_dir is given, else the embedded digits."""
    from nnlab.data import load_dataset

    splits = load_dataset("mnist", data_dir) if data_dir else load_dataset("mnist-5k")
    return splits.test.images[:n]


def bench_meta_step(model: LatentModulatedSiren, x: torch.Tensor, steps: int, repeat: int) -> dict:
    def fast():
        model.zero_grad()
        meta.meta_loss(model, x, steps).loss.backward()

    def ref():
        model.zero_grad()
        reference.meta_loss_reference(model, x, steps).backward()

    (fw, fc), (rw, rc) = timed(fast, repeat), timed(ref, max(1, repeat // 2))
    return {"batch": len(x), "fast_s": fw, "reference_s": rw, "speedup": rw / fw,
            "fast_cpu_s": fc, "reference_cpu_s": rc, "trainer_s": bench_trainer_step(model, x, repeat)}


def bench_trainer_step(model: LatentModulatedSiren, x: torch.Tensor, repeat: int) -> float:
    """Seconds per trainer step (fast path in chunks of 8 on single-torch-thread workers, + Adam)."""
    from nnlab.functa.parallel import chunk_runner
    from nnlab.functa.presets import MetaTrainConfig
    from nnlab.functa.trainer import TrainState, meta_step

    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=0.0))
    cfg = MetaTrainConfig(batch_size=len(x))
    with chunk_runner(0) as runner:
        return timed(lambda: meta_step(state, x, cfg, runner), repeat)[0]


def bench_fit(model: LatentModulatedSiren, images: torch.Tensor, steps: int) -> dict:
    out = {}
    for name, kw in (("eager", {}), ("compiled", {"compile": True})):
        fit_images(model, images[:64], steps, progress=False, **kw)       # warm-up / compile
        w, c = time.perf_counter(), time.process_time()
        fit_images(model, images, steps, progress=False, **kw)
        w, c = time.perf_counter() - w, time.process_time() - c
        out[name] = {"images_per_s": len(images) / w, "cpu_ms_per_image": 1000 * c / len(images)}
    few = images[:32]
    w = time.perf_counter()
    for im in few.float().div(255):
        reference.fit_one_reference(model, im, steps, create_graph=False)
    out["reference"] = {"images_per_s": len(few) / (time.perf_counter() - w)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mnist-cpu")
    ap.add_argument("--data-dir", help="MNIST folder (default: the embedded mnist-5k digits)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fit-images", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    model = LatentModulatedSiren(preset.model)
    images = load_images(args.data_dir, max(args.fit_images, args.batch))
    steps = preset.train.inner_steps
    print(f"preset {args.preset}: {preset.description}; torch threads {torch.get_num_threads()}")
    step = bench_meta_step(model, images[:args.batch].float() / 255, steps, args.repeat)
    print(f"meta-step (batch {step['batch']}, {steps} inner steps, second order): fast {step['fast_s']:.3f} s, "
          f"reference {step['reference_s']:.3f} s -> {step['speedup']:.1f}x faster (target >= 2x)")
    print(f"trainer step (fast path in chunks of 8 on worker threads, + Adam): {step['trainer_s']:.3f} s "
          f"-> {step['reference_s'] / step['trainer_s']:.1f}x faster than the reference")
    fit = bench_fit(model, images[:args.fit_images], steps)
    for name, r in fit.items():
        extra = f", {r['cpu_ms_per_image']:.2f} CPU-ms/image" if "cpu_ms_per_image" in r else ""
        print(f"fit {name:9s}: {r['images_per_s']:8.0f} images/s{extra}")
    print(f"fit target >= 1000 images/s: best {max(r['images_per_s'] for r in fit.values()):.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta_step": step, "fit": fit, "preset": args.preset}, f, indent=1)


if __name__ == "__main__":
    main()
