"""Fast batched meta-learning for :class:`LatentModulatedSiren` (no per-image Python loop).

The inner loop needs d(loss_b)/d(z_b) for every image b. Instead of asking autograd for it
(``autograd.grad(..., create_graph=True)``, which builds a second graph of generic backward
nodes), :func:`latent_grad` writes the backward pass of the sine MLP by hand with ordinary torch
ops: sines and cosines come from one forward, no weight gradients are formed, and the first
layer's ``sin(w0 (W x + b + shift))`` is expanded with the angle-addition formula, because
``W x + b`` is the same for every image. The hand-written gradient is itself differentiable, so
the outer ``backward()`` gives the exact second-order meta-gradient (first-order on request).

Loss convention: each image's loss is its own mean squared error over pixels and channels, and
the inner step uses the gradient of the *sum* over images, so batch size never shrinks the step.
The outer (meta) loss is the mean over images of the per-image MSE after the inner steps.
:mod:`nnlab.functa.reference` holds the plain per-image implementation these must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from nnlab.functa.model import LatentModulatedSiren, coordinate_grid


@dataclass
class InnerResult:
    """latents: (B, latent_dim) after the inner steps; inner_mse: (B, steps) per-image MSE *before*
    each step; mse: (B,) per-image MSE after the last step, of output (B, P, C), the unclamped
    reconstruction at the latents."""

    latents: torch.Tensor
    inner_mse: torch.Tensor
    mse: torch.Tensor
    output: torch.Tensor


@dataclass
class Shared:
    """Per-resolution quantities shared by all images: coords (P, in_dims); s1, c1 (P, W) the sine
    and cosine of w0 * (W_1 x + b_1); pre1 (P, W) = W_1 x + b_1."""

    coords: torch.Tensor
    pre1: torch.Tensor
    s1: torch.Tensor
    c1: torch.Tensor


def images_to_targets(images: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) in [0, 1] -> targets (B, H*W, C) in the coordinate grid's order."""
    return images.flatten(2).transpose(1, 2)


def shared_terms(model: LatentModulatedSiren, size: tuple[int, ...]) -> Shared:
    """The first layer's image-independent terms at resolution ``size`` (e.g. (28, 28))."""
    w = model.out.weight
    coords = coordinate_grid(size, len(size), device=w.device, dtype=w.dtype)
    pre1 = model.first(coords)
    u = model.config.w0 * pre1
    return Shared(coords, pre1, torch.sin(u), torch.cos(u))


class SinCos(torch.autograd.Function):
    """(sin u, cos u) of one tensor, with a backward that reuses both outputs:
    dL/du = dL/dsin * cos u - dL/dcos * sin u. Plain autograd recomputes cos u for sin's backward
    and sin u for cos's, two more transcendental passes per sine layer and inner step of every
    meta-gradient (on (B P, W) activations a sine costs about as much as the layer's W x W GEMM).
    The backward is made of differentiable ops on the saved outputs, so higher orders still work."""

    @staticmethod
    def forward(ctx, u):
        s, c = torch.sin(u), torch.cos(u)
        ctx.save_for_backward(s, c)
        return s, c

    @staticmethod
    def backward(ctx, g_sin, g_cos):
        s, c = ctx.saved_tensors
        if g_sin is None:
            return -g_cos * s
        return g_sin * c if g_cos is None else torch.addcmul(g_sin * c, g_cos, s, value=-1.0)


