"""Mixup and CutMix (nnlab.data.mix): the fast batch functions against a per-pixel loop of the papers'
equations, the CutMix weight against the pixels each image really gives, and the draws' distribution."""
from __future__ import annotations

import pytest
import torch

from nnlab.data.mix import MixDraw, apply_mix, draw_mix, mix_batch, mix_batch_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_matches_the_per_pixel_reference(mixup, cutmix):
    g = torch.Generator().manual_seed(0)
    methods = set()
    for trial in range(12):
        x, y = torch.randn(6, 3, 9, 7, generator=g), torch.randint(0, 5, (6,), generator=g)
        fast = mix_batch(x, y, 5, mixup, cutmix, torch.Generator().manual_seed(trial))
        ref = mix_batch_reference(x, y, 5, fast.draw)
        torch.testing.assert_close(fast.x, ref.x, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.target, ref.target, rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.target.sum(1), torch.ones(6))
        methods.add(fast.draw.method)
    assert methods == ({"mixup"} if not cutmix else {"cutmix"} if not mixup else {"mixup", "cutmix"})


def test_cutmix_weight_is_the_share_of_pixels_each_image_keeps():
    """Images of distinct constant values and distinct labels: target[i, y_i] must equal the share of
    image i's own pixels left in its mixed image (the box clipped at the border, as timm corrects lam),
    and target[i, y_perm[i]] the share pasted from its partner."""
    b, h, w = 8, 10, 12
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).contiguous()
    y = torch.arange(b)
    clipped = 0
    for trial in range(40):
        out = mix_batch(x, y, b, 0.0, 1.0, torch.Generator().manual_seed(trial))
        perm, top, left, bh, bw = out.draw.perm, *out.draw.box
        for i in range(b):
            own = (out.x[i, 0] == i + 1).float().mean().item()
            if perm[i] == i:
                continue
            assert out.target[i, i].item() == pytest.approx(own, abs=1e-6)
            assert out.target[i, perm[i]].item() == pytest.approx(1 - own, abs=1e-6)
        clipped += top == 0 or left == 0 or top + bh == h or left + bw == w
    assert clipped > 0  # the border case was exercised


def test_mixup_blends_images_and_labels_with_the_same_weight():
    x = torch.tensor([1.0, 3.0, 7.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    draw = MixDraw("mixup", 0.7, torch.tensor([2, 0, 1]))
    out = apply_mix(x, torch.tensor([0, 1, 2]), 3, draw)
    assert out.x[0, 0, 0, 0].item() == pytest.approx(0.7 * 1 + 0.3 * 7)
    assert out.target[0].tolist() == pytest.approx([0.7, 0.0, 0.3])


def test_draws_follow_beta_and_switch_evenly():
    alpha = 0.8
    lams, cut = [], 0
    for seed in range(3000):
        d = draw_mix(4, 32, 32, alpha, 1.0, torch.Generator().manual_seed(seed))
        if d.method == "mixup":
            lams.append(d.lam)
        cut += d.method == "cutmix"
    lam = torch.tensor(lams)
    assert 0.45 < cut / 3000 < 0.55
    var = 1 / (4 * (2 * alpha + 1))  # variance of Beta(a, a)
    assert abs(lam.mean().item() - 0.5) < 0.03 and abs(lam.var().item() - var) < 0.015
    with pytest.raises(ValueError, match="alpha"):
        draw_mix(4, 8, 8, 0.0, 0.0, torch.Generator())
