"""The floor a generative model on latents must beat: a full-covariance Gaussian fitted to them.

``fit`` takes the sample mean and covariance (float64) of standardised latents (N, D); sampling
is ``mean + L eps`` with ``L L^T = cov`` (Cholesky, with a small ridge so a rank-deficient
covariance still factors).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianModel(nn.Module):
    """N(mean, cov) over (D,) vectors; buffers mean (D,), cov (D, D), chol (D, D), float64."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("cov", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("chol", torch.eye(dim, dtype=torch.float64))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, ridge: float = 1e-6) -> "GaussianModel":
        """Fit to x (N, D): sample mean and unbiased covariance."""
        x = x.double()
        self.mean.copy_(x.mean(0))
        self.cov.copy_(torch.cov(x.T).reshape(self.dim, self.dim))
        self.chol.copy_(torch.linalg.cholesky(self.cov + ridge * torch.eye(self.dim, dtype=torch.float64)))
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) float32 samples."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + eps @ self.chol.T).float()

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, L L^T) (N,) in nats."""
        diff = (x.double() - self.mean).T
        sol = torch.linalg.solve_triangular(self.chol, diff, upper=False)
        logdet = 2 * torch.diagonal(self.chol).log().sum()
        return (-0.5 * (sol.pow(2).sum(0) + logdet + self.dim * math.log(2 * math.pi))).float()
