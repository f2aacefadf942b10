"""A RealNVP / Glow-style normalizing flow on functa latents, trained by exact log-likelihood.

One flow step is ActNorm -> invertible linear (Glow's LU parametrisation) -> affine coupling
(RealNVP): ``x = [a, b]``, ``b' = b * exp(s(a, y)) + t(a, y)`` with ``s = c * tanh(.)``. The flow
maps data x (B, D) to z (B, D) with ``log p(x) = log N(z; 0, I) + log|det dz/dx|``.
Class conditioning feeds a class embedding into every coupling's conditioner.

Bits per dimension: ``-log p(x) / (D ln 2)`` of the *standardised* latents (continuous data, so it
can be negative; lower is better; the full-covariance Gaussian's value on the same data is the
floor to beat).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ActNorm(nn.Module):
    """y = (x + loc) * exp(log_scale), per dimension; initialised from the first batch so that y
    has zero mean and unit variance (Glow). ``initialized`` is a buffer, so checkpoints keep it."""

    def __init__(self, dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        self.loc.copy_(-x.mean(0))
        self.log_scale.copy_(-x.std(0).clamp_min(1e-6).log())
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (y (B, D), logdet (B,))."""
        if not bool(self.initialized) and self.training and len(x) > 1:
            self._init(x)
        return (x + self.loc) * self.log_scale.exp(), self.log_scale.sum().expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.log_scale).exp() - self.loc


class InvertibleLinear(nn.Module):
    """y = x W^T with W = P L (U + diag(sign * exp(log_s))) (Glow's LU form): log|det W| = sum(log_s)."""

    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign", s.sign().float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def weight(self) -> torch.Tensor:
        eye = torch.eye(len(self.log_s), device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (y (B, D), logdet (B,))."""
        return x @ self.weight().T, self.log_s.sum().expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.weight(), y.T).T


class Coupling(nn.Module):
    """Affine coupling: the first half a conditions the second half b (B, D - D//2)."""

    def __init__(self, dim: int, hidden: int, cond_dim: int = 0):
        super().__init__()
        self.half = dim // 2
        rest = dim - self.half
        self.net = nn.Sequential(nn.Linear(self.half + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2 * rest))
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity map
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(rest))

    def _st(self, a: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(a if cond is None else torch.cat([a, cond], 1))
        s, t = h.chunk(2, dim=1)
        return self.scale * torch.tanh(s), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, :self.half], x[:, self.half:]
        s, t = self._st(a, cond)
        return torch.cat([a, b * s.exp() + t], 1), s.sum(1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a, b = y[:, :self.half], y[:, self.half:]
        s, t = self._st(a, cond)
        return torch.cat([a, (b - t) * (-s).exp()], 1)


class Flow(nn.Module):
    """``layers`` steps of ActNorm, invertible linear and affine coupling on (B, dim) data, with a
    standard normal base; ``num_classes > 0`` adds a class embedding to every conditioner."""

    def __init__(self, dim: int, layers: int = 8, hidden: int = 512, num_classes: int = 0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.num_classes = dim, num_classes
        cond_dim = 32 if num_classes > 0 else 0
        self.label = nn.Embedding(num_classes, cond_dim) if num_classes > 0 else None
        self.steps = nn.ModuleList(nn.ModuleList([ActNorm(dim), InvertibleLinear(dim, g),
                                                  Coupling(dim, hidden, cond_dim)]) for _ in range(layers))

    def _cond(self, y: torch.Tensor | None) -> torch.Tensor | None:
        if self.label is None:
            return None
        if y is None:
            raise ValueError("this flow is class-conditional: pass labels y")
        return self.label(y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (z (B, D), log|det dz/dx| (B,))."""
        cond, logdet = self._cond(y), torch.zeros(len(x), device=x.device)
        for norm, linear, coupling in self.steps:
            x, ld1 = norm(x)
            x, ld2 = linear(x)
            x, ld3 = coupling(x, cond)
            logdet = logdet + ld1 + ld2 + ld3
        return x, logdet

    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, D) -> x (B, D), the exact inverse of :meth:`forward`."""
        cond = self._cond(y)
        for norm, linear, coupling in reversed(self.steps):
            z = norm.inverse(linear.inverse(coupling.inverse(z, cond)))
        return z

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) (B,) in nats."""
        z, logdet = self(x, y)
        return -0.5 * (z.pow(2).sum(1) + self.dim * math.log(2 * math.pi)) + logdet

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """(n, dim) samples: inverse of z ~ N(0, temperature^2 I)."""
        return self.inverse(temperature * torch.randn(n, self.dim, generator=generator), y)


def bits_per_dim(log_prob: torch.Tensor, dim: int) -> float:
    """Mean -log p / (dim ln 2) over a batch of log-densities (nats)."""
    return float(-log_prob.mean() / (dim * math.log(2)))
