"""Latent-modulated SIREN (Dupont et al. 2022, "From data to functa").

One shared SIREN maps coordinates to values; each data point is a latent vector ``z`` that a
latent map turns into per-layer shift (and optionally scale) modulations::

    h_1 = sin(w0 * (scale_1 * (W_1 x + b_1) + shift_1))
    h_l = sin(w0 * (scale_l * (W_l h_{l-1} + b_l) + shift_l))      l = 2 .. depth-1
    out = W_out h_{depth-1} + b_out + 0.5

``depth`` counts linear layers, as in the functa code: ``depth - 1`` modulated sine layers and
one linear output layer.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from nnlab.errors import ConfigError


@dataclass
class FunctaConfig:
    """Architecture of a :class:`LatentModulatedSiren`."""

    width: int = 64                     # units per sine layer
    depth: int = 4                      # linear layers: depth-1 modulated sine layers + output
    w0: float = 30.0                    # sine frequency factor: sin(w0 (W x + b))
    in_dims: int = 2                    # 2 for images, 3 for volumes
    out_channels: int = 1               # 1 grey, 3 RGB
    latent_dim: int = 128               # numbers per image (the functa latent)
    latent_hidden: list[int] = field(default_factory=list)  # hidden widths of the latent-map MLP; empty = linear map
    modulate_shift: bool = True         # FiLM shifts of every sine layer
    modulate_scale: bool = False        # FiLM scales of every sine layer
    meta_sgd: bool = False              # learned per-parameter inner rates (Meta-SGD)
    meta_sgd_init: tuple[float, float] = (0.005, 0.1)
    meta_sgd_steps: int = 0             # Meta-SGD rates per inner step (MAML++'s per-step rates); 0 = one set for all
    inner_lr: float = 1e-2             # plain SGD inner rate (used when meta_sgd is False)

    def __post_init__(self):
        self.latent_hidden = list(self.latent_hidden)
        self.meta_sgd_init = tuple(self.meta_sgd_init)
        for name in ("width", "in_dims", "out_channels", "latent_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"functa {name} must be at least 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.latent_hidden):
            raise ConfigError(f"functa latent_hidden widths must each be at least 1, got {self.latent_hidden}")
        if self.depth < 2:
            raise ConfigError(f"functa depth must be at least 2 (one sine layer + output), got {self.depth}")
        if not (self.modulate_shift or self.modulate_scale):
            raise ConfigError("functa needs shift and/or scale modulations; set modulate_shift=True")
        self._check_rates()

    def _check_rates(self) -> None:
        """w0 and the inner-loop rates: positive finite numbers (a negative rate would ascend the loss)."""
        positive = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0  # noqa: E731
        if not positive(self.w0):
            raise ConfigError(f"functa w0 (the SIREN frequency) must be a positive finite number, got {self.w0}")
        if not positive(self.inner_lr):
            raise ConfigError(f"functa inner_lr must be a positive finite number, got {self.inner_lr}")
        lo, hi = self.meta_sgd_init
        if not (positive(lo) and positive(hi) and lo <= hi):
            raise ConfigError("functa meta_sgd_init must be (low, high) with 0 < low <= high, "
                              f"got {self.meta_sgd_init}")
        if self.meta_sgd_steps < 0:
            raise ConfigError(f"functa meta_sgd_steps must be >= 0 (0 = one set of rates for every inner step), "
                              f"got {self.meta_sgd_steps}")
        if self.meta_sgd_steps and not self.meta_sgd:
            raise ConfigError("functa meta_sgd_steps needs Meta-SGD rates: add --meta-sgd (meta_sgd=True) or drop it")

    @property
    def num_modulated(self) -> int:
        return self.depth - 1

    @property
    def modulation_dim(self) -> int:
        kinds = int(self.modulate_shift) + int(self.modulate_scale)
        return kinds * self.num_modulated * self.width


def coordinate_grid(size: int | tuple[int, ...], dims: int = 2, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates in [0, 1]: (prod(size), dims), row-major ("ij") order.

    A size of N puts samples at (i + 0.5) / N, so grids of any resolution cover the same square.
    """
    sizes = (size,) * dims if isinstance(size, int) else tuple(size)
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


RENDER_MAX_BYTES = 2**31  # 2 GiB of rendered output: beyond it a render is refused, not an allocation error


