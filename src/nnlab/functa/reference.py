"""Plain reference meta-learning: one image at a time, inner gradients from autograd; and the
batched plain-autograd step (the whole batch at once, as COIN++ does it) that the speed benchmark
compares nnlab's fast step against.

Slow but obviously right; :mod:`nnlab.functa.meta` must match them (tests/test_functa.py).
Same conventions: per-image MSE, latents from zero, ``z <- z - lr * dMSE/dz``, outer loss the mean
over images of the per-image MSE after the inner steps.
"""
from __future__ import annotations

import torch

from nnlab.functa.model import LatentModulatedSiren, coordinate_grid


def fit_one_reference(model: LatentModulatedSiren, image: torch.Tensor, steps: int = 3, *,
                      first_order: bool = False, create_graph: bool = True) -> torch.Tensor:
    """image (C, *size) in [0, 1] -> latent (latent_dim,) after ``steps`` inner SGD steps."""
    coords = coordinate_grid(tuple(image.shape[1:]), image.dim() - 1, device=image.device, dtype=image.dtype)
    target = image.flatten(1).t().unsqueeze(0)                       # (1, P, C)
    z = image.new_zeros(1, model.config.latent_dim, requires_grad=True)
    for k in range(steps):
        lr = model.inner_lr(k)
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            loss = (model(zz, coords) - target).pow(2).mean()
            (g,) = torch.autograd.grad(loss, zz, create_graph=create_graph and not first_order)
        z = zz - lr * g.detach() if first_order or not create_graph else zz - lr * g
    return z[0]


def meta_loss_reference(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, *,
                        first_order: bool = False) -> torch.Tensor:
    """images (B, C, *size) -> scalar outer loss (mean over images of the per-image MSE)."""
    losses = []
    for image in images:
        z = fit_one_reference(model, image, steps, first_order=first_order)
        coords = coordinate_grid(tuple(image.shape[1:]), image.dim() - 1, device=image.device, dtype=image.dtype)
        out = model(z.unsqueeze(0), coords)[0]                       # (P, C)
        losses.append((out - image.flatten(1).t()).pow(2).mean())
    return torch.stack(losses).mean()


def fit_latents_batched_autograd(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3
                                 ) -> torch.Tensor:
    """The peer's fitting (functaset writing, COIN++ style): the whole batch's latents from ``steps``
    inner SGD steps, gradients from ``torch.autograd.grad`` (no graph kept between steps, no
    hand-derived backward). images (B, C, *size) in [0, 1] -> latents (B, latent_dim)."""
    size = tuple(images.shape[2:])
    coords = coordinate_grid(size, len(size), device=images.device, dtype=images.dtype)
    target = images.flatten(2).transpose(1, 2)                         # (B, P, C)
    z = images.new_zeros(images.shape[0], model.config.latent_dim)
    for k in range(steps):
        lr = model.inner_lr(k).detach()
        z = z.requires_grad_()
        loss = (model(z, coords) - target).pow(2).mean(dim=(1, 2)).sum()  # each latent: its own image's MSE
        (g,) = torch.autograd.grad(loss, z)
        z = (z - lr * g).detach()
    return z


def meta_loss_batched_autograd(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, *,
                               first_order: bool = False) -> torch.Tensor:
    """The peer's meta-step (EmilienDupont/coinpp style): the whole batch through the model, inner
    gradients from ``torch.autograd.grad(create_graph=True)``, no per-image loop and no hand-derived
    backward. images (B, C, *size) -> scalar outer loss (mean over images of the per-image MSE)."""
    size = tuple(images.shape[2:])
    coords = coordinate_grid(size, len(size), device=images.device, dtype=images.dtype)
    target = images.flatten(2).transpose(1, 2)                         # (B, P, C)
    z = images.new_zeros(images.shape[0], model.config.latent_dim, requires_grad=True)
    for k in range(steps):
        lr = model.inner_lr(k)
        # per-image MSE summed over images: each latent gets its own image's gradient
        loss = (model(z, coords) - target).pow(2).mean(dim=(1, 2)).sum()
        (g,) = torch.autograd.grad(loss, z, create_graph=not first_order)
        z = z - lr * g
    return (model(z, coords) - target).pow(2).mean(dim=(1, 2)).mean()
