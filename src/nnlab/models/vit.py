"""Vision Transformer (Dosovitskiy et al. 2021), written for pruning studies.

Pre-norm blocks: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. What pruning needs:

* **Token removal**: every block works on any number of tokens T (CLS first), so a pruner can
  gather a subset of tokens between blocks (see :mod:`nnlab.prune`); nothing is masked.
* **Per-block widths**: ``ViTConfig.head_dims[i]`` (q/k/v width per head) and ``mlp_dims[i]``
  (MLP hidden width) may differ per block, so P-ViT can build a physically slimmer model. The
  attention scale stays ``attn_scale_dim ** -0.5`` of the original model.
* **Attention probabilities**: :meth:`Attention.forward_with_probs` (plain softmax reference)
  returns them for CP-ViT; :meth:`Attention.forward` is the fast fused path
  (``F.scaled_dot_product_attention``); both take an additive bias (B, 1, 1, T) or None.
* **Patch dropout** (optional, ``ViTConfig.patch_dropout``; Liu et al. 2023, "PatchDropout:
  Economizing Vision Transformers Using Patch Dropout"): in training mode each image keeps a random
  subset of round((1 - p) N) of its N patch tokens (CLS always kept) after the position embedding,
  so a training step costs about (1 - p) of the transformer's work, and it regularises. Evaluation keeps
  every token, and :func:`nnlab.prune.sweep.load_base` turns it off. Measured on CIFAR-10 (BENCHMARKS.md,
  "Patch dropout"): nearly the same accuracy per epoch at about half the work (the published CIFAR-10 base
  model is trained with p = 0.5), but not a model that CP-ViT prunes more easily (it loses 1.39 points at
  ratio 0.3 on that base, 0.24 on the first base without it). Reference: :func:`patch_dropout_reference`.
* **Position embeddings** resizable by bicubic interpolation (:func:`resize_pos_embed`).
* **Convolutional stem** (optional, ``ViTConfig.stem``; Xiao et al. 2021, "Early convolutions help
  transformers see better"): log2(patch_size) 3x3 stride-2 convolutions with BatchNorm and ReLU,
  then a 1x1 convolution to ``dim``, in place of the patch-size convolution. It still gives one token
  per patch (e.g. 8 x 8 = 64 on 32 px images with patch 4), so every pruning method applies as is.

Shapes: images (B, C, H, W); tokens (B, T, D) with T = 1 + N patches; logits (B, num_classes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnlab.errors import ConfigError
from nnlab.models import MODELS


@dataclass
class ViTConfig:
    """Architecture of a :class:`ViT`. Widths per block default to the uniform ViT widths."""

    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    head_dims: list[int] = field(default_factory=list)   # per block; [] -> dim // heads
    mlp_dims: list[int] = field(default_factory=list)    # per block; [] -> int(dim * mlp_ratio)
    attn_scale_dim: int = 0                              # 0 -> dim // heads
    drop_path: float = 0.0                               # stochastic depth at the last block
    patch_dropout: float = 0.0                           # training only: drop this fraction of patch tokens per image
    dropout: float = 0.0
    ln_eps: float = 1e-6
    input_size: int = 0                                  # >0: inputs of this size are resized to image_size
    stem: list[int] = field(default_factory=list)        # conv stem channels (one 3x3 stride-2 conv each); [] = none

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ViT {name} must be an integer >= 1, got {value!r}")
        if not self.mlp_ratio > 0 or not 0 <= self.dropout < 1 or not 0 <= self.drop_path < 1:
            raise ConfigError(f"ViT needs mlp_ratio > 0 and dropout, drop_path in [0, 1); got {self.mlp_ratio}, "
                              f"{self.dropout}, {self.drop_path}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViT image_size {self.image_size} is not a multiple of patch_size "
                              f"{self.patch_size}; pick a patch size that divides it")
        if self.dim % self.heads:
            raise ConfigError(f"ViT dim {self.dim} is not divisible by heads {self.heads}")
        self.head_dims = list(self.head_dims) or [self.dim // self.heads] * self.depth
        self.mlp_dims = list(self.mlp_dims) or [int(self.dim * self.mlp_ratio)] * self.depth
        self.attn_scale_dim = self.attn_scale_dim or self.dim // self.heads
        if len(self.head_dims) != self.depth or len(self.mlp_dims) != self.depth:
            raise ConfigError(f"head_dims and mlp_dims need {self.depth} entries (one per block)")
        self.stem = [int(c) for c in self.stem]
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"ViT patch_dropout {self.patch_dropout} is not in [0, 1); it is the fraction "
                              f"of patch tokens dropped per training image (e.g. 0.5)")
        if self.stem and 2 ** len(self.stem) != self.patch_size:
            raise ConfigError(f"a conv stem of {len(self.stem)} stride-2 convolutions makes patches of "
                              f"{2 ** len(self.stem)} pixels, not patch_size {self.patch_size}; give "
                              f"log2(patch_size) = {math.log2(self.patch_size):g} stem channels")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q, k, v: (B, H, T, d); bias broadcastable to (B, H, T, T).

    Returns (out (B, H, T, d), probs (B, H, T, T)); probs[b, h, i, j] is query i's weight on key j.
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    return probs @ v, probs


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fused attention, numerically equal to :func:`attention_reference`'s out: (B, H, T, d).

    bf16 q, k, v on a CPU are attended in float32 (the output cast back to bf16): torch's bf16 CPU
    flash-attention kernel took 32 ms per backward call against 4.6 ms in float32 (vit-cifar-cpu,
    batch 128, 33 tokens, 2 threads, an AMX host), which made a bf16 training step slower than a
    float32 one; its forward was slower too (BENCHMARKS.md, "Session 29")."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):   # else autocast would cast the inputs back to bf16
            return attention_fast(q.float(), k.float(), v.float(), scale, bias).to(q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class Attention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of width ``head_dim`` on (B, T, dim) tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, scale_dim: int):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)   # rows: [q heads | k heads | v heads]
        self.proj = nn.Linear(heads * head_dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> q, k, v each (B, H, T, head_dim)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """out: (B, H, T, head_dim) -> projected (B, T, dim)."""
        b, h, t, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, h * d))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim), fused kernel."""
        q, k, v = self.split_heads(x)
        return self.merge_heads(attention_fast(q, k, v, self.scale, bias))

    def forward_with_keys(self, x: torch.Tensor, bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (out (B, T, dim), keys summed over heads (B, T, head_dim)): ToMe's
        similarity metric, whose cosine is that of the heads' mean. Summed slice by slice: ``k.mean(1)``
        over the heads' strided layout took 1.5 ms per block of a 64-image batch on 1 thread, the
        slices 0.4 ms."""
        q, k, v = self.split_heads(x)
        keys = k[:, 0]
        for h in range(1, k.shape[1]):
            keys = keys + k[:, h]
        return self.merge_heads(attention_fast(q, k, v, self.scale, bias)), keys

    def forward_with_probs(self, x: torch.Tensor, bias: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, dim) -> (out (B, T, dim), probs (B, H, T, T)), plain softmax."""
        q, k, v = self.split_heads(x)
        out, probs = attention_reference(q, k, v, self.scale, bias)
        return self.merge_heads(out), probs


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on (B, T, dim) with ``hidden`` units."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block on (B, T, dim) tokens; T may change between blocks."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, scale_dim: int,
                 drop_path: float = 0.0, dropout: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, head_dim, scale_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = drop_path

    def _dp(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch per sample while training."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        x = x + self._dp(self.attn(self.norm1(x), bias))
        return x + self._dp(self.mlp(self.norm2(x)))


def conv_stem(in_chans: int, channels: list[int]) -> nn.Module:
    """3x3 stride-2 conv + BatchNorm + ReLU per entry of ``channels``: (B, C, H, W) ->
    (B, channels[-1], H / 2^k, W / 2^k); nn.Identity() for no channels."""
    if not channels:
        return nn.Identity()
    layers, prev = [], in_chans
    for ch in channels:
        layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        prev = ch
    return nn.Sequential(*layers)


def keep_random_patches(tokens: torch.Tensor, drop: float) -> torch.Tensor:
    """Patch dropout: tokens (B, 1 + N, D), CLS first -> (B, 1 + K, D), K = max(1, round((1 - drop) N)).

    Each image keeps its own uniformly random K patches, in their original order (a later method that
    reads token positions sees them sorted), drawn from torch's global generator.
    """
    b, t, d = tokens.shape
    n = t - 1
    k = max(1, round((1.0 - drop) * n))
    if k >= n:
        return tokens
    keep = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :k].sort(dim=1).values + 1   # (B, K)
    patches = tokens.gather(1, keep.unsqueeze(-1).expand(b, k, d))                             # (B, K, D)
    return torch.cat([tokens[:, :1], patches], dim=1)


def patch_dropout_reference(tokens: torch.Tensor, drop: float, generator_state: torch.Tensor) -> torch.Tensor:
    """Plain per-image loop for :func:`keep_random_patches` (same draws from ``generator_state``,
    a saved ``torch.get_rng_state()``): (B, 1 + N, D) -> (B, 1 + K, D)."""
    torch.set_rng_state(generator_state)
    b, t, _ = tokens.shape
    k = max(1, round((1.0 - drop) * (t - 1)))
    scores = torch.rand(b, t - 1)
    rows = []
    for i in range(b):
        order = sorted(range(t - 1), key=lambda j: scores[i, j].item())[:k]
        rows.append(torch.stack([tokens[i, 0]] + [tokens[i, 1 + j] for j in sorted(order)]))
    return torch.stack(rows)


def resize_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """pos: (1, 1 + g*g, D) -> (1, 1 + new_grid**2, D), bicubic over the patch grid, CLS kept."""
    cls, grid = pos[:, :1], pos[:, 1:]
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ConfigError(f"position embedding has {grid.shape[1]} patch entries, not a square grid")
    if g == new_grid:
        return pos
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new_grid ** 2, -1)], dim=1)


