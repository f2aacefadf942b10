"""Functa: model, fast vs reference meta-learning, trainer, functasets, CLI."""
from __future__ import annotations

import math

import pytest
import torch

from nnlab.errors import ConfigError
from nnlab.functa import meta, reference
from nnlab.functa.model import FunctaConfig, LatentModulatedSiren, coordinate_grid

VARIANTS = [dict(), dict(meta_sgd=True), dict(meta_sgd=True, meta_sgd_steps=2), dict(modulate_scale=True),
            dict(latent_hidden=[12], meta_sgd=True),
            dict(modulate_scale=True, modulate_shift=False, out_channels=3)]


def tiny(dtype=torch.float64, **kw) -> LatentModulatedSiren:
    kw = {"width": 16, "depth": 4, "latent_dim": 8, **kw}
    return LatentModulatedSiren(FunctaConfig(**kw)).to(dtype)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kw", VARIANTS)
def test_fast_matches_reference_latents_and_meta_gradients(kw, first_order):
    model = tiny(**kw)
    x = torch.rand(3, model.config.out_channels, 5, 6, dtype=torch.float64)
    fast = meta.meta_loss(model, x, 3, first_order=first_order)
    g_fast = torch.autograd.grad(fast.loss, list(model.parameters()))
    ref = reference.meta_loss_reference(model, x, 3, first_order=first_order)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(fast.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        z_fast = meta.inner_loop(model, x, 3).latents
    z_ref = torch.stack([reference.fit_one_reference(model, im, 3, create_graph=False) for im in x])
    assert torch.allclose(z_fast, z_ref.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kw", VARIANTS)
def test_batched_autograd_peer_step_agrees_with_the_per_image_reference(kw):
    """Issue 17: the COIN++-style batched plain-autograd step (the benchmark's peer) computes the
    same second-order meta-gradient as the per-image reference, to 1e-10 in float64."""
    model = tiny(**kw)
    x = torch.rand(3, model.config.out_channels, 5, 6, dtype=torch.float64)
    peer = reference.meta_loss_batched_autograd(model, x, 3)
    ref = reference.meta_loss_reference(model, x, 3)
    assert torch.allclose(peer, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(peer, list(model.parameters())),
                    torch.autograd.grad(ref, list(model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sincos_backward_reuses_its_outputs_and_is_exact_to_second_order():
    """Issue 17 lever: SinCos's backward (g_sin cos u - g_cos sin u from the saved outputs)
    against autograd's, to first and second order in float64; the fast meta-gradient built on it
    agrees with the per-image reference to 1e-10 (must-show 4)."""
    u = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(meta.SinCos.apply, (u,))
    assert torch.autograd.gradgradcheck(meta.SinCos.apply, (u,))
    gs, gc = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    s, c = meta.SinCos.apply(u)
    (g,) = torch.autograd.grad((s * gs + c * gc).sum(), u)
    assert torch.allclose(g, gs * u.cos() - gc * u.sin(), rtol=1e-14, atol=0)
    for kw in (dict(), dict(meta_sgd=True), dict(modulate_scale=True)):
        model = tiny(**kw)
        x = torch.rand(3, 1, 5, 6, dtype=torch.float64)
        fast = torch.autograd.grad(meta.meta_loss(model, x, 3).loss, list(model.parameters()))
        ref = torch.autograd.grad(reference.meta_loss_reference(model, x, 3), list(model.parameters()))
        for a, b in zip(fast, ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_second_order_differs_from_first_order():
    model = tiny(meta_sgd=True)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    g2 = torch.autograd.grad(meta.meta_loss(model, x).loss, model.first.weight)[0]
    g1 = torch.autograd.grad(meta.meta_loss(model, x, first_order=True).loss, model.first.weight)[0]
    assert not torch.allclose(g1, g2)


def test_checkpointing_gives_same_gradients():
    model = tiny(meta_sgd=True)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    g = torch.autograd.grad(meta.meta_loss(model, x).loss, list(model.parameters()))
    gc = torch.autograd.grad(meta.meta_loss(model, x, use_checkpoint=True).loss, list(model.parameters()))
    for a, b in zip(g, gc):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_batch_size_does_not_shrink_inner_step():
    model = tiny()
    x = torch.rand(5, 1, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        alone = meta.inner_loop(model, x[:1], 3).latents
        batch = meta.inner_loop(model, x, 3).latents
    assert torch.allclose(alone[0], batch[0], rtol=1e-10, atol=1e-13)
    assert batch[0].abs().max() > 0


def test_siren_init_and_output_offset():
    model = tiny(dtype=torch.float32, width=64, w0=30.0)
    assert model.first.weight.abs().max() <= 1 / 2
    assert model.hidden[0].weight.abs().max() <= math.sqrt(6 / 64) / 30
    assert model.hidden[0].weight.abs().max() > 0.8 * math.sqrt(6 / 64) / 30
    out = model(torch.zeros(1, 8), coordinate_grid(8))
    assert out.shape == (1, 64, 1)
    assert (out - 0.5).abs().mean() < 0.5


def test_coordinate_grid_pixel_centres_any_size():
    g = coordinate_grid(4)
    assert g.shape == (16, 2)
    assert torch.allclose(g[:4, 1], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(g[::4, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert coordinate_grid((2, 3, 4), 3).shape == (24, 3)
    img = tiny(dtype=torch.float32).render(torch.zeros(2, 8), 13)
    assert img.shape == (2, 1, 13, 13)


def test_render_in_pixel_chunks_equals_one_pass_and_refuses_bad_sizes():
    """render splits the pixels into chunks (bounded memory): the image must be the network's
    one-pass output at the same pixel centres, put back in row-major order."""
    model = tiny(modulate_scale=True)
    z = torch.randn(3, 8, dtype=torch.float64)
    whole = model(z, coordinate_grid((5, 7), dtype=torch.float64))         # (3, 35, 1)
    for chunk in (1, 4, 35, 1000):
        img = model.render(z, (5, 7), chunk_pixels=chunk)
        assert img.shape == (3, 1, 5, 7)
        assert torch.allclose(img.flatten(2).transpose(1, 2), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="positive number of pixels"):
        model.render(z, 0)
    with pytest.raises(ConfigError, match="choose a smaller --size"):
        model.render(z, 100_000)  # 240 GB of output: refused before any allocation


def test_meta_sgd_rates_are_clipped():
    model = tiny(meta_sgd=True)
    with torch.no_grad():
        model.meta_lr[:2] = torch.tensor([-1.0, 5.0], dtype=torch.float64)
    lr = model.inner_lr()
    assert lr[0] == 0 and lr[1] == 1 and ((lr >= 0) & (lr <= 1)).all()


def test_per_step_meta_sgd_rates_are_used_step_by_step():
    """With meta_sgd_steps, inner step k uses rates k and later steps the last set: rates [r, 0, 0] stop
    the latent after step 1, at 3 steps and at 4 (rates shared by all steps, or reused from the first
    set, would move it again)."""
    model = tiny(meta_sgd=True, meta_sgd_steps=3)
    x = torch.rand(2, 1, 5, 6, dtype=torch.float64)
    assert model.meta_lr.shape == (3, 8)
    with torch.no_grad():
        model.meta_lr[1:] = 0.0
        one, three, four = (meta.inner_loop(model, x, k).latents for k in (1, 3, 4))
        ref = reference.fit_one_reference(model, x[0], 3, create_graph=False)
    assert not torch.equal(one, torch.zeros_like(one))
    torch.testing.assert_close(three, one, rtol=0, atol=0)
    torch.testing.assert_close(four, one, rtol=0, atol=0)
    torch.testing.assert_close(ref, one[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(model.inner_lr(7), model.inner_lr(2)) and not torch.equal(model.inner_lr(0), model.inner_lr(1))
    with pytest.raises(ConfigError, match="meta_sgd_steps"):
        FunctaConfig(meta_sgd_steps=-1)
    with pytest.raises(ConfigError, match="--meta-sgd"):
        FunctaConfig(meta_sgd_steps=2)


def test_bad_config_raises_config_error():
    with pytest.raises(ConfigError, match="depth"):
        FunctaConfig(depth=1)
    with pytest.raises(ConfigError, match="modulate_shift"):
        FunctaConfig(modulate_shift=False, modulate_scale=False)


def test_the_batched_autograd_fit_peer_agrees_with_nnlab_fitting():
    """Issue 17's fitting peer (whole batch, autograd inner gradients) gives nnlab's latents."""
    from nnlab.functa.functaset import fit_batch
    from nnlab.functa.model import FunctaConfig, LatentModulatedSiren
    from nnlab.functa.reference import fit_latents_batched_autograd

    torch.manual_seed(0)
    model = LatentModulatedSiren(FunctaConfig(width=16, depth=3, latent_dim=8, meta_sgd=True)).double()
    images = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ours = fit_batch(model, images, 3).latents
    torch.testing.assert_close(fit_latents_batched_autograd(model, images, 3), ours, rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0


@pytest.mark.slow  # a cold compile takes one to two minutes per variant
@pytest.mark.parametrize("kw", [dict(), dict(meta_sgd=True, modulate_scale=True)])
def test_compiled_meta_loss_is_exact_to_second_order(kw):
    """Issue 17 lever: the torch.compile'd meta-loss (fused loops) gives the per-image reference's
    second-order meta-gradient to 1e-10 in float64 (must-show 4)."""
    model = tiny(**kw)
    x = torch.rand(3, model.config.out_channels, 5, 6, dtype=torch.float64)
    fast = meta.CompiledMetaLoss(3)(model, x)
    ref = reference.meta_loss_reference(model, x, 3)
    assert torch.allclose(fast.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast.loss, list(model.parameters())),
                    torch.autograd.grad(ref, list(model.parameters()))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
