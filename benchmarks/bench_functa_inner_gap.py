"""How far the 3 learned inner steps leave a latent from its optimum (session 22, issue 17).

A functa's test PSNR is measured after the meta-learned inner steps (3 in every nnlab result). This script
fits test images that way with a trained run's weights, then goes on optimising each latent alone with Adam
(the network frozen), and prints the PSNR at each checkpoint. A large gap says the 3-step inner loop, not
the network's capacity, limits the PSNR, so a recipe change should aim at the inner loop (rates, w0, the
landscape) rather than at a bigger network.

    python benchmarks/bench_functa_inner_gap.py RUN [--data mnist] [--data-dir ../shared/data/mnist]
        [--images 500] [--adam-steps 10,30,100,300] [--adam-lr 1e-2]
"""
from __future__ import annotations

import argparse

import torch

from nnlab.data import load_dataset
from nnlab.functa import meta
from nnlab.functa.reconstruct import load_model, load_train_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a functa run folder (config.yaml and model.safetensors)")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--images", type=int, default=500, help="the first N test images")
    p.add_argument("--adam-steps", default="10,30,100,300", help="report the PSNR after these Adam steps")
    p.add_argument("--adam-lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def adam_from(model, images: torch.Tensor, z0: torch.Tensor, checkpoints: list[int], lr: float) -> dict[int, float]:
    """Optimise latents z0 (B, D) for images (B, C, H, W) in [0, 1] with Adam on the summed per-image MSE,
    the network frozen; returns {steps: mean PSNR (dB)} at each checkpoint."""
    with torch.no_grad():
        shared = meta.shared_terms(model, tuple(images.shape[2:]))
    target = meta.images_to_targets(images)
    z = z0.detach().clone().requires_grad_(True)
    opt, out = torch.optim.Adam([z], lr=lr), {}
    for done in range(max(checkpoints) + 1):  # done: Adam steps taken so far
        mse = (meta.predict(model, shared, z) - target).pow(2).mean(dim=(1, 2))
        if done in checkpoints:
            out[done] = meta.psnr(mse.detach()).mean().item()
        if done == max(checkpoints):
            break
        opt.zero_grad()
        mse.sum().backward()
        opt.step()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    model.requires_grad_(False)
    steps = int(load_train_config(args.run).get("inner_steps", 3))
    images = load_dataset(args.data, args.data_dir).test.images[:args.images].float() / 255
    with torch.no_grad():
        res = meta.inner_loop(model, images, steps, create_graph=False)
    print(f"{args.run}: {len(images)} test images, w0 {model.config.w0:g}, latent {model.config.latent_dim}")
    print(f"  {steps} learned inner steps: {meta.psnr(res.mse).mean().item():.2f} dB")
    for n, db in adam_from(model, images, res.latents, [int(s) for s in args.adam_steps.split(",")],
                           args.adam_lr).items():
        print(f"  then {n} Adam steps (lr {args.adam_lr:g}): {db:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
