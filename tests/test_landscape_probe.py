"""Pure landscape measurements: agreement with the plain references, analytic values on a
quadratic, exact restoration, and training with probes bit-identical to training without."""
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from nnlab.errors import ConfigError
from nnlab.landscape import (default_etas, gradient_distance, landscape_step, landscape_step_reference,
                             top_hessian_eigenvalue, top_hessian_eigenvalue_reference)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bn_net(dropout: float = 0.2) -> nn.Module:
    """(B, 3, 8, 8) -> (B, 4) logits; conv + BN2d + linear + BN1d + dropout."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(8, 4))


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


class Quadratic(nn.Module):
    """forward returns the weight vector w (D,); the loss 0.5 w^T A w is in ``loss``."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64))

    def forward(self, x):
        return self.w

    def loss(self, w, y):
        return 0.5 * w @ self.a @ w


def test_default_etas_span_half_to_four_lr():
    etas = default_etas(0.1)
    assert len(etas) == 8
    assert etas[0] == pytest.approx(0.05) and etas[-1] == pytest.approx(0.4)
    assert all(b > a for a, b in zip(etas, etas[1:]))
    with pytest.raises(ConfigError, match="lr > 0"):
        default_etas(0.0)


def test_fast_landscape_agrees_with_reference_on_bn_net_with_dropout():
    model = tiny_bn_net().train()
    x, y = batch()
    backward(model, x, y)
    etas = default_etas(0.1)
    fast = landscape_step(model, F.cross_entropy, x, y, etas)
    ref = landscape_step_reference(model, F.cross_entropy, x, y, etas)
    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.grad_dists, ref.grad_dists, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.betas, ref.betas, rtol=1e-4, atol=1e-6)
    assert fast.grad_norm == pytest.approx(ref.grad_norm, rel=1e-6)
    assert fast.loss_max >= fast.loss_min and fast.beta == pytest.approx(float(ref.betas.max()), rel=1e-4)


def test_quadratic_has_analytic_landscape_and_hessian():
    torch.manual_seed(3)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    eig = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    model = Quadratic(a)
    model.zero_grad()
    model.loss(model(None), None).backward()
    w, g = model.w.detach().clone(), model.w.grad.clone()
    etas = [0.05, 0.1, 0.4]
    res = landscape_step(model, model.loss, None, None, etas)
    for k, eta in enumerate(etas):
        v = w - eta * g
        assert res.losses[k].item() == pytest.approx(float(0.5 * v @ a @ v), rel=1e-10)
        # g' - g = -eta A g, so ||g' - g|| / ||eta g|| = ||A g|| / ||g|| for every eta
        assert res.grad_dists[k].item() == pytest.approx(eta * float((a @ g).norm()), rel=1e-10)
    assert res.beta == pytest.approx(float((a @ g).norm() / g.norm()), rel=1e-10)
    top = top_hessian_eigenvalue(model, model.loss, None, None, iters=200, tol=1e-10)
    assert top.converged and top.eigenvalue == pytest.approx(5.0, rel=1e-6)


def test_fast_hessian_agrees_with_full_hessian_on_bn_net():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    ref = top_hessian_eigenvalue_reference(model, F.cross_entropy, x, y)
    fast = top_hessian_eigenvalue(model, F.cross_entropy, x, y, iters=500, tol=1e-9)
    assert fast.eigenvalue == pytest.approx(ref, rel=1e-3)
    with pytest.raises(ConfigError, match="iters"):
        top_hessian_eigenvalue(model, F.cross_entropy, x, y, iters=0)