def sincos(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin u, cos u), same shape as u; through :class:`SinCos` when a graph is being recorded."""
    if torch.is_grad_enabled() and u.requires_grad:
        return SinCos.apply(u)
    return torch.sin(u), torch.cos(u)


def _first_layer_shift_only(model, shared, shift):
    """The first sine layer without scales, (sin, cos) each (B, P, W): sin(A + B) = sin A cos B +
    cos A sin B, with A = w0 (W_1 x + b_1) shared by all images and B = w0 shift (B, 1, W)."""
    w0 = model.config.w0
    sb, cb = torch.sin(w0 * shift[:, 0]).unsqueeze(1), torch.cos(w0 * shift[:, 0]).unsqueeze(1)
    return torch.addcmul(shared.s1 * cb, shared.c1, sb), torch.addcmul(shared.c1 * cb, shared.s1, sb, value=-1.0)


def _layer_arg(model, shared, shift, scale, i, h):
    """Sine layer i's argument for a batch: (pre-activation a or None, u), u (B, P, W).

    Shift-only layers fold w0 into the weights (u = h (w0 W)^T + w0 (b + shift), one batched
    GEMM); with scales, a = W h + b (kept: the scale gradient needs it) and u = w0 (a scale + shift).
    """
    w0 = model.config.w0
    if scale is None:
        layer = model.hidden[i - 1]
        bias = (w0 * (layer.bias + shift[:, i])).unsqueeze(1)                    # (B, 1, W)
        weight_t = (w0 * layer.weight.t()).expand(h.shape[0], -1, -1)          # (B, W, W)
        return None, torch.baddbmm(bias, h, weight_t)
    if i == 0:
        a = shared.pre1.unsqueeze(0)
    else:
        layer = model.hidden[i - 1]
        a = torch.nn.functional.linear(h, layer.weight, layer.bias)                # GEMM with the bias fused
    if shift is None:
        return a, a * (w0 * scale[:, None, i])
    # w0 (a scale + shift) in one pass over (B, P, W): the scaled shift and scale are (B, 1, W)
    return a, torch.addcmul(w0 * shift[:, None, i], a, w0 * scale[:, None, i])


def _layer_sin_cos(model, shared, shift, scale, i, h):
    """Sine layer i for a batch: returns (pre-activation a or None, sin, cos), each (B, P, W)."""
    if scale is None and i == 0:
        return (None, *_first_layer_shift_only(model, shared, shift))
    a, u = _layer_arg(model, shared, shift, scale, i, h)
    return (a, *sincos(u))


def latent_grad(model: LatentModulatedSiren, shared: Shared, z: torch.Tensor, target: torch.Tensor,
                create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-written gradient of sum_b MSE_b w.r.t. z.

    z (B, D), or (1, D) shared by all images, target (B, P, C) -> (grad (B, D), mse (B,)). With
    ``create_graph`` the result is differentiable w.r.t. the model's weights and z (for
    second-order meta-gradients). A shared z (step 0: every latent is zero) takes
    :func:`_shared_latent_grad`, whose backward pass costs one image per output channel.
    """
    if z.shape[0] == 1 and target.shape[0] > 1:
        return _shared_latent_grad(model, shared, z, target, create_graph)
    c = model.config
    scale, saved, out = _forward_saved(model, shared, z)
    err = out - target                                                           # (B, P, C)
    g_h = torch.matmul(err, (2.0 / (err.shape[1] * err.shape[2])) * model.out.weight)
    g_shift, g_scale = [], []
    for g_u, a in _backprop(model, saved, scale, g_h):                           # g_u: (B, P, W)
        g_shift.append(c.w0 * g_u.sum(1))
        if scale is not None:
            g_scale.append(c.w0 * (g_u * (a if a.shape[0] == g_u.shape[0] else a.expand_as(g_u))).sum(1))
    g_mod = _stack_mods(c, g_shift[::-1], g_scale[::-1])                          # (B, modulation_dim)
    return _latent_map_vjp(model, z, g_mod, create_graph), err.pow(2).mean(dim=(1, 2))


