"""DessiLBI optimisers: update rule, fast path vs reference, state, validation, W*."""
from __future__ import annotations

import copy
import io
import shutil

import pytest
import torch
from torch import nn

from nnlab.lbi import (DessiLBI, DessiLBIAdam, build_slbi, build_slbi_adam, group_shrink,
                       layer_sparsity, param_groups, soft_threshold)
from nnlab.lbi.reference import sgd_step_reference
from nnlab.lbi.shrink import support


class Tiny(nn.Module):
    """conv (4, 2, 3, 3) + bias [+ BatchNorm], linear (3, 4*4*4) + bias, on (B, 2, 6, 6) inputs.

    Without ``norm`` by default: a bias before BatchNorm has a zero gradient, which Adam turns
    into noise, so the agreement tests use the plain model."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_shrink_functions():
    v = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.5])
    assert torch.equal(soft_threshold(v, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.5]))
    w = torch.zeros(3, 2, 1, 1)
    w[0, :, 0, 0] = torch.tensor([3.0, 4.0])   # norm 5 -> scaled by 1 - 1/5
    w[1, :, 0, 0] = torch.tensor([0.3, 0.4])   # norm 0.5 -> zero
    out = group_shrink(w, 1.0)
    assert torch.allclose(out[0], w[0] * 0.8)
    assert torch.count_nonzero(out[1:]) == 0


@pytest.mark.parametrize("flavour", ["sgd", "adam"])
def test_foreach_matches_reference_over_100_steps(flavour):
    torch.manual_seed(1)
    fast_model = Tiny()
    ref_model = copy.deepcopy(fast_model)
    build = build_slbi if flavour == "sgd" else build_slbi_adam
    lr = 0.1 if flavour == "sgd" else 0.01
    kw = dict(lr=lr, momentum=0.9, weight_decay=1e-3, mu=5.0, lam=0.05, kappa=2.0, gamma_lr=0.1)
    fast = build(fast_model, foreach=True, **kw)
    ref = build(ref_model, foreach=False, **kw)
    batches = _batches(100)
    _train(fast_model, fast, batches)
    _train(ref_model, ref, batches)
    for (n, a), b in zip(fast_model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), n
    sparse = layer_sparsity(fast_model, fast)
    assert sparse == layer_sparsity(ref_model, ref)
    assert 0 < sparse["conv.weight"] <= 1  # something entered the support, so Gamma is exercised


def test_sgd_rule_one_step_by_hand():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.1]]))
    opt = DessiLBI([w], lr=0.1, kappa=2.0, mu=4.0, momentum=0.0, lam=0.01)
    state = opt.state[w]
    w.grad = torch.ones(2, 2)
    opt.step()
    # first step: Gamma = 0, V = 0: W <- W - 0.2 (1 + W/4); V <- 0.1/4 * W_old; Gamma = 2 soft(V, 0.01)
    w0 = torch.tensor([[1.0, -2.0], [0.5, 0.1]])
    assert torch.allclose(w.detach(), w0 - 0.2 * (1 + w0 / 4))
    assert torch.allclose(state["V"], 0.025 * w0)
    assert torch.allclose(state["gamma"], 2 * soft_threshold(0.025 * w0, 0.01))


def test_uncoupled_sgd_flavour_is_momentum_sgd():
    torch.manual_seed(2)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    ours = DessiLBI(a.parameters(), lr=0.05, momentum=0.9, coupled=False)
    theirs = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(20)
    _train(a, ours, batches)
    _train(b, theirs, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_uncoupled_adam_flavour_is_adamw_one_update_per_step():
    torch.manual_seed(3)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    ours = DessiLBIAdam(a.parameters(), lr=0.01, weight_decay=0.1, coupled=False)
    theirs = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    batches = _batches(20)
    _train(a, ours, batches)
    _train(b, theirs, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_adam_coupled_first_step_by_hand():
    w = nn.Parameter(torch.tensor([0.5, -1.0]))
    opt = DessiLBIAdam([w], lr=0.1, mu=2.0, coupled=True, eps=1e-8)
    w.grad = torch.tensor([0.2, 0.2])
    opt.step()
    # t = 1: bias-corrected m = h, v = h^2, so W moves by exactly lr * sign(h) (one update)
    h = torch.tensor([0.2, 0.2]) + torch.tensor([0.5, -1.0]) / 2.0
    assert torch.allclose(w.detach(), torch.tensor([0.5, -1.0]) - 0.1 * h.sign(), atol=1e-6)
    assert opt.state[w]["step"] == 1


def test_default_weight_decay_is_coupled_l2_as_torch_sgd():
    """Issue 14: the official code's decay in the momentum buffer is torch.optim.SGD's coupled L2."""
    torch.manual_seed(2)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    ours = DessiLBI(a.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, coupled=False)
    theirs = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    batches = _batches(20)
    _train(a, ours, batches)
    _train(b, theirs, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # a coupled weight: buf_t = 0.9 buf_{t-1} + g_t + wd W_t, by hand over 3 steps (foreach and reference)
    for foreach in (True, False):
        w = nn.Parameter(torch.ones(3, 3))
        opt = DessiLBI([w], lr=0.1, momentum=0.9, weight_decay=0.5, foreach=foreach)
        expected = torch.zeros(3, 3)
        for k in range(1, 4):
            w.grad = torch.full((3, 3), 0.1 * k)
            expected = 0.9 * expected + w.grad + 0.5 * w.detach()
            opt.step()
        assert torch.allclose(opt.state[w]["momentum_buffer"], expected), foreach


def test_decoupled_weight_decay_keeps_the_buffer_to_loss_gradients():
    for foreach in (True, False):
        w = nn.Parameter(torch.ones(3, 3))
        opt = DessiLBI([w], lr=0.1, momentum=0.9, weight_decay=0.5, decoupled_wd=True, foreach=foreach)
        grads = [torch.full((3, 3), 0.1 * k) for k in range(1, 4)]
        for g in grads:
            w.grad = g.clone()
            opt.step()
        expected = grads[0] * 0.81 + grads[1] * 0.9 + grads[2]
        assert torch.allclose(opt.state[w]["momentum_buffer"], expected), foreach


@pytest.mark.parametrize("flavour", ["sgd", "adam"])
def test_compiled_step_falls_back_to_foreach_once_when_it_cannot_build(monkeypatch, flavour):
    """Issue 14: without a C++ compiler torch.compile raises InductorError on first use; the step
    then runs on the foreach path (one warning), matches it, and counts each step once."""
    import warnings as w

    import nnlab.lbi.fused as optim
    from torch._inductor.exc import InductorError

    def no_compiler(*args):
        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)

    monkeypatch.setattr(optim, "_COMPILED", {"sgd": no_compiler, "adam": no_compiler})
    monkeypatch.setattr(optim, "sgd_kernels", lambda: None)
    torch.manual_seed(9)
    fast_model = Tiny()
    ref_model = copy.deepcopy(fast_model)
    build, kw = (build_slbi, dict(lr=0.1)) if flavour == "sgd" else (build_slbi_adam, dict(lr=0.01))
    kw.update(momentum=0.9, weight_decay=1e-3, mu=5.0, lam=0.05)
    fast, ref = build(fast_model, compiled=True, **kw), build(ref_model, **kw)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        _train(fast_model, fast, _batches(5))
    _train(ref_model, ref, _batches(5))
    assert len([c for c in caught if "compiled step unavailable" in str(c.message)]) == 1
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    if flavour == "adam":
        assert all(s["step"] == 5 for s in fast.state.values())


def test_default_groups_couple_conv_and_linear_weights_only():
    model = Tiny(norm=True)
    groups = param_groups(model, weight_decay=1e-4, conv_lam=3.0)
    assert [[id(p) for p in g["params"]] for g in groups[:2]] == [[id(model.conv.weight)], [id(model.fc.weight)]]
    assert [g["coupled"] for g in groups] == [True, True, False]
    assert groups[0]["lam"] == 3.0 and "lam" not in groups[1]
    assert groups[2]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-4
    opt = build_slbi(model, lr=0.1)
    _train(model, opt, _batches(1))
    assert "gamma" in opt.state[model.conv.weight] and "gamma" not in opt.state[model.conv.bias]
    assert "gamma" not in opt.state[model.norm.weight]


@pytest.mark.parametrize("flavour", [DessiLBI, DessiLBIAdam])
def test_state_dict_round_trip(flavour):
    torch.manual_seed(4)
    model = Tiny()
    opt = flavour(param_groups(model), lr=0.05, mu=5.0, lam=0.05)
    _train(model, opt, _batches(30))
    clone = copy.deepcopy(model)
    opt2 = flavour(param_groups(clone), lr=0.05, mu=5.0, lam=0.05)
    buffer = io.BytesIO()  # through bytes, as from a checkpoint (no tensors shared with opt)
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(opt2.state[clone.conv.weight]["gamma"], opt.state[model.conv.weight]["gamma"])
    assert torch.equal(opt2.state[clone.fc.weight]["V"], opt.state[model.fc.weight]["V"])
    more = _batches(5, seed=9)
    _train(model, opt, more)
    _train(clone, opt2, more)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(mu=0.0), dict(kappa=0.0), dict(lam=-0.1),
                                 dict(momentum=1.0), dict(weight_decay=-1.0), dict(shrink="rows"),
                                 dict(coupled="yes")])
def test_bad_hyperparameters_raise_value_error(bad):
    with pytest.raises(ValueError):
        DessiLBI([nn.Parameter(torch.zeros(2, 2))], **{"lr": 0.1, **bad})


def test_bad_group_override_raises_value_error():
    with pytest.raises(ValueError, match="mu"):
        DessiLBI([{"params": [nn.Parameter(torch.zeros(2))], "mu": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        DessiLBIAdam([nn.Parameter(torch.zeros(2))], betas=(0.9, 1.5))


def test_w_star_masks_and_restores():
    torch.manual_seed(5)
    model = Tiny()
    opt = build_slbi(model, lr=0.1, mu=5.0, lam=0.35)
    _train(model, opt, _batches(40))
    before = model.conv.weight.detach().clone()
    mask = opt.support_mask(model.conv.weight)
    assert 0 < mask.mean() < 1  # a partial support, so masking changes something
    with opt.w_star():
        assert torch.equal(model.conv.weight, before * mask)
    assert torch.equal(model.conv.weight, before)
    # per filter: a conv filter is in or out as a whole
    per_filter = mask.reshape(4, -1)
    assert torch.all((per_filter.min(1).values == per_filter.max(1).values))
    assert layer_sparsity(model, opt)["conv.weight"] == pytest.approx(per_filter[:, 0].mean().item())


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="torch.compile and the fused kernel need a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_fused_kernel_matches_reference_step(momentum):
    """The C++ kernel on one conv weight, 5 steps, against the per-parameter reference rule."""
    from nnlab.lbi.kernels import sgd_kernels

    mod = sgd_kernels()
    assert mod is not None, "the fused kernel did not build (C++ compiler and ninja present)"
    torch.manual_seed(8)
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1) / 3  # filters of growing norm
    group = dict(lr=0.1, kappa=2.0, mu=5.0, lam=1.5, momentum=momentum, dampening=0.0, weight_decay=1e-3,
                 gamma_lr=0.2, decoupled_wd=True)  # the kernel's own form; coupled L2 adds wd*W to g first
    ref_w, ref_state = w.clone(), {"gamma": torch.zeros_like(w), "V": torch.zeros_like(w)}
    buf, v, gam, sc = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w), torch.zeros(6)
    for i in range(5):
        g = torch.randn_like(w)
        sgd_step_reference(ref_w, g, ref_state, group, "group")
        if i == 0:
            buf.copy_(g)  # the first step's momentum buffer is the gradient itself
        values = [momentum, 1.0, 0.2, 5.0, 0.2, 1.5, 2.0, 1e-3]  # as group (lr*kappa = 0.2)
        mod.slbi_group_sgd(w, g, buf if momentum else g.clone(), v, gam, sc, values, bool(momentum) and i > 0,
                           True)
    assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(v, ref_state["V"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(gam, ref_state["gamma"], rtol=1e-5, atol=1e-6)
    assert 0 < support(gam, "group").float().mean() < 1  # some filters in, some out


@needs_compiler
@pytest.mark.parametrize("flavour", ["sgd", "adam"])
def test_compiled_path_matches_reference(flavour):
    """The torch.compile'd fused step (Gamma of conv weights rebuilt from V and a cached per-filter
    scale) against the plain reference, over 100 steps with a changing lr."""
    torch.manual_seed(6)
    fast_model = Tiny()
    ref_model = copy.deepcopy(fast_model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, mu=5.0, lam=0.05, kappa=2.0)
    build, lr0 = (build_slbi, 0.1) if flavour == "sgd" else (build_slbi_adam, 0.01)
    if flavour == "adam":
        kw["gamma_lr"] = 0.1  # V moves at the SGD flavour's pace, so that Gamma's support changes
    fast = build(fast_model, compiled=True, **kw)
    ref = build(ref_model, foreach=False, **kw)
    for i, batch in enumerate(_batches(100)):
        for model, opt in ((fast_model, fast), (ref_model, ref)):
            for g in opt.param_groups:
                g["lr"] = lr0 * 0.99 ** i  # a changing lr must not recompile or go stale
            _train(model, opt, [batch])
    for (n, a), b in zip(fast_model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), n
    for p, q in zip(fast_model.parameters(), ref_model.parameters()):
        if p.ndim > 1:
            assert torch.allclose(fast.gamma(p), ref.gamma(q), rtol=1e-4, atol=1e-6)
    assert layer_sparsity(fast_model, fast) == layer_sparsity(ref_model, ref)
    assert any(0 < v < 1 for v in layer_sparsity(fast_model, fast).values())  # shrinkage was active


@needs_compiler
def test_compile_fallback_without_kernels_matches_reference(monkeypatch):
    """Where the C++ kernels are unavailable (GPU, no ninja) the step goes through torch.compile."""
    import nnlab.lbi.fused as optim

    monkeypatch.setattr(optim, "sgd_kernels", lambda: None)
    torch.manual_seed(9)
    fast_model = Tiny()
    ref_model = copy.deepcopy(fast_model)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, mu=5.0, lam=0.05, kappa=2.0)
    fast, ref = build_slbi(fast_model, compiled=True, **kw), build_slbi(ref_model, foreach=False, **kw)
    batches = _batches(30)
    _train(fast_model, fast, batches)
    _train(ref_model, ref, batches)
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert any(0 < v < 1 for v in layer_sparsity(fast_model, fast).values())


@needs_compiler
def test_compiled_path_resumes_from_state_dict():
    """A compiled optimiser loaded from a foreach one's state_dict (no cached scale) continues exactly."""
    torch.manual_seed(7)
    a_model = Tiny()
    kw = dict(lr=0.1, momentum=0.9, mu=5.0, lam=0.05)
    a = build_slbi(a_model, **kw)
    _train(a_model, a, _batches(20))
    b_model = copy.deepcopy(a_model)
    b = build_slbi(b_model, compiled=True, **kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch shares same-device tensors otherwise
    for g in b.param_groups:
        g["compiled"] = True  # load_state_dict brought a's group settings
    more = _batches(10, seed=1)
    _train(a_model, a, more)
    _train(b_model, b, more)
    for x, y in zip(a_model.parameters(), b_model.parameters()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("flavour", ["sgd", "adam"])
def test_fused_step_leaves_gamma_stale_but_state_dict_and_gamma_rebuild_it(flavour):
    """The fused steps do not write Gamma of conv weights; what reads it (gamma(), W*, sparsity,
    state_dict, a switch to the foreach path) gets Gamma as the reference computes it."""
    torch.manual_seed(10)
    fast_model = Tiny()
    ref_model = copy.deepcopy(fast_model)
    build = build_slbi if flavour == "sgd" else build_slbi_adam
    kw = dict(lr=0.1 if flavour == "sgd" else 0.01, mu=5.0, lam=0.05, gamma_lr=0.1)
    fast, ref = build(fast_model, compiled=True, **kw), build(ref_model, foreach=False, **kw)
    _train(fast_model, fast, _batches(20))
    _train(ref_model, ref, _batches(20))
    conv = fast_model.conv.weight
    assert fast.state[conv].get("gamma_stale") is True
    saved = fast.state_dict()
    assert "gamma_stale" not in fast.state[conv]  # rebuilt in place before saving
    gam = saved["state"][list(fast_model.parameters()).index(conv)]["gamma"]
    assert torch.allclose(gam, ref.gamma(ref_model.conv.weight), rtol=1e-4, atol=1e-6)
    assert gam.abs().sum() > 0  # a real Gamma, not the zeros it starts from
    for g in fast.param_groups:  # the foreach path reads Gamma: it must be rebuilt first
        g["compiled"] = False
    _train(fast_model, fast, _batches(5, seed=3))
    _train(ref_model, ref, _batches(5, seed=3))
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
