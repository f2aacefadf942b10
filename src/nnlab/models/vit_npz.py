"""Google ViT ``.npz`` checkpoints (google-research/vision_transformer layout) <-> :class:`ViT`.

Key layout (Flax parameter paths joined by ``/``; kernels are (in, out), conv kernels HWIO)::

    embedding/kernel (p, p, C, D), embedding/bias (D,)      cls (1, 1, D)
    Transformer/posembed_input/pos_embedding (1, 1 + N, D)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}, .../LayerNorm_2/{scale,bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, d)
        .../{query,key,value}/bias (H, d), .../out/kernel (H, d, D), .../out/bias (D,)
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel (D, M), Dense_1/kernel (M, D), biases
    Transformer/encoder_norm/{scale,bias}                  head/kernel (D, K), head/bias (K,)

``pre_logits/*`` (the ImageNet-21k representation layer) is ignored, as when fine-tuning in the
ViT papers. Shapes are read from the file, so slimmed models (per-block widths) round-trip too.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from nnlab.errors import CheckpointError
from nnlab.models.vit import ViT, ViTConfig, resize_pos_embed

BLOCK = "Transformer/encoderblock_{}"
ATTN = BLOCK + "/MultiHeadDotProductAttention_1"
MLP = BLOCK + "/MlpBlock_3"


def vit_to_npz_dict(model: ViT) -> dict[str, np.ndarray]:
    """All weights of ``model`` as float32 arrays under Google's key layout."""
    c, out = model.config, {}
    a = lambda t: t.detach().cpu().float().numpy()  # noqa: E731
    out["embedding/kernel"] = a(model.patch_embed.weight.permute(2, 3, 1, 0))
    out["embedding/bias"] = a(model.patch_embed.bias)
    out["cls"] = a(model.cls_token)
    out["Transformer/posembed_input/pos_embedding"] = a(model.pos_embed)
    for i, blk in enumerate(model.blocks):
        for name, ln in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            out[f"{BLOCK.format(i)}/{name}/scale"], out[f"{BLOCK.format(i)}/{name}/bias"] = a(ln.weight), a(ln.bias)
        h, d = c.heads, c.head_dims[i]
        w = blk.attn.qkv.weight.view(3, h, d, c.dim)
        b = blk.attn.qkv.bias.view(3, h, d)
        for j, name in enumerate(("query", "key", "value")):
            out[f"{ATTN.format(i)}/{name}/kernel"] = a(w[j].permute(2, 0, 1))   # (D, H, d)
            out[f"{ATTN.format(i)}/{name}/bias"] = a(b[j])
        out[f"{ATTN.format(i)}/out/kernel"] = a(blk.attn.proj.weight.t().reshape(h, d, c.dim))
        out[f"{ATTN.format(i)}/out/bias"] = a(blk.attn.proj.bias)
        for j, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            out[f"{MLP.format(i)}/Dense_{j}/kernel"], out[f"{MLP.format(i)}/Dense_{j}/bias"] = a(fc.weight.t()), a(fc.bias)
    out["Transformer/encoder_norm/scale"] = a(model.norm.weight)
    out["Transformer/encoder_norm/bias"] = a(model.norm.bias)
    out["head/kernel"], out["head/bias"] = a(model.head.weight.t()), a(model.head.bias)
    return out