def _shared_latent_grad(model, shared, z, target, create_graph):
    """latent_grad for one latent z (1, D) shared by all B images.

    The forward pass is then the same for every image and only the error differs, and the
    gradient is linear in the error: dMSE_b/dmod = sum_(p, c) err[b, p, c] J[c, p, :], where row
    J[c, p] is d(output p, channel c)/dmod (scaled by 2/(P C)). The network acts pixel by pixel, so
    one backward pass of a unit error at every pixel of channel c gives all rows J[c, :, :] at once:
    C backward passes instead of B, then one (B, C P) x (C P, W) product per layer.
    """
    c = model.config
    scale, saved, out = _forward_saved(model, shared, z)                          # out: (1, P, C)
    err = out - target                                                           # (B, P, C)
    n, p, ch = err.shape
    g_h = ((2.0 / (p * ch)) * model.out.weight).unsqueeze(1)                     # (C, 1, W): unit errors
    err_flat = err.transpose(1, 2).reshape(n, ch * p)                            # (B, C P), channel-major
    g_shift, g_scale = [], []
    for g_u, a in _backprop(model, saved, scale, g_h):                           # g_u: (C, P, W)
        g_shift.append(torch.matmul(err_flat, c.w0 * g_u.reshape(ch * p, -1)))
        if scale is not None:
            g_scale.append(torch.matmul(err_flat, c.w0 * (g_u * a).reshape(ch * p, -1)))
    g_mod = _stack_mods(c, g_shift[::-1], g_scale[::-1])                          # (B, modulation_dim)
    return _latent_map_vjp(model, z, g_mod, create_graph), err.pow(2).mean(dim=(1, 2))


def _forward_saved(model, shared, z):
    """Forward pass keeping what the backward needs: z (N, D) -> (scale modulations or None, saved,
    out (N, P, C)), saved[i] = (pre-activation a or None, cos) of sine layer i, each (N, P, W)."""
    shift, scale = model.modulations(z)
    h, saved = None, []
    for i in range(model.config.num_modulated):
        a, h, cos = _layer_sin_cos(model, shared, shift, scale, i, h)
        saved.append((a, cos))
    return scale, saved, torch.matmul(h, model.out.weight.t()) + (model.out.bias + 0.5)


def _backprop(model, saved, scale, g_h):
    """Yield (g_u, a) from the last sine layer to the first, where g_u = dL/du_i (N, P, W) for
    dL/dh (N, P, W) of the last layer's output ``g_h`` (u_i: the sine's argument)."""
    w0 = model.config.w0
    for i in reversed(range(len(saved))):
        a, cos = saved[i]
        g_u = g_h * cos
        yield g_u, a
        if i > 0:
            weight = w0 * model.hidden[i - 1].weight                             # (W out, W in)
            if scale is not None:  # the scale folded into per-image weights: no pass over (N, P, W)
                weight = scale[:, i, :, None] * weight                           # (N, W, W)
            g_h = torch.matmul(g_u, weight)


def _stack_mods(c, g_shift, g_scale) -> torch.Tensor:
    parts = []
    if c.modulate_shift:
        parts.append(torch.stack(g_shift, 1))
    if c.modulate_scale:
        parts.append(torch.stack(g_scale, 1))
    return torch.stack(parts, 1).flatten(1)


def _latent_map_vjp(model, z, g_mod, create_graph):
    """g_mod (B, modulation_dim) -> g_mod @ d(latent_map)/dz, (B, D)."""
    net = model.latent_map.net
    if len(net) == 1:  # linear map: the Jacobian is the weight
        return torch.matmul(g_mod, net[0].weight)
    if z.shape[0] != g_mod.shape[0]:  # step 0: one shared zero latent, per-image errors
        z = z.detach().expand(g_mod.shape[0], -1).clone()
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        mods = model.latent_map(zz)
        (g,) = torch.autograd.grad(mods, zz, g_mod, create_graph=create_graph)
    return g


def predict(model: LatentModulatedSiren, shared: Shared, z: torch.Tensor) -> torch.Tensor:
    """Batched forward with the shared first-layer terms: z (B, D) -> values (B, P, C)."""
    shift, scale = model.modulations(z)
    h = None
    for i in range(model.config.num_modulated):
        if scale is None and i == 0:
            h = _first_layer_shift_only(model, shared, shift)[0]
        else:
            h = torch.sin(_layer_arg(model, shared, shift, scale, i, h)[1])  # no cosine needed here
    return torch.matmul(h, model.out.weight.t()) + (model.out.bias + 0.5)


