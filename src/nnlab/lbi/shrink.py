"""DessiLBI's shrinkage as pure tensor functions: element-wise soft threshold, group shrinkage
per output filter, Gamma's support, and the per-filter factor of the fused path."""
from __future__ import annotations

import torch


SHRINK_KINDS = ("auto", "group", "elementwise")


# --------------------------------------------------------------------------- pure tensor functions


def soft_threshold(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Element-wise shrinkage ``sign(v) * max(|v| - lam, 0)``; v: any shape -> same shape."""
    return v - v.clamp(-lam, lam)


def group_shrink(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Group shrinkage per slice along dim 0: ``max(0, 1 - lam / ||v_g||) * v_g``.

    v: (C_out, ...) e.g. a conv weight (C_out, C_in, kh, kw) -> same shape; a zero group stays 0.
    """
    norms = v.reshape(v.shape[0], -1).norm(dim=1)  # (C_out,)
    factor = (1 - lam / norms.clamp_min(1e-30)).clamp_min_(0)
    return v * factor.view(-1, *([1] * (v.ndim - 1)))


def shrink(v: torch.Tensor, lam: float, kind: str) -> torch.Tensor:
    """``group_shrink`` (kind ``"group"``) or ``soft_threshold`` (``"elementwise"``); same shape as v."""
    return group_shrink(v, lam) if kind == "group" else soft_threshold(v, lam)


def support(gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """Boolean support of Gamma: per filter (C_out,) for ``"group"``, else element-wise (same shape)."""
    if kind == "group":
        return gamma.reshape(gamma.shape[0], -1).ne(0).any(dim=1)
    return gamma.ne(0)


def group_scale(v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-filter factor s (C_out,) with ``Gamma == s * V`` filter by filter (0 where Gamma is 0);
    v, gamma: (C_out, ...)."""
    vn = v.reshape(v.shape[0], -1)
    gn = gamma.reshape(gamma.shape[0], -1)
    num, den = (gn * vn).sum(1), (vn * vn).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(den))