def test_probes_restore_weights_buffers_grads_rng_and_optimizer():
    model = tiny_bn_net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    backward(model, x, y)
    opt.step()
    backward(model, x, y)
    params = {k: v.clone() for k, v in model.state_dict().items()}  # includes running stats, counters
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())}
    rng = torch.get_rng_state()
    landscape_step(model, F.cross_entropy, x, y, default_etas(0.1))
    top_hessian_eigenvalue(model, F.cross_entropy, x, y, iters=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v["momentum_buffer"], opt_state[k]) for k, v in enumerate(opt.state.values()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_probe_inputs_are_config_errors():
    model = tiny_bn_net()
    x, y = batch()
    backward(model, x, y)
    with pytest.raises(ConfigError, match="positive"):
        landscape_step(model, F.cross_entropy, x, y, [0.1, -1.0])
    with pytest.raises(ConfigError, match="one to one"):
        landscape_step(model, F.cross_entropy, x, y, [0.1], grads=[torch.zeros(1)])


def test_gradient_distance_and_beta():
    prev = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    cur = [torch.tensor([3.0, 1.0]), torch.tensor([4.0])]
    d = gradient_distance(prev, cur, lr=0.5)
    assert d.dist == pytest.approx(1.0) and d.prev_norm == pytest.approx(5.0)
    assert d.beta == pytest.approx(1.0 / (0.5 * 5.0))
    with pytest.raises(ConfigError, match="lr must be positive"):
        gradient_distance(prev, cur, lr=0.0)


def _train(probe: bool, steps: int = 6) -> dict:
    """Hand-written loop: SGD + momentum, BN + dropout; with probes every 2 steps."""
    torch.manual_seed(0)
    model = tiny_bn_net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    prev = None
    for step in range(steps):
        x, y = batch(seed=step)
        backward(model, x, y)
        if probe and step % 2 == 0:
            landscape_step(model, F.cross_entropy, x, y, default_etas(0.05))
            top_hessian_eigenvalue(model, F.cross_entropy, x, y, iters=2)
        if probe and prev is not None:
            gradient_distance(prev, [p.grad for p in model.parameters()], 0.05)
        prev = [p.grad.clone() for p in model.parameters()] if probe else None
        opt.step()
    return {**model.state_dict(), "next_random": torch.rand(3)}


def test_training_with_probes_is_bit_identical_to_training_without():
    plain, probed = _train(probe=False), _train(probe=True)
    assert plain.keys() == probed.keys()
    for k in plain:
        assert torch.equal(plain[k], probed[k]), k
    assert not math.isnan(float(probed["0.weight"].sum()))


# --------------------------------------------------------------------------- issue 14: fidelity


def test_dropout_masks_are_replayed_so_a_tiny_step_sees_the_training_loss():
    """Without replay, dropout draws new masks and beta at a tiny step is huge (the 6.2e6 defect)."""
    from nnlab.engine.checkpoint import rng_state

    model = tiny_bn_net(dropout=0.5).train()
    x, y = batch()
    before = rng_state()
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    eta = [1e-6]
    replayed = landscape_step(model, F.cross_entropy, x, y, eta, replay_rng=before)
    fresh = landscape_step(model, F.cross_entropy, x, y, eta)
    assert replayed.losses[0].item() == pytest.approx(loss.item(), rel=1e-5)
    assert abs(fresh.losses[0].item() - loss.item()) > 1e-3
    assert replayed.grad_dists[0] < 1e-3 * replayed.grad_norm < fresh.grad_dists[0]
    ref = landscape_step_reference(model, F.cross_entropy, x, y, default_etas(0.1), replay_rng=before)
    fast = landscape_step(model, F.cross_entropy, x, y, default_etas(0.1), replay_rng=before)
    torch.testing.assert_close(fast.grad_dists, ref.grad_dists, rtol=1e-4, atol=1e-6)


def test_probe_in_the_training_precision():
    """autocast=True evaluates as bf16-autocast training does; fp32 probing gives another loss."""
    model = tiny_bn_net(dropout=0.0).train()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = F.cross_entropy(model(x).float(), y)
    backward(model, x, y)
    fp32 = F.cross_entropy(model(x), y)
    bf16 = landscape_step(model, F.cross_entropy, x, y, [1e-9], autocast=True)
    plain = landscape_step(model, F.cross_entropy, x, y, [1e-9])
    assert bf16.losses[0].item() == pytest.approx(trained.item(), rel=1e-6)
    assert plain.losses[0].item() == pytest.approx(fp32.item(), rel=1e-6)
    assert abs(trained.item() - fp32.item()) > 1e-5  # the two precisions do differ here


def test_clipped_step_direction_on_the_quadratic():
    """With clipping the points are w - eta * clip(g) and beta divides by ||eta clip(g)||."""
    from nnlab.landscape.probe import clipped

    torch.manual_seed(4)
    a = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    model = Quadratic(a)
    model.zero_grad()
    model.loss(model(None), None).backward()
    w, g = model.w.detach().clone(), model.w.grad.clone()
    max_norm = 0.25 * float(g.norm())
    d = clipped([g], max_norm)
    ref = g.clone().requires_grad_(False)
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = ref.clone()
    torch.nn.utils.clip_grad_norm_([p], max_norm)
    torch.testing.assert_close(d[0], p.grad)
    res = landscape_step(model, model.loss, None, None, [0.1, 0.3], direction=d)
    for k, eta in enumerate([0.1, 0.3]):
        v = w - eta * d[0]
        assert res.losses[k].item() == pytest.approx(float(0.5 * v @ a @ v), rel=1e-10)
        assert res.betas[k].item() == pytest.approx(float((a @ d[0]).norm() / d[0].norm()), rel=1e-10)
    assert res.step_norm == pytest.approx(max_norm, rel=1e-5) and res.grad_norm == pytest.approx(float(g.norm()))


def test_same_batch_beta_is_the_curvature_along_the_actual_move():
    """After a momentum step (move != lr ||g||), beta_same = ||A dw|| / ||dw|| exactly."""
    from nnlab.landscape.probe import same_batch_distance

    torch.manual_seed(5)
    q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.3, 0.1], dtype=torch.float64)) @ q.T
    model = Quadratic(a)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # build up momentum
        opt.zero_grad()
        model.loss(model(None), None).backward()
        opt.step()
    opt.zero_grad()
    model.loss(model(None), None).backward()
    w0, g0 = model.w.detach().clone(), model.w.grad.clone()
    opt.step()
    dw = model.w.detach() - w0
    res = same_batch_distance(model, model.loss, None, None, [g0], [w0], [model.w])
    assert res.move == pytest.approx(float(dw.norm()), rel=1e-12)
    assert abs(res.move - 0.05 * float(g0.norm())) > 0.1 * res.move  # momentum: the seed's lr||g|| is off
    assert res.dist == pytest.approx(float((a @ dw).norm()), rel=1e-9)
    assert res.beta == pytest.approx(float((a @ dw).norm() / dw.norm()), rel=1e-9)


def test_hessian_logs_its_convergence():
    torch.manual_seed(3)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.tensor([5.0, 4.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)) @ q.T
    model = Quadratic(a)
    short = top_hessian_eigenvalue(model, model.loss, None, None, iters=2, tol=1e-12)
    long = top_hessian_eigenvalue(model, model.loss, None, None, iters=400, tol=1e-12)
    assert not short.converged and short.iterations == 2
    assert long.converged and long.eigenvalue == pytest.approx(5.0, rel=1e-9)
    assert long.residual < 1e-4 < short.residual
