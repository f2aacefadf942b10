"""Generative functa: each mechanism against an independent reference (closed forms, plain loops,
autograd), then the command end to end on a tiny functa run of the embedded digits."""
from __future__ import annotations

import json
import math
import pytest
import torch
from safetensors.torch import load_file, save_file

from nnlab.functa.generate.diffusion import Schedule, ddim_timesteps, guided_eps, q_sample, sample_ddim, sample_ddpm
from nnlab.functa.generate.flow import Flow
from nnlab.functa.generate.gaussian import GaussianModel
from nnlab.functa.generate.metrics import fid, frechet_distance, memorisation, precision_recall

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- diffusion -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alphas_bar_is_the_running_product_of_one_minus_beta(kind):
    s = Schedule.make(kind, 200)
    prod, ref = 1.0, []
    for b in s.betas.double().tolist():
        prod *= 1 - b
        ref.append(prod)
    assert torch.allclose(s.alphas_bar.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)
    assert s.alphas_bar[0] > 0.99 and s.alphas_bar[-1] < 1e-3  # from almost data to almost noise
    prev = torch.cat([torch.ones(1), s.alphas_bar[:-1]])
    assert torch.allclose(s.posterior_var, s.betas * (1 - prev) / (1 - s.alphas_bar), rtol=1e-4)


def test_q_sample_has_the_moments_of_q_xt_given_x0():
    s = Schedule.make("cosine", 200)
    x0 = torch.tensor([[2.0, -1.0, 0.5]]).expand(40_000, 3)
    for t in (10, 100, 190):
        xt = q_sample(s, x0, torch.full((len(x0),), t), torch.randn(x0.shape))
        ab = s.alphas_bar[t]
        assert torch.allclose(xt.mean(0), ab.sqrt() * x0[0], atol=0.02)
        assert torch.allclose(xt.var(0), (1 - ab).expand(3), rtol=0.03)


class OracleEps:
    """The exact noise predictor for data N(mu, sd^2 I): E[eps | x_t] in closed form."""
    num_classes = 0

    def __init__(self, sched, mu, sd):
        self.s, self.mu, self.sd = sched, mu, sd

    def __call__(self, x, t, y=None):
        ab = self.s.alphas_bar[t][:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sd ** 2 + 1 - ab)


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", 200, 0.03), ("ddim", 200, 0.03), ("ddim", 50, 0.06)])
def test_samplers_with_the_exact_denoiser_recover_the_data_distribution(sampler, steps, tol):
    """A wrong coefficient anywhere in the chain (a missing sqrt, beta for beta-tilde, an off-by-one
    alpha_bar) moves the sample mean or spread away from the data's. DDIM at 50 of 200 steps starts
    at t = 196, from N(0, I) instead of q(x_196): a small bias for data far from N(0, I) (standardised
    latents have mean 0 and variance 1, so none there), hence the looser tolerance."""
    s = Schedule.make("cosine", 200)
    mu, sd = torch.tensor([1.5, -2.0]), torch.tensor([0.5, 1.2])
    oracle, g = OracleEps(s, mu, sd), torch.Generator().manual_seed(0)
    x = (sample_ddpm(oracle, s, 20_000, 2, generator=g) if sampler == "ddpm"
         else sample_ddim(oracle, s, 20_000, 2, steps=steps, generator=g))
    assert torch.allclose(x.mean(0), mu, atol=tol)
    assert torch.allclose(x.std(0), sd, rtol=tol + 0.01)


def test_ddim_timesteps_span_the_chain():
    seq = ddim_timesteps(1000, 50)
    assert seq[0] == 980 and seq[-1] == 0 and len(seq) == 50 and seq == sorted(seq, reverse=True)
    assert ddim_timesteps(200, 200) == list(reversed(range(200)))


def test_classifier_free_guidance_combines_conditional_and_null_predictions():
    class Fake:
        num_classes = 10

        def __call__(self, x, t, y):
            return torch.where((y == 10)[:, None], -x, 3 * x)  # null class -> -x, else 3x

    x, t, y = torch.ones(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])
    w = 2.0
    assert torch.allclose(guided_eps(Fake(), x, t, y, w), (1 + w) * 3 * x - w * (-x))
    assert torch.allclose(guided_eps(Fake(), x, t, y, 0.0), 3 * x)


# ---- flow ------------------------------------------------------------------------------------

def _tiny_flow(conditional: bool) -> Flow:
    torch.manual_seed(0)
    flow = Flow(5, layers=3, hidden=16, num_classes=3 if conditional else 0).double()
    with torch.no_grad():  # leave the identity start: random conditioner outputs and ActNorm
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for step in flow.steps:
            step[0].initialized.fill_(True)
    return flow.eval()


