"""ViT model family and the Google .npz loader/exporter."""
import numpy as np
import pytest
import torch

from nnlab.errors import CheckpointError, ConfigError
from nnlab.models import MODELS, create_model
from nnlab.models.vit import (ViT, ViTConfig, attention_fast, attention_reference, keep_random_patches,
                              patch_dropout_reference, resize_pos_embed)
from nnlab.models.vit_npz import (config_from_npz, export_vit_npz, load_vit_npz, vit_from_npz_dict,
                                  vit_to_npz_dict)


def tiny(**kw) -> ViT:
    return create_model("vit-test", num_classes=5, in_chans=3, image_size=16, **kw).eval()


def test_presets_registered_and_shapes():
    for name in ("vit-b16", "vit-tiny-cifar", "vit-small-cifar", "vit-mnist", "vit-test"):
        assert name in MODELS
    m = create_model("vit-mnist", num_classes=10, in_chans=1, image_size=28)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert m.config.num_patches == 49


def test_vit_b16_size():
    with torch.device("meta"):
        m = create_model("vit-b16", num_classes=1000, in_chans=3, image_size=224)
    assert sum(p.numel() for p in m.parameters()) == 86_567_656  # the published ViT-B/16 count


def test_fast_attention_matches_reference():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    bias = torch.randn(2, 1, 1, 7)
    out_ref, probs = attention_reference(q, k, v, 0.3, bias)
    torch.testing.assert_close(attention_fast(q, k, v, 0.3, bias), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
    m = tiny()
    x = torch.randn(2, 9, 16)
    out_probs, p = m.blocks[0].attn.forward_with_probs(x)
    torch.testing.assert_close(m.blocks[0].attn(x), out_probs, atol=1e-5, rtol=1e-5)
    assert p.shape == (2, 2, 9, 9)


def test_bf16_attention_on_cpu_runs_in_float32_under_autocast():
    """bf16 q, k, v on a CPU (as a bf16-autocast qkv projection gives them) are attended in float32,
    the output cast back: exactly float32 attention of the upcast inputs, not the bf16 kernel, whose
    backward was 7x slower. Gradients reach the bf16 inputs."""
    q, k, v = (t.bfloat16().requires_grad_() for t in torch.randn(3, 2, 4, 33, 8).unbind(0))
    bias = torch.randn(2, 1, 1, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_fast(q, k, v, 0.3, bias)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias,
                                                                scale=0.3).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_blocks_run_on_fewer_tokens():
    m = tiny()
    x = m.embed(torch.randn(2, 3, 16, 16))
    assert x.shape == (2, 17, 16)
    assert m.blocks[0](x[:, :5]).shape == (2, 5, 16)
    # Without other tokens, a CLS-only forward equals the full model run on CLS alone
    assert m.classify(m.blocks[1](x[:, :1])).shape == (2, 5)


def test_patch_dropout_matches_the_per_image_loop():
    tokens = torch.randn(5, 1 + 16, 4)
    state = torch.get_rng_state()
    fast = keep_random_patches(tokens, 0.25)
    torch.testing.assert_close(fast, patch_dropout_reference(tokens, 0.25, state), rtol=0, atol=0)
    assert fast.shape == (5, 1 + 12, 4)
    torch.testing.assert_close(fast[:, 0], tokens[:, 0], rtol=0, atol=0)           # CLS kept, first
    kept = [{int(j) for j in (tokens[i, 1:, 0][:, None] == fast[i, 1:, 0]).nonzero()[:, 0]} for i in range(5)]
    assert len({frozenset(k) for k in kept}) > 1                                    # a subset per image


def test_patch_dropout_forward_runs_the_blocks_on_the_kept_tokens_only():
    m = tiny(patch_dropout=0.5).train()
    x = torch.randn(3, 3, 16, 16)
    torch.manual_seed(7)
    logits = m(x)
    torch.manual_seed(7)
    m.config.patch_dropout = 0.0
    full = m.embed(x)                                                               # (3, 17, 16), no drop
    kept = keep_random_patches(full, 0.5)                                           # the same draws
    assert kept.shape == (3, 1 + 8, 16)
    for block in m.blocks:
        kept = block(kept)
    torch.testing.assert_close(logits, m.classify(kept))
    m.config.patch_dropout = 0.5
    m.eval()                                                                        # evaluation keeps all
    plain = tiny()
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x), rtol=0, atol=0)
    assert m.embed(x).shape == (3, 17, 16)
    with pytest.raises(ConfigError, match="patch_dropout"):
        tiny(patch_dropout=1.0)