def inner_loop(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, *,
               first_order: bool = False, create_graph: bool | None = None,
               use_checkpoint: bool = False, shared: Shared | None = None) -> InnerResult:
    """Fit latents to images (B, C, *size) in [0, 1] with ``steps`` SGD steps from zero.

    ``create_graph`` (default: grad mode is on) keeps the graph for meta-gradients; with
    ``first_order`` the inner gradients are treated as constants (the learning rates still get
    gradients); ``use_checkpoint`` recomputes each inner step in the backward pass.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    shared = shared if shared is not None else shared_terms(model, tuple(images.shape[2:]))
    target = images_to_targets(images)
    # Every latent starts at zero, so step 0's forward pass is one image's (B=1, broadcast).
    z = images.new_zeros(1, model.config.latent_dim)
    second = create_graph and not first_order

    def step(z_in, lr):
        if second:
            g, mse = latent_grad(model, shared, z_in, target, create_graph=True)
        else:
            with torch.no_grad():
                g, mse = latent_grad(model, shared, z_in.detach(), target, create_graph=False)
        return z_in - lr * g, mse

    inner = []
    for k in range(steps):
        lr = model.inner_lr(k)
        if use_checkpoint and create_graph:
            z, mse = grad_checkpoint(step, z, lr, use_reentrant=False)
        else:
            z, mse = step(z, lr)
        inner.append(mse.detach())
    z = z.expand(images.shape[0], -1) if z.shape[0] != images.shape[0] else z
    out = predict(model, shared, z)
    return InnerResult(z, torch.stack(inner, 1) if inner else out.new_zeros(len(z), 0),
                       (out - target).pow(2).mean(dim=(1, 2)), out)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data in [0, 1]: mse (B,) -> (B,)."""
    return -10.0 * torch.log10(mse.clamp_min(1e-12))


@dataclass
class MetaStepResult:
    """loss: scalar outer loss (mean per-image MSE); psnr: (B,) per-image PSNR of the unclamped
    reconstruction after the inner steps; inner_mse: (B, steps)."""

    loss: torch.Tensor
    psnr: torch.Tensor
    inner_mse: torch.Tensor


def meta_loss(model: LatentModulatedSiren, images: torch.Tensor, steps: int = 3, *,
              first_order: bool = False, use_checkpoint: bool = False) -> MetaStepResult:
    """Outer loss for images (B, C, *size); call ``.loss.backward()`` for the meta-gradient."""
    res = inner_loop(model, images, steps, first_order=first_order, use_checkpoint=use_checkpoint,
                     create_graph=True)
    return MetaStepResult(res.mse.mean(), psnr(res.mse.detach()), res.inner_mse)


class CompiledMetaLoss:
    """:func:`meta_loss` through ``torch.compile`` (inductor), for a fixed ``steps`` / ``first_order``.

    Eager, one second-order meta-step is about 500 separate elementwise passes (sines, cosines,
    products, sums) over (B, P, W) activations around the matrix products; compiled, the inner loop
    and the outer backward become a few fused C++ loops around the same products. The maths is
    :func:`meta_loss`'s (the test compares meta-gradients to float32 rounding, and to 1e-10 in
    float64). The first call compiles: seconds with torch's on-disk cache warm, minutes cold.
    Each chunk shape compiles once (``dynamic=False``): keep one chunk size.

    Measured on 2 CPU cores (BENCHMARKS.md, issue 17), it is **not faster** than the eager trainer
    step there (COIN++ config 119-181 against 142-168 ms, ``mnist-cpu`` 236-306 against 240-254 ms):
    the matrix products, which compiling leaves as they are, dominate. On one thread a prototype
    ran about 1.2x faster than eager. It is opt-in (``--compile``) for those cases and for GPUs,
    where an eager step is hundreds of small kernel launches (not measured here).
    """

    def __init__(self, steps: int = 3, first_order: bool = False):
        self.steps, self.first_order = steps, first_order
        self._fn = torch.compile(self._loss, dynamic=False)

    def _loss(self, model: LatentModulatedSiren, images: torch.Tensor):
        res = inner_loop(model, images, self.steps, first_order=self.first_order, create_graph=True)
        return res.mse.mean(), psnr(res.mse.detach()), res.inner_mse

    def __call__(self, model: LatentModulatedSiren, images: torch.Tensor) -> MetaStepResult:
        """images (B, C, *size) -> the outer loss as :func:`meta_loss` returns it."""
        return MetaStepResult(*self._fn(model, images))
