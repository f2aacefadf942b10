"""TrivialAugment (Müller & Hutter 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
Augmentation") as batched torch ops on (B, C, H, W) float images in [0, 1].

Each image gets one operation drawn uniformly from :data:`OPS` and one magnitude drawn uniformly
from ``bins`` levels of that operation's range ("wide" ranges, as torchvision's
``TrivialAugmentWide``, which nnlab cannot depend on); signed operations flip the sign with
probability 1/2. Every operation is a pure function ``op(x, m) -> x`` of a sub-batch x (b, C, H, W)
and its magnitudes m (b,), so each can be tested against a closed form, and the transform applies
each operation once to the images that drew it (about B / 14 per operation).

Differences from torchvision, on purpose: geometric operations sample with nearest-neighbour
interpolation in normalised coordinates (``align_corners=False``) and fill with black; ``equalize``
maps each channel through its own normalised cumulative histogram (the textbook form, not PIL's
bucket rounding); images stay float, and ``posterize`` / ``solarize`` act on the 8-bit value the
float stands for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) -> (b, 1, H, W) luma; a single-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: other + factor (x - other), clamped to [0, 1]; factor (b,)."""
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp_(0, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x (b, C, H, W) at output->input maps theta (b, 2, 3) in normalised coordinates."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _theta(b: int, dtype) -> torch.Tensor:
    return torch.eye(2, 3, dtype=dtype).repeat(b, 1, 1)


def identity(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x


def shear_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Output pixel (u, v) reads input (u + m v, v): m in [-0.99, 0.99]."""
    t = _theta(len(x), x.dtype)
    t[:, 0, 1] = m * x.shape[2] / x.shape[3]   # normalised units: v / (H / 2) -> u / (W / 2)
    return _affine(x, t)


def shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Output pixel (u, v) reads input (u, v + m u)."""
    t = _theta(len(x), x.dtype)
    t[:, 1, 0] = m * x.shape[3] / x.shape[2]
    return _affine(x, t)


def translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shift right by m pixels (m in [-32, 32]); black comes in."""
    t = _theta(len(x), x.dtype)
    t[:, 0, 2] = -2 * m / x.shape[3]
    return _affine(x, t)


def translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shift down by m pixels."""
    t = _theta(len(x), x.dtype)
    t[:, 1, 2] = -2 * m / x.shape[2]
    return _affine(x, t)


def rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rotate by m degrees about the centre (m in [-135, 135]); corners filled black."""
    a = m * math.pi / 180
    h, w = x.shape[2], x.shape[3]
    t = torch.zeros(len(x), 2, 3, dtype=x.dtype)
    t[:, 0, 0], t[:, 0, 1] = a.cos(), -a.sin() * h / w
    t[:, 1, 0], t[:, 1, 1] = a.sin() * w / h, a.cos()
    return _affine(x, t)


def brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with black by factor 1 + m (m in [-0.99, 0.99])."""
    return _blend(x, torch.zeros_like(x), 1 + m)


def color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own gray (saturation) by factor 1 + m."""
    return _blend(x, _gray(x).expand_as(x), 1 + m)


def contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray level by factor 1 + m."""
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True).expand_as(x), 1 + m)


def sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH-filtered image (3x3, centre 5, others 1, / 13; border pixels kept)
    by factor 1 + m."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return _blend(x, smooth, 1 + m)


def posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep the top m bits (m in 2..8) of each 8-bit value."""
    q = (2.0 ** (8 - m)).view(-1, 1, 1, 1)
    v = (x * 255).round()
    return torch.floor(v / q) * q / 255


def solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above threshold m (in [0, 1]; 1 leaves almost everything)."""
    return torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x)


def autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 1]; a flat channel is left as it is."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel's 8-bit values: v -> round(255 (cdf(v) - cdf_min) / (N - cdf_min))."""
    b, c, h, w = x.shape
    v = (x * 255).round().long().view(b * c, h * w)                          # (bc, N)
    hist = torch.zeros(b * c, 256, dtype=x.dtype).scatter_add_(1, v, torch.ones_like(x).view(b * c, -1))
    cdf = hist.cumsum(1)                                                      # (bc, 256)
    cdf_min = cdf.gather(1, v.amin(1, keepdim=True))                          # count at the lowest value
    denom = (h * w - cdf_min).clamp_min(1)
    lut = ((cdf - cdf_min) / denom * 255).round().clamp_(0, 255)              # (bc, 256)
    flat = (h * w - cdf_min) == 0                                             # one value only: keep it
    out = torch.where(flat, v.to(x.dtype), lut.gather(1, v)) / 255
    return out.view(b, c, h, w)


# name -> (op, magnitude at bin 0, at the last bin, signed); the "wide" ranges of TrivialAugment.
OPS = {
    "identity": (identity, 0.0, 0.0, False),
    "shear_x": (shear_x, 0.0, 0.99, True),
    "shear_y": (shear_y, 0.0, 0.99, True),
    "translate_x": (translate_x, 0.0, 32.0, True),
    "translate_y": (translate_y, 0.0, 32.0, True),
    "rotate": (rotate, 0.0, 135.0, True),
    "brightness": (brightness, 0.0, 0.99, True),
    "color": (color, 0.0, 0.99, True),
    "contrast": (contrast, 0.0, 0.99, True),
    "sharpness": (sharpness, 0.0, 0.99, True),
    "posterize": (posterize, 8.0, 2.0, False),
    "solarize": (solarize, 1.0, 0.0, False),
    "autocontrast": (autocontrast, 0.0, 0.0, False),
    "equalize": (equalize, 0.0, 0.0, False),
}


def magnitudes(name: str, level: torch.Tensor, bins: int, sign: torch.Tensor) -> torch.Tensor:
    """Bin ``level`` (b,) in [0, bins) -> the op's magnitude (b,), negated where ``sign`` (b,) is set
    for signed ops; posterize rounds to whole bits."""
    _, lo, hi, signed = OPS[name]
    m = lo + (hi - lo) * level.double() / max(bins - 1, 1)
    if name == "posterize":
        m = m.round()
    if signed:
        m = torch.where(sign, -m, m)
    return m.float()


@dataclass
class TrivialAugment:
    """One random op at one random magnitude per image: (B, C, H, W) in [0, 1] -> same shape.

    Draws, from ``generator`` in this order: the op index (B,), the magnitude bin (B,), the sign (B,).
    Reference: :func:`trivial_augment_reference` (the same draws, one image at a time)."""

    bins: int = 31

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        names = list(OPS)
        b = x.shape[0]
        op = torch.randint(0, len(names), (b,), generator=generator)
        level = torch.randint(0, self.bins, (b,), generator=generator)
        sign = torch.rand(b, generator=generator) < 0.5
        out = x.clone()
        for i, name in enumerate(names):
            idx = (op == i).nonzero().squeeze(1)
            if idx.numel() and name != "identity":
                m = magnitudes(name, level[idx], self.bins, sign[idx])
                out[idx] = OPS[name][0](x[idx], m).to(x.dtype)
        return out


def trivial_augment_reference(x: torch.Tensor, generator: torch.Generator, bins: int = 31) -> torch.Tensor:
    """Plain per-image loop doing what :class:`TrivialAugment` does, with the same draws."""
    names = list(OPS)
    b = x.shape[0]
    op = torch.randint(0, len(names), (b,), generator=generator)
    level = torch.randint(0, bins, (b,), generator=generator)
    sign = torch.rand(b, generator=generator) < 0.5
    out = []
    for j in range(b):
        name = names[int(op[j])]
        m = magnitudes(name, level[j:j + 1], bins, sign[j:j + 1])
        out.append(OPS[name][0](x[j:j + 1], m)[0].to(x.dtype))
    return torch.stack(out)