def test_per_block_widths():
    cfg = ViTConfig(image_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=2, heads=2,
                    head_dims=[1, 3], mlp_dims=[5, 2])
    m = ViT(cfg)
    assert m.blocks[0].attn.qkv.weight.shape == (6, 8) and m.blocks[1].mlp.fc1.weight.shape == (2, 8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert m.blocks[0].attn.scale == pytest.approx(4 ** -0.5)


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="patch_size"):
        ViTConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="unknown ViT option"):
        create_model("vit-test", num_classes=2, in_chans=1, image_size=16, bogus=1)
    with pytest.raises(ConfigError, match="takes"):
        tiny()(torch.randn(1, 3, 20, 20))


def test_resize_pos_embed_and_set_image_size():
    pos = torch.randn(1, 1 + 16, 4)
    out = resize_pos_embed(pos, 6)
    assert out.shape == (1, 37, 4)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    torch.testing.assert_close(resize_pos_embed(pos, 4), pos)
    # A constant grid stays constant under interpolation
    const = torch.ones(1, 17, 4)
    torch.testing.assert_close(resize_pos_embed(const, 8), torch.ones(1, 65, 4))
    m = tiny()
    m.set_image_size(32)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_npz_roundtrip_identical_logits(tmp_path):
    m = tiny()
    x = torch.randn(3, 3, 16, 16)
    path = export_vit_npz(m, tmp_path / "ViT-test.npz")
    back = load_vit_npz(path).eval()
    assert back.config == m.config
    torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)


def test_npz_roundtrip_slimmed_model():
    cfg = ViTConfig(image_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=2, heads=2,
                    head_dims=[1, 3], mlp_dims=[5, 2])
    m = ViT(cfg).eval()
    back = vit_from_npz_dict(vit_to_npz_dict(m)).eval()
    assert back.config.head_dims == [1, 3] and back.config.mlp_dims == [5, 2]
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)


