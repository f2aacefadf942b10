"""ViT weights from timm, DeiT and Hugging Face, loaded into nnlab's :class:`~nnlab.models.vit.ViT`.

Users' ViTs come as state dicts in one of two layouts (``.safetensors``, or ``.pth`` read with
``weights_only=True``; DeiT's release files wrap theirs as ``{"model": state_dict}``):

**timm / DeiT** (``timm.models.vision_transformer``, facebookresearch/deit)::

    patch_embed.proj.{weight (D, C, p, p), bias}   cls_token (1, 1, D)   pos_embed (1, 1 + N, D)
    blocks.{i}.norm1.*  blocks.{i}.attn.qkv.{weight (3D, D), bias}  blocks.{i}.attn.proj.*
    blocks.{i}.norm2.*  blocks.{i}.mlp.fc1.{weight (M, D), bias}    blocks.{i}.mlp.fc2.*
    norm.*  head.{weight (K, D), bias}

nnlab's ViT uses the same names and the same q/k/v row order ([q heads | k heads | v heads]),
except that its patch embedding is the bare convolution (``patch_embed.*``).

**Hugging Face** ``ViTForImageClassification``::

    vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection.*}
    vit.encoder.layer.{i}.layernorm_before.*  .attention.attention.{query,key,value}.*
    vit.encoder.layer.{i}.attention.output.dense.*  .layernorm_after.*
    vit.encoder.layer.{i}.intermediate.dense.*  .output.dense.*
    vit.layernorm.*  classifier.*

The number of heads cannot be read from the shapes (q/k/v weights are (D, D) whatever the head
count), so it comes from ``arch`` (``deit-tiny`` ...) or ``heads``. LayerNorm eps: 1e-6 (timm,
DeiT), 1e-12 (Hugging Face's default ``layer_norm_eps``).

Not supported: DeiT's *distilled* models (``dist_token``, ``head_dist``): their second special
token would be pruned like a patch by every pruning method here; loading one is refused with a
ConfigError naming the non-distilled weights to use instead.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from nnlab.errors import CheckpointError, ConfigError
from nnlab.models.vit import ViT, ViTConfig

# arch -> heads (the widths and depth are read from the weights)
ARCH_HEADS = {"deit-tiny": 3, "deit-small": 6, "deit-base": 12, "vit-tiny16": 3, "vit-s16": 6, "vit-b16": 12,
              "vit-l16": 16}
LN_EPS = {"timm": 1e-6, "hf": 1e-12}
_HF_BLOCK = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """``"timm"``, ``"hf"`` or ``"nnlab"`` from the key names; a ConfigError otherwise."""
    if "dist_token" in sd or "head_dist.weight" in sd:
        raise ConfigError("this is a distilled DeiT (dist_token / head_dist), which nnlab's pruners do not handle; "
                          "use the non-distilled weights (e.g. deit_tiny_patch16_224)")
    if "patch_embed.proj.weight" in sd:
        return "timm"
    if "vit.embeddings.cls_token" in sd:
        return "hf"
    if "patch_embed.weight" in sd and "cls_token" in sd:
        return "nnlab"
    raise ConfigError(f"not a ViT state dict in a known layout (timm/DeiT, Hugging Face ViT, nnlab); first keys: "
                      f"{sorted(sd)[:4]}")


def from_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/DeiT names -> nnlab names (the tensors themselves are unchanged)."""
    return {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in sd.items()}


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTForImageClassification`` names -> nnlab names; q, k, v stacked into qkv."""
    e = "vit.embeddings."
    out = {"cls_token": sd[e + "cls_token"], "pos_embed": sd[e + "position_embeddings"],
           "patch_embed.weight": sd[e + "patch_embeddings.projection.weight"],
           "patch_embed.bias": sd[e + "patch_embeddings.projection.bias"],
           "norm.weight": sd["vit.layernorm.weight"], "norm.bias": sd["vit.layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(_depth(sd, r"vit\.encoder\.layer\.(\d+)\.")):
        src, dst = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, 0)  # rows [q | k | v], heads contiguous in each
            for theirs, ours in _HF_BLOCK.items():
                out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
    return out


def _depth(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_weights(sd: dict[str, torch.Tensor], heads: int, ln_eps: float) -> ViTConfig:
    """The :class:`ViTConfig` of nnlab-named weights ``sd`` (widths, depth, patch and image size)."""
    dim, c, p, _ = sd["patch_embed.weight"].shape
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ConfigError(f"pos_embed has {n} patch positions, not a square grid")
    depth = _depth(sd, r"blocks\.(\d+)\.")
    return ViTConfig(image_size=grid * p, patch_size=p, in_chans=c, num_classes=sd["head.weight"].shape[0],
                     dim=dim, depth=depth, heads=heads, ln_eps=ln_eps,
                     head_dims=[sd[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3 // heads for i in range(depth)],
                     mlp_dims=[sd[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)],
                     attn_scale_dim=dim // heads)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` file (``weights_only=True``;
    a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for foreign or corrupt files
        raise CheckpointError(f"cannot read {path} as ViT weights ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a .safetensors or .pth "
                              "state dict") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def load_foreign_vit(path: str | Path, *, arch: str | None = None, heads: int | None = None) -> ViT:
    """An nnlab :class:`ViT` with the weights of a timm, DeiT or Hugging Face file (see the module
    docstring); ``arch`` (a key of :data:`ARCH_HEADS`) or ``heads`` gives the head count."""
    if heads is None:
        if arch not in ARCH_HEADS:
            raise ConfigError(f"the head count of a ViT is not in its weights: pass --arch (one of "
                              f"{', '.join(ARCH_HEADS)}) or heads=N")
        heads = ARCH_HEADS[arch]
    sd = read_state_dict(path)
    layout = detect_layout(sd)
    ours = {"timm": from_timm, "hf": from_hf, "nnlab": dict}[layout](sd)
    model = ViT(config_from_weights(ours, heads, LN_EPS.get(layout, 1e-6)))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or [k for k in unexpected if not k.startswith("pre_logits")]:
        raise CheckpointError(f"{path} does not fit a ViT ({len(missing)} missing keys, e.g. {missing[:2]}; "
                              f"unexpected {unexpected[:2]})")
    return model.eval()