class LatentMap(nn.Module):
    """Latent (B, latent_dim) -> modulations (B, modulation_dim): linear, or an MLP with ReLUs."""

    def __init__(self, latent_dim: int, out_dim: int, hidden: list[int]):
        super().__init__()
        sizes = [latent_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].bias)  # zero latent -> zero shift (scales get +1 later)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LatentModulatedSiren(nn.Module):
    """Shared SIREN with per-datum latent modulations. See the module docstring for the maths."""

    def __init__(self, config: FunctaConfig):
        super().__init__()
        c = self.config = config
        self.first = nn.Linear(c.in_dims, c.width)
        self.hidden = nn.ModuleList(nn.Linear(c.width, c.width) for _ in range(c.depth - 2))
        self.out = nn.Linear(c.width, c.out_channels)
        self.latent_map = LatentMap(c.latent_dim, c.modulation_dim, c.latent_hidden)
        if c.meta_sgd:
            lo, hi = c.meta_sgd_init
            shape = (c.meta_sgd_steps, c.latent_dim) if c.meta_sgd_steps else (c.latent_dim,)
            self.meta_lr = nn.Parameter(torch.empty(shape).uniform_(lo, hi))
        self._siren_init()

    @torch.no_grad()
    def _siren_init(self) -> None:
        c = self.config
        for i, layer in enumerate([self.first, *self.hidden, self.out]):
            fan_in = layer.in_features
            bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / c.w0
            layer.weight.uniform_(-bound, bound)
            layer.bias.uniform_(-bound, bound)

    def inner_lr(self, step: int = 0) -> torch.Tensor:
        """Inner step ``step``'s learning rate (0 = the first step): (latent_dim,) Meta-SGD rates clipped
        to [0, 1], or a scalar. With ``meta_sgd_steps`` = k each of the first k steps has its own rates
        (MAML++'s per-step rates, Antoniou et al. 2019) and later steps reuse the last set."""
        if self.config.meta_sgd:
            rates = self.meta_lr if self.meta_lr.dim() == 1 else self.meta_lr[min(step, self.meta_lr.shape[0] - 1)]
            return rates.clamp(0.0, 1.0)
        return torch.tensor(self.config.inner_lr, device=self.out.weight.device)

    def modulations(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """z (B, latent_dim) -> (shift, scale), each (B, depth-1, width) or None when not used."""
        c = self.config
        m = self.latent_map(z).view(z.shape[0], -1, c.num_modulated, c.width)
        shift = m[:, 0] if c.modulate_shift else None
        scale = m[:, -1] + 1.0 if c.modulate_scale else None
        return shift, scale

    def forward(self, z: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim), coords (P, in_dims) -> values (B, P, out_channels). Plain autograd."""
        shift, scale = self.modulations(z)
        h = coords.unsqueeze(0)
        for i, layer in enumerate([self.first, *self.hidden]):
            a = layer(h)                                           # (B or 1, P, W)
            if scale is not None:
                a = a * scale[:, None, i]
            if shift is not None:
                a = a + shift[:, None, i]
            h = torch.sin(self.config.w0 * a)
        return self.out(h) + 0.5

    def render(self, z: torch.Tensor, size: int | tuple[int, int], chunk_pixels: int | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, C, H, W) at any resolution (values not clamped).

        The pixels go through the network ``chunk_pixels`` at a time (default: about 2**24 hidden
        activations per chunk), so a large render needs memory for its output, not for B x H x W x
        width activations. An output above RENDER_MAX_BYTES is refused with a ConfigError."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(int(n) < 1 for n in hw):
            raise ConfigError(f"render size must be a positive number of pixels (or H, W), got {size}")
        b, c = z.shape[0], self.config.out_channels
        need = b * c * hw[0] * hw[1] * z.element_size()
        if need > RENDER_MAX_BYTES:
            raise ConfigError(f"rendering {b} image(s) at {hw[0]}x{hw[1]} needs {need / 2**30:.1f} GiB; "
                              "choose a smaller --size or fewer images")
        coords = coordinate_grid(hw, device=z.device, dtype=z.dtype)       # (H*W, in_dims)
        step = chunk_pixels or max(1, 2**24 // max(1, b * self.config.width))
        out = torch.cat([self(z, part) for part in coords.split(step)], dim=1)  # (B, H*W, C)
        return out.transpose(1, 2).reshape(b, c, *hw)


def config_hash(model: LatentModulatedSiren) -> str:
    """Short hash of the config and weights: functasets record which model made them."""
    h = hashlib.sha256(repr(sorted(asdict(model.config).items())).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