def _google_style_npz(path, dim=8, heads=2, depth=2, mlp=12, patch=4, grid=2, classes=7):
    """A tiny file written directly in Google's layout (not by our exporter)."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    d = dim // heads
    a = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim), "cls": r(1, 1, dim),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, dim),
         "Transformer/encoder_norm/scale": r(dim), "Transformer/encoder_norm/bias": r(dim),
         "head/kernel": r(dim, classes), "head/bias": r(classes),
         "pre_logits/kernel": r(dim, dim), "pre_logits/bias": r(dim)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{b}/{ln}/scale"], a[f"{b}/{ln}/bias"] = r(dim), r(dim)
        for n in ("query", "key", "value"):
            a[f"{b}/MultiHeadDotProductAttention_1/{n}/kernel"] = r(dim, heads, d)
            a[f"{b}/MultiHeadDotProductAttention_1/{n}/bias"] = r(heads, d)
        a[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = r(heads, d, dim)
        a[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = r(dim)
        a[f"{b}/MlpBlock_3/Dense_0/kernel"], a[f"{b}/MlpBlock_3/Dense_0/bias"] = r(dim, mlp), r(mlp)
        a[f"{b}/MlpBlock_3/Dense_1/kernel"], a[f"{b}/MlpBlock_3/Dense_1/bias"] = r(mlp, dim), r(dim)
    np.savez(path, **a)
    return a


def _flax_reference_logits(a, x, heads=2, depth=2, patch=4):
    """Independent numpy forward of the Google layout (one image, NHWC), the way Flax computes it."""
    img = x[0].permute(1, 2, 0).numpy()
    g = img.shape[0] // patch
    pt = img.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)
    tok = pt @ a["embedding/kernel"].reshape(-1, a["embedding/kernel"].shape[-1]) + a["embedding/bias"]
    tok = np.concatenate([a["cls"][0], tok]) + a["Transformer/posembed_input/pos_embedding"][0]
    ln = lambda t, s, b: (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6) * s + b  # noqa
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}"
        h = ln(tok, a[f"{p}/LayerNorm_0/scale"], a[f"{p}/LayerNorm_0/bias"])
        q, k, v = (np.einsum("td,dhe->hte", h, a[f"{p}/MultiHeadDotProductAttention_1/{n}/kernel"])
                   + a[f"{p}/MultiHeadDotProductAttention_1/{n}/bias"][:, None] for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
        o = np.einsum("hte,hed->td", w @ v, a[f"{p}/MultiHeadDotProductAttention_1/out/kernel"])
        tok = tok + o + a[f"{p}/MultiHeadDotProductAttention_1/out/bias"]
        h = ln(tok, a[f"{p}/LayerNorm_2/scale"], a[f"{p}/LayerNorm_2/bias"])
        h = h @ a[f"{p}/MlpBlock_3/Dense_0/kernel"] + a[f"{p}/MlpBlock_3/Dense_0/bias"]
        h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
        tok = tok + h @ a[f"{p}/MlpBlock_3/Dense_1/kernel"] + a[f"{p}/MlpBlock_3/Dense_1/bias"]
    c = ln(tok[0], a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    return c @ a["head/kernel"] + a["head/bias"]


def test_tiny_google_npz_loads_and_matches_reference(tmp_path):
    a = _google_style_npz(tmp_path / "g.npz")
    m = load_vit_npz(tmp_path / "g.npz").eval()
    assert (m.config.dim, m.config.depth, m.config.heads, m.config.image_size) == (8, 2, 2, 8)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ours = m(x)[0].numpy()
    np.testing.assert_allclose(ours, _flax_reference_logits(a, x), rtol=1e-4, atol=1e-4)


def test_npz_interpolation_and_head_replacement(tmp_path):
    _google_style_npz(tmp_path / "g.npz")
    m = load_vit_npz(tmp_path / "g.npz", num_classes=3, image_size=16)
    assert m.pos_embed.shape == (1, 17, 8) and m.head.out_features == 3
    assert torch.count_nonzero(m.head.weight) == 0
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    via_factory = create_model("vit-b16", num_classes=3, in_chans=3, image_size=16, npz=tmp_path / "g.npz")
    assert via_factory.config.dim == 8


def test_resize_to_upsamples_small_inputs(tmp_path):
    m = create_model("vit-test", num_classes=5, in_chans=3, image_size=8, resize_to=16).eval()
    assert m.config.image_size == 16 and m.config.num_patches == 16
    x = torch.rand(2, 3, 8, 8)
    big = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m(x), m(big))
    _google_style_npz(tmp_path / "g.npz")
    f = create_model("vit-b16", num_classes=3, in_chans=3, image_size=8, npz=tmp_path / "g.npz", resize_to=16)
    assert f.pos_embed.shape == (1, 17, 8) and f(x).shape == (2, 3)


def test_npz_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vit_npz(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_vit_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match="lacks"):
        config_from_npz(dict(np.load(tmp_path / "other.npz")))


@pytest.mark.parametrize("name", ["vit-cifar", "vit-cifar-cpu", "vit-cifar-cpu-pd", "vit-cifar-cpu-kd", "vit-cifar-cpu-kd-tune", "vit-mnist", "vit-b16-finetune"])
def test_training_configs_are_valid(name, tmp_path):
    from pathlib import Path

    from nnlab.config import from_dict, load_yaml
    from nnlab.engine.train import TrainConfig
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = from_dict(TrainConfig, load_yaml(path)).validate()
    assert config.model.startswith("vit-") and config.optimizer in ("adamw", "sgd")
    options = dict(config.model_options)
    if "npz" in options:  # the real file is not here: a tiny one with the same layout
        _google_style_npz(tmp_path / "g.npz")
        options["npz"] = tmp_path / "g.npz"
    model = create_model(config.model, num_classes=10, in_chans=1 if "mnist" in name else 3,
                         image_size=28 if "mnist" in name else 32, **options)
    assert isinstance(model, ViT)
    size = 28 if "mnist" in name else 32
    assert model(torch.rand(1, model.config.in_chans, size, size)).shape == (1, 10)
