"""timm / DeiT / Hugging Face ViT state dicts into nnlab's ViT (issue 13): the logits must equal a
reference forward pass written straight from each layout (per-head loops, separate q/k/v)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nnlab.errors import ConfigError
from nnlab.models.vit_import import load_foreign_vit

D, HEADS, DEPTH, P, SIZE, MLP, CLASSES, CH = 24, 3, 2, 4, 12, 40, 5, 3


def _timm_state(seed: int = 0, ch: int = CH, size: int = SIZE, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    n = (size // P) ** 2
    sd = {"patch_embed.proj.weight": r(D, ch, P, P), "patch_embed.proj.bias": r(D), "cls_token": r(1, 1, D),
          "pos_embed": r(1, 1 + n, D), "norm.weight": 1 + r(D), "norm.bias": r(D),
          "head.weight": r(classes, D), "head.bias": r(classes)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(MLP, D),
                   b + "mlp.fc1.bias": r(MLP), b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)})
    return sd


def _to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Hugging Face ViTForImageClassification names (q, k, v separate)."""
    e = "vit.embeddings."
    out = {e + "cls_token": sd["cls_token"], e + "position_embeddings": sd["pos_embed"],
           e + "patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           e + "patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
           "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
    for i in range(DEPTH):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3, 0)
            out.update({h + f"attention.attention.query.{kind}": q, h + f"attention.attention.key.{kind}": k,
                        h + f"attention.attention.value.{kind}": v,
                        h + f"attention.output.dense.{kind}": sd[b + f"attn.proj.{kind}"],
                        h + f"layernorm_before.{kind}": sd[b + f"norm1.{kind}"],
                        h + f"layernorm_after.{kind}": sd[b + f"norm2.{kind}"],
                        h + f"intermediate.dense.{kind}": sd[b + f"mlp.fc1.{kind}"],
                        h + f"output.dense.{kind}": sd[b + f"mlp.fc2.{kind}"]})
    return out


def _attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    """Per-head loop: head h uses rows h*d:(h+1)*d of each projection."""
    d = wq.shape[0] // heads
    outs = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        q, k, v = x @ wq[s].T + bq[s], x @ wk[s].T + bk[s], x @ wv[s].T + bv[s]
        outs.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v)
    return torch.cat(outs, -1) @ wo.T + bo


def reference_timm(sd, x, heads, eps=1e-6):
    """timm's ViT forward, from the timm keys."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    for i in range(DEPTH):
        b = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), eps)
        wq, wk, wv = b("attn.qkv.weight").chunk(3, 0)
        bq, bk, bv = b("attn.qkv.bias").chunk(3, 0)
        t = t + _attention(h, wq, bq, wk, bk, wv, bv, b("attn.proj.weight"), b("attn.proj.bias"), heads)
        h = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), eps)
        t = t + F.linear(F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"),
                         b("mlp.fc2.bias"))
    return F.linear(F.layer_norm(t[:, 0], (D,), sd["norm.weight"], sd["norm.bias"], eps), sd["head.weight"],
                    sd["head.bias"])


def reference_hf(sd, x, heads, eps=1e-12):
    """Hugging Face's ViTForImageClassification forward, from the HF keys."""
    e = "vit.embeddings."
    t = F.conv2d(x, sd[e + "patch_embeddings.projection.weight"], sd[e + "patch_embeddings.projection.bias"],
                 stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([sd[e + "cls_token"].expand(len(x), -1, -1), t], 1) + sd[e + "position_embeddings"]
    for i in range(DEPTH):
        b = lambda n: sd[f"vit.encoder.layer.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(t, (D,), b("layernorm_before.weight"), b("layernorm_before.bias"), eps)
        a = "attention.attention."
        t = t + _attention(h, b(a + "query.weight"), b(a + "query.bias"), b(a + "key.weight"), b(a + "key.bias"),
                           b(a + "value.weight"), b(a + "value.bias"), b("attention.output.dense.weight"),
                           b("attention.output.dense.bias"), heads)
        h = F.layer_norm(t, (D,), b("layernorm_after.weight"), b("layernorm_after.bias"), eps)
        t = t + F.linear(F.gelu(F.linear(h, b("intermediate.dense.weight"), b("intermediate.dense.bias"))),
                         b("output.dense.weight"), b("output.dense.bias"))
    cls = F.layer_norm(t[:, 0], (D,), sd["vit.layernorm.weight"], sd["vit.layernorm.bias"], eps)
    return F.linear(cls, sd["classifier.weight"], sd["classifier.bias"])


@pytest.fixture
def images():
    return torch.randn(4, CH, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def test_timm_safetensors_and_deit_pth_give_the_reference_logits(tmp_path, images):
    sd = _timm_state()
    save_file(sd, tmp_path / "timm.safetensors")
    torch.save({"model": sd, "epoch": 300}, tmp_path / "deit.pth")  # DeiT's release wrapper
    expected = reference_timm(sd, images, HEADS)
    for name in ("timm.safetensors", "deit.pth"):
        model = load_foreign_vit(tmp_path / name, arch="deit-tiny")  # 3 heads
        assert model.config.depth == DEPTH and model.config.image_size == SIZE and model.config.num_classes == CLASSES
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    wrong_heads = load_foreign_vit(tmp_path / "timm.safetensors", heads=1)  # the head count matters
    with torch.no_grad():
        assert not torch.allclose(wrong_heads(images), expected, atol=1e-3)


def test_hugging_face_layout_gives_the_reference_logits(tmp_path, images):
    hf = _to_hf(_timm_state(seed=1))
    save_file(hf, tmp_path / "model.safetensors")
    model = load_foreign_vit(tmp_path / "model.safetensors", heads=HEADS)
    assert model.config.ln_eps == 1e-12
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_hf(hf, images, HEADS), rtol=1e-5, atol=1e-5)


def test_unsupported_files_are_clear_errors(tmp_path):
    sd = _timm_state()
    save_file({**sd, "dist_token": torch.zeros(1, 1, D)}, tmp_path / "distilled.safetensors")
    with pytest.raises(ConfigError, match="distilled DeiT"):
        load_foreign_vit(tmp_path / "distilled.safetensors", arch="deit-tiny")
    save_file({**sd, "fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D)}, tmp_path / "gap.safetensors")
    with pytest.raises(Exception, match="does not fit a ViT"):  # a global-pool model: fc_norm is not ignored
        load_foreign_vit(tmp_path / "gap.safetensors", arch="deit-tiny")
    save_file(sd, tmp_path / "ok.safetensors")
    with pytest.raises(ConfigError, match="pass --arch"):
        load_foreign_vit(tmp_path / "ok.safetensors")


def test_prune_sweep_runs_on_a_timm_file_from_the_command_line(tmp_path):
    from nnlab.cli import main

    sd = _timm_state(ch=1, size=28, classes=10)  # fits mnist-5k: 1 channel, 28 px, 10 classes
    save_file(sd, tmp_path / "vit.safetensors")
    out = tmp_path / "sweep"
    assert main(["prune", "sweep", "--checkpoint", str(tmp_path / "vit.safetensors"), "--arch", "deit-tiny",
                 "--data", "mnist-5k", "--methods", "cp-vit,tome", "--ratios", "0.3", "--test-limit", "32",
                 "--calib-size", "8", "--timing-repeats", "1", "--batch-size", "4", "--no-save-models",
                 "--out", str(out)]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,ratio") and len(rows) == 1 + 3  # base, cp-vit, tome