def _flow_case(conditional: bool, n: int):
    """A tiny flow, float64 inputs x (n, 5) and labels y (n,) or None."""
    y = torch.randint(0, 3, (n,)) if conditional else None
    return _tiny_flow(conditional), torch.randn(n, 5, dtype=torch.float64), y


@pytest.mark.parametrize("conditional", [False, True])
def test_flow_inverse_of_forward_is_identity(conditional):
    flow, x, y = _flow_case(conditional, 16)
    z, _ = flow(x, y)
    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z, y), x, atol=1e-10)


@pytest.mark.parametrize("conditional", [False, True])
def test_flow_logdet_matches_autograd_jacobian(conditional):
    flow, x, y = _flow_case(conditional, 6)
    _, logdet = flow(x, y)
    for i in range(len(x)):
        yi = None if y is None else y[i:i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], yi)[0][0], x[i])
        assert torch.allclose(logdet[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-10)


def test_actnorm_initialises_to_zero_mean_unit_variance():
    flow = Flow(4, layers=1, hidden=8).train()
    x = 3 + 2 * torch.randn(512, 4)
    h, _ = flow.steps[0][0](x)
    assert torch.allclose(h.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(h.std(0), torch.ones(4), atol=1e-4)


def test_flow_training_lowers_nll_below_a_poor_fit():
    """A few hundred steps on a banana-shaped 2-D set must beat the Gaussian fitted to it."""
    torch.manual_seed(0)
    a = torch.randn(4000)
    x = torch.stack([a, 0.5 * a ** 2 - 0.5 + 0.1 * torch.randn(4000)], 1)
    x = (x - x.mean(0)) / x.std(0)
    flow = Flow(2, layers=6, hidden=64).train()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(400):
        idx = torch.randint(0, 4000, (256,))
        loss = -flow.log_prob(x[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll_flow = -flow.eval().log_prob(x).mean().item()
    nll_gauss = -GaussianModel(2).fit(x).log_prob(x).mean().item()
    assert nll_flow < nll_gauss - 0.2


# ---- gaussian baseline -----------------------------------------------------------------------

def test_gaussian_baseline_matches_torch_distribution_and_its_samples_match_the_fit():
    torch.manual_seed(0)
    a = torch.randn(3, 3)
    cov = a @ a.T + 0.5 * torch.eye(3)
    data = torch.distributions.MultivariateNormal(torch.tensor([1.0, 0.0, -1.0]), cov).sample((20_000,))
    g = GaussianModel(3).fit(data)
    ref = torch.distributions.MultivariateNormal(data.double().mean(0), torch.cov(data.double().T))
    x = torch.randn(10, 3)
    assert torch.allclose(g.log_prob(x).double(), ref.log_prob(x.double()), atol=1e-4)
    s = g.sample(50_000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(torch.cov(s.T), g.cov, atol=0.2)  # sampling error ~0.05 at var 7.6


# ---- metrics ---------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    # commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt a - sqrt b)^2
    expect = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expect.item(), rel=1e-9)
    torch.manual_seed(0)
    m = torch.randn(4, 4)
    s = m @ m.T + torch.eye(4)
    assert frechet_distance(torch.zeros(4), s, torch.ones(4), s) == pytest.approx(4.0, abs=1e-8)


def test_frechet_distance_agrees_with_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    torch.manual_seed(1)
    m1, m2 = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(5), m2 @ m2.T + 0.1 * torch.eye(5)
    mu1, mu2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    cross = linalg.sqrtm(s1.numpy() @ s2.numpy()).real.trace()
    ref = ((mu1 - mu2) ** 2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fid_from_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, 3, generator=g)
    y = torch.randn(50_000, 3, generator=g) * torch.tensor([2.0, 1.0, 1.0]) + torch.tensor([1.0, 0.0, 0.0])
    assert fid(x, y) == pytest.approx(1.0 + (2 - 1) ** 2, abs=0.1)  # sampling error ~0.03 at 50k


def _pr_loop(real, fake, k):
    def radii(x):
        return [sorted(torch.dist(a, b).item() for b in x)[k] for a in x]  # [0] is the point itself

    rr, rf = radii(real), radii(fake)
    prec = sum(any(torch.dist(f, r).item() <= rr[j] for j, r in enumerate(real)) for f in fake) / len(fake)
    rec = sum(any(torch.dist(r, f).item() <= rf[j] for j, f in enumerate(fake)) for r in real) / len(real)
    return prec, rec


def test_precision_recall_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g)
    fake = 0.6 * torch.randn(30, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
    pr = precision_recall(real, fake, k=3)
    prec, rec = _pr_loop(real, fake, 3)
    assert (pr.precision, pr.recall) == (pytest.approx(prec), pytest.approx(rec))
    assert 0 < pr.recall < 1  # the tiny fake cloud covers part of the real one only


def test_memorisation_flags_copies_and_not_fresh_samples():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(2000, 8, generator=g), torch.randn(500, 8, generator=g)
    copies = train[:500] + 1e-3 * torch.randn(500, 8, generator=g)
    fresh = torch.randn(500, 8, generator=g)
    m_copy, m_fresh = memorisation(copies, train, test), memorisation(fresh, train, test)
    assert m_copy.ratio < 0.01 and m_copy.copy_fraction > 0.99
    assert 0.85 < m_fresh.ratio < 1.15 and m_fresh.copy_fraction < 0.05


# ---- end to end ------------------------------------------------------------------------------

def _cli(capsys, *args):
    """Run ``nnlab ARGS`` in process: (exit code, stderr)."""
    from nnlab.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """Feature networks and decoded data of this module go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNLAB_DATA", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tiny_functa(tmp_path_factory):
    """A 10-step tiny functa run on the embedded digits and its train functaset."""
    from nnlab.functa.functaset import fit_split
    from nnlab.functa.presets import get_preset
    from nnlab.functa.trainer import train_functa

    root = tmp_path_factory.mktemp("gen")
    train_functa(get_preset("tiny", steps=10), "mnist-5k", root / "run", progress=False)
    fit_split(root / "run", "mnist-5k", "train", root / "train.safetensors", chunk_size=4000)
    return root


FAST = dict(width=32, blocks=1, timesteps=50, sample_steps=10, samples=200, feature_epochs=1, log_every=5,
            ckpt_every=10, flow_layers=2, flow_hidden=32)


def _gen(tiny, out, resume=False, **kw):
    from nnlab.functa.generate.model import GenerateConfig
    from nnlab.functa.generate.run import generate

    return generate(tiny / "run", tiny / "train.safetensors", out, GenerateConfig(**{**FAST, **kw}),
                    resume=resume, progress=False)


def test_generate_resume_is_bit_identical_and_summary_is_complete(tiny_functa, tmp_path):
    full = _gen(tiny_functa, tmp_path / "full", steps=20)
    _gen(tiny_functa, tmp_path / "part", steps=10)
    _gen(tiny_functa, tmp_path / "part", steps=20, resume=True)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("fid", "fid_gaussian", "fid_reconstruction", "precision", "recall", "num_samples"):
        assert math.isfinite(full[key]), key
    assert full["num_samples"] == 200 and full["fid_label"] == "FID (nnlab LeNet-5 features)"
    assert (tmp_path / "full" / "samples.png").is_file()


def test_conditional_diffusion_and_flow_write_their_extra_fields(tiny_functa, tmp_path):
    s = _gen(tiny_functa, tmp_path / "cond", steps=10, conditional=True)
    assert set(s["class_accuracy"]) == {str(c) for c in range(10)}
    assert (tmp_path / "cond" / "samples-by-class.png").is_file()
    f = _gen(tiny_functa, tmp_path / "flow", model="flow", steps=10)
    assert math.isfinite(f["test_bpd"]) and math.isfinite(f["test_bpd_gaussian"])
    g = _gen(tiny_functa, tmp_path / "gauss", model="gaussian")  # the baseline itself: the same draws
    assert g["fid"] == pytest.approx(g["fid_gaussian"], rel=1e-9)


def test_sample_command_renders_any_size_and_class(tiny_functa, tmp_path, capsys):
    from PIL import Image

    _gen(tiny_functa, tmp_path / "g", steps=5, conditional=True)
    code, err = _cli(capsys, "functa", "sample", tmp_path / "g", "--n", 4, "--class", 3, "--size", 40, "--out",
                     tmp_path / "s.png")
    assert code == 0, err
    assert Image.open(tmp_path / "s.png").size == (2 * 42 + 2, 2 * 42 + 2)
    code, err = _cli(capsys, "functa", "sample", tmp_path / "g", "--class", 12, "--out", tmp_path / "t.png")
    assert code == 2 and err.count("\n") == 1 and "class must be in 0..9" in err
    for size, fragment in ((0, "positive number of pixels"), (100_000, "choose a smaller --size")):
        code, err = _cli(capsys, "functa", "sample", tmp_path / "g", "--size", size, "--out", tmp_path / "u.png")
        assert code == 2 and err.count("\n") == 1 and fragment in err, err  # --size 0 drew the data's size
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "u.png").exists()


def test_generate_bad_inputs_are_one_line_errors(tiny_functa, tmp_path, capsys):
    t = tiny_functa
    (tmp_path / "file").write_text("")
    fs = load_file(t / "train.safetensors")  # the same latents, claimed by another model
    save_file(fs, tmp_path / "other.safetensors", metadata={"model_hash": "0" * 16, "data": "mnist-5k"})
    cases = [
        (t / "train.safetensors", tmp_path / "x", ["--model", "vae"], "unknown generative model 'vae'"),
        (t / "train.safetensors", tmp_path / "x", ["--lr", "nan"], "--lr must be a finite number"),
        (t / "train.safetensors", tmp_path / "x", ["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (t / "train.safetensors", tmp_path / "x", ["--p-uncond", "1.5"], "--p-uncond must lie in [0, 1), got 1.5"),
        (t / "train.safetensors", tmp_path / "x", ["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (t / "train.safetensors", tmp_path / "x", ["--feature-epochs", "0"], "--feature-epochs must be at least 1"),
        (t / "train.safetensors", tmp_path / "x", ["--time-limit", "-1"], "--time-limit must be a finite number"),
        (t / "train.safetensors", tmp_path / "file", [], "is a file"),
        (tmp_path / "other.safetensors", tmp_path / "y", [], "fitted by another model"),
        (tmp_path / "missing.safetensors", tmp_path / "y", [], "does not exist"),
    ]
    from safetensors import safe_open

    with safe_open(t / "train.safetensors", "pt") as f:
        meta = dict(f.metadata())
    save_file({**fs, "labels": torch.full_like(fs["labels"], -1)}, tmp_path / "unlabelled.safetensors", metadata=meta)
    cases.append((tmp_path / "unlabelled.safetensors", tmp_path / "y", ["--conditional"], "needs a labelled functaset"))
    for functaset, out, extra, fragment in cases:
        code, err = _cli(capsys, "functa", "generate", t / "run", functaset, "--out", out, *extra)
        assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing created


def test_generate_resume_refuses_a_changed_model_option(tiny_functa, tmp_path):
    from nnlab.errors import ConfigError

    _gen(tiny_functa, tmp_path / "g", steps=5)
    with pytest.raises(ConfigError, match="changed option"):
        _gen(tiny_functa, tmp_path / "g", steps=10, width=64, resume=True)
    with pytest.raises(ConfigError, match="already holds a generator run"):
        _gen(tiny_functa, tmp_path / "g", steps=10)
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["steps"] == 5


def test_untrained_denoiser_is_the_exact_gaussian_noise_predictor():
    """The skip sqrt(1 - abar_t) x_t is E[eps | x_t] for N(0, I) data; the MLP starts at zero."""
    from nnlab.functa.generate.diffusion import Denoiser

    s = Schedule.make("cosine", 100)
    net = Denoiser(6, width=16, blocks=1, num_classes=3, alphas_bar=s.alphas_bar)
    x, t = torch.randn(8, 6), torch.randint(0, 100, (8,))
    assert torch.allclose(net(x, t, torch.zeros(8, dtype=torch.long)), (1 - s.alphas_bar[t]).sqrt()[:, None] * x)


def test_cli_flags_come_from_the_dataclass():
    import argparse

    from nnlab.config import add_dataclass_options, dataclass_from_args
    from nnlab.functa.generate.model import GenerateConfig

    p = argparse.ArgumentParser()
    add_dataclass_options(p, GenerateConfig)
    assert dataclass_from_args(GenerateConfig, p.parse_args([])) == GenerateConfig()
    cfg = dataclass_from_args(GenerateConfig, p.parse_args(["--conditional", "--width", "64", "--lr", "3e-4"]))
    assert (cfg.conditional, cfg.width, cfg.lr) == (True, 64, 3e-4)
    assert "classifier-free guidance" in p.format_help()  # help text is the dataclass comment


def test_a_functa_run_published_without_checkpoints_loads_from_its_final_weights(tiny_functa, tmp_path):
    import shutil

    from nnlab.functa.reconstruct import load_model

    for name in ("config.yaml", "model.safetensors"):
        shutil.copy(tiny_functa / "run" / name, tmp_path / name)
    a, b = load_model(tiny_functa / "run").state_dict(), load_model(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