class ViT(nn.Module):
    """Vision Transformer classifier: (B, C, H, W) images -> (B, num_classes) logits."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        self.stem = conv_stem(c.in_chans, c.stem)  # nn.Identity() without a stem
        if c.stem:
            self.patch_embed = nn.Conv2d(c.stem[-1], c.dim, 1)
        else:
            self.patch_embed = nn.Conv2d(c.in_chans, c.dim, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + c.num_patches, c.dim) * 0.02)
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.head_dims[i], c.mlp_dims[i], c.attn_scale_dim, rates[i], c.dropout,
                  c.ln_eps) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.apply(_init_weights)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + N, dim): [CLS, patches] + position embedding; in training
        mode with ``patch_dropout`` p, (B, 1 + K, dim) with K = round((1 - p) N) random patches per image."""
        c = self.config
        if c.input_size and c.input_size != c.image_size and x.shape[-1] == c.input_size:
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", align_corners=False)
        if x.shape[1:] != (c.in_chans, c.image_size, c.image_size):
            raise ConfigError(f"this ViT takes ({c.in_chans}, {c.image_size}, {c.image_size}) images, "
                              f"got {tuple(x.shape[1:])}; resize the data or call set_image_size()")
        patches = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)   # (B, N, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        if self.training and c.patch_dropout > 0:
            tokens = keep_random_patches(tokens, c.patch_dropout)   # (B, 1 + K, dim)
        return self.pos_drop(tokens)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, dim) with CLS first -> logits (B, num_classes)."""
        return self.head(self.norm(tokens[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.classify(tokens)

    def set_image_size(self, image_size: int) -> None:
        """Accept (image_size x image_size) inputs from now on by interpolating the position embedding."""
        c = self.config
        new = dataclasses.replace(c, image_size=image_size)  # validates divisibility
        self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, new.grid))
        self.config = new

    def reset_head(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one for ``num_classes`` classes."""
        self.head = nn.Linear(self.config.dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# name -> architecture (image size, classes and channels come from the data set)
VIT_PRESETS: dict[str, dict] = {
    "vit-b16": dict(patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0),
    "vit-s16": dict(patch_size=16, dim=384, depth=12, heads=6, mlp_ratio=4.0),
    "vit-tiny-cifar": dict(patch_size=4, dim=192, depth=6, heads=3, mlp_ratio=2.0),
    "vit-small-cifar": dict(patch_size=4, dim=192, depth=9, heads=3, mlp_ratio=2.0),
    # CPU-trainable CIFAR-10 ViT (issue 13): a conv stem (32 -> 16 -> 8 px, 64 tokens), 7 pre-norm blocks
    "vit-cifar-cpu": dict(patch_size=4, dim=192, depth=7, heads=4, mlp_ratio=2.0, stem=[48, 96]),
    "vit-mnist": dict(patch_size=4, dim=64, depth=4, heads=2, mlp_ratio=2.0),
    "vit-test": dict(patch_size=4, dim=16, depth=3, heads=2, mlp_ratio=2.0),
}
DEFAULT_IMAGE_SIZE = {"vit-b16": 224, "vit-s16": 224}


def build_vit(name: str, *, num_classes: int, in_chans: int, image_size: int | None = None,
              **options) -> ViT:
    """Preset ``name`` with ``options`` (any :class:`ViTConfig` field) overriding it.

    ``npz=PATH`` loads Google ViT weights (position embedding interpolated to the model's size,
    head replaced for ``num_classes``); the file's architecture then wins over the preset.
    ``resize_to=S`` builds the model for S x S images and resizes the ``image_size`` inputs it gets
    (bilinear, inside :meth:`ViT.embed`): e.g. CIFAR-10 at 32 px fine-tuned at 224 px.
    """
    npz, resize_to = options.pop("npz", None), options.pop("resize_to", None)
    size = resize_to or image_size or DEFAULT_IMAGE_SIZE.get(name, 32)
    input_size = image_size if resize_to and image_size else 0
    if npz:
        from nnlab.models.vit_npz import load_vit_npz
        model = load_vit_npz(npz, num_classes=num_classes, image_size=size)
        model.config = dataclasses.replace(model.config, input_size=input_size)
        return model
    values = {**VIT_PRESETS[name], **options, "input_size": input_size}
    unknown = set(values) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        raise ConfigError(f"unknown ViT option(s) {sorted(unknown)}; valid: "
                          f"{[f.name for f in dataclasses.fields(ViTConfig)]}")
    return ViT(ViTConfig(image_size=size, in_chans=in_chans, num_classes=num_classes, **values))


def _register(name: str) -> None:
    def factory(*, num_classes: int = 10, in_chans: int = 3, image_size: int | None = None, **options):
        return build_vit(name, num_classes=num_classes, in_chans=in_chans, image_size=image_size, **options)
    factory.__doc__ = f"ViT preset {name!r}: {VIT_PRESETS[name]}"
    MODELS.register(name, factory)


for _name in VIT_PRESETS:
    _register(_name)