def export_vit_npz(model: ViT, path: str | Path) -> Path:
    """Write ``model`` as a Google-layout ``.npz`` file (uncompressed, like the originals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **vit_to_npz_dict(model))
    return path


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file; a :class:`CheckpointError` if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ViT checkpoint {path} does not exist; download e.g. ViT-B_16.npz "
                              "from the google-research/vision_transformer bucket")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable .npz file ({exc})") from None


def config_from_npz(arrays: dict[str, np.ndarray]) -> ViTConfig:
    """The :class:`ViTConfig` that the arrays describe (image size from the position grid)."""
    _need(arrays, "embedding/kernel", "Transformer/posembed_input/pos_embedding", "head/kernel")
    p, _, in_chans, dim = arrays["embedding/kernel"].shape
    depth = sum(1 for k in arrays if k.endswith("LayerNorm_0/scale") and "encoderblock_" in k)
    grid = int(round((arrays["Transformer/posembed_input/pos_embedding"].shape[1] - 1) ** 0.5))
    q = [arrays[f"{ATTN.format(i)}/query/kernel"].shape for i in range(depth)] if depth else []
    if not q:
        raise CheckpointError("the .npz file has no Transformer/encoderblock_0; it is not a ViT checkpoint")
    heads = q[0][1]
    mlp = [arrays[f"{MLP.format(i)}/Dense_0/kernel"].shape[1] for i in range(depth)]
    return ViTConfig(image_size=grid * p, patch_size=p, in_chans=in_chans, dim=dim, depth=depth,
                     heads=heads, num_classes=arrays["head/kernel"].shape[1], mlp_ratio=mlp[0] / dim,
                     head_dims=[s[2] for s in q], mlp_dims=mlp, attn_scale_dim=dim // heads)


def _need(arrays: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise CheckpointError(f"the .npz file lacks {', '.join(missing)}; expected Google's ViT layout "
                              "(embedding/kernel, cls, Transformer/encoderblock_0/..., head/kernel)")


def _t(arrays: dict, key: str) -> torch.Tensor:
    _need(arrays, key)
    return torch.from_numpy(np.ascontiguousarray(arrays[key])).float()


def _load_block(model: ViT, i: int, arrays: dict) -> None:
    blk, c = model.blocks[i], model.config
    blk.norm1.weight.copy_(_t(arrays, f"{BLOCK.format(i)}/LayerNorm_0/scale"))
    blk.norm1.bias.copy_(_t(arrays, f"{BLOCK.format(i)}/LayerNorm_0/bias"))
    blk.norm2.weight.copy_(_t(arrays, f"{BLOCK.format(i)}/LayerNorm_2/scale"))
    blk.norm2.bias.copy_(_t(arrays, f"{BLOCK.format(i)}/LayerNorm_2/bias"))
    names = ("query", "key", "value")
    w = [_t(arrays, f"{ATTN.format(i)}/{n}/kernel").permute(1, 2, 0).reshape(-1, c.dim) for n in names]
    blk.attn.qkv.weight.copy_(torch.cat(w))
    blk.attn.qkv.bias.copy_(torch.cat([_t(arrays, f"{ATTN.format(i)}/{n}/bias").reshape(-1) for n in names]))
    blk.attn.proj.weight.copy_(_t(arrays, f"{ATTN.format(i)}/out/kernel").reshape(-1, c.dim).t())
    blk.attn.proj.bias.copy_(_t(arrays, f"{ATTN.format(i)}/out/bias"))
    for j, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
        fc.weight.copy_(_t(arrays, f"{MLP.format(i)}/Dense_{j}/kernel").t())
        fc.bias.copy_(_t(arrays, f"{MLP.format(i)}/Dense_{j}/bias"))


@torch.no_grad()
def vit_from_npz_dict(arrays: dict[str, np.ndarray], *, num_classes: int | None = None,
                      image_size: int | None = None) -> ViT:
    """Build a :class:`ViT` from Google-layout arrays.

    ``image_size``: interpolate the position embedding for this input size (multiple of the patch).
    ``num_classes``: replace the head by a zero-initialised one when it differs from the file's.
    """
    config = config_from_npz(arrays)
    model = ViT(config)
    model.patch_embed.weight.copy_(_t(arrays, "embedding/kernel").permute(3, 2, 0, 1))
    model.patch_embed.bias.copy_(_t(arrays, "embedding/bias"))
    model.cls_token.copy_(_t(arrays, "cls"))
    model.pos_embed.copy_(_t(arrays, "Transformer/posembed_input/pos_embedding"))
    for i in range(config.depth):
        _load_block(model, i, arrays)
    model.norm.weight.copy_(_t(arrays, "Transformer/encoder_norm/scale"))
    model.norm.bias.copy_(_t(arrays, "Transformer/encoder_norm/bias"))
    model.head.weight.copy_(_t(arrays, "head/kernel").t())
    model.head.bias.copy_(_t(arrays, "head/bias"))
    if image_size is not None and image_size != config.image_size:
        model.set_image_size(image_size)
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_head(num_classes)
    return model


def load_vit_npz(path: str | Path, *, num_classes: int | None = None,
                 image_size: int | None = None) -> ViT:
    """Load a Google ViT ``.npz`` file (see :func:`vit_from_npz_dict` for the options)."""
    return vit_from_npz_dict(read_npz(path), num_classes=num_classes, image_size=image_size)


__all__ = ["export_vit_npz", "load_vit_npz", "vit_to_npz_dict", "vit_from_npz_dict", "config_from_npz",
           "resize_pos_embed"]
