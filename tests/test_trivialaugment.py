"""TrivialAugment: the batched transform against its per-image reference, and each operation
against a closed form (a wrong sign, axis or normalisation fails one of these)."""
import pytest
import torch

from nnlab.data import trivialaugment as ta
from nnlab.data.transforms import train_transform
from nnlab.engine.train import TrainConfig
from nnlab.errors import ConfigError


def _m(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_batched_matches_reference_loop():
    x = torch.rand(64, 3, 32, 32)
    fast = ta.TrivialAugment()(x, torch.Generator().manual_seed(3))
    ref = ta.trivial_augment_reference(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    assert not torch.equal(fast, x) and fast.shape == x.shape
    assert 0 <= fast.min() and fast.max() <= 1


def test_each_image_gets_one_op_and_all_ops_occur():
    x = torch.rand(700, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    op = torch.randint(0, len(ta.OPS), (700,), generator=torch.Generator().manual_seed(0))
    y = ta.TrivialAugment()(x, g)
    ident = list(ta.OPS).index("identity")
    assert torch.equal(y[op == ident], x[op == ident])                 # identity draws are untouched
    assert set(op.tolist()) == set(range(len(ta.OPS)))


def test_rotate_90_is_rot90_and_0_is_identity():
    x = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(ta.rotate(x, _m(90, 90)), torch.rot90(x, 1, (2, 3)))
    torch.testing.assert_close(ta.rotate(x, _m(0, 0)), x)


def test_shear_x_on_a_non_square_image_follows_the_pixel_formula():
    # output (u, v) reads input (u + m v) about the centre; with m = 1 on 5 x 7 pixels (centres at
    # integers) that is column u + (v - 2) of row v, black when it falls outside
    h, w = 5, 7
    x = torch.rand(1, 1, h, w) + 0.1
    y = ta.shear_x(x, _m(1.0))
    want = torch.zeros_like(x)
    for v in range(h):
        for u in range(w):
            src = u + (v - 2)
            if 0 <= src < w:
                want[0, 0, v, u] = x[0, 0, v, src]
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(ta.shear_y(x.transpose(2, 3), _m(1.0)), want.transpose(2, 3))


def test_translate_shifts_by_whole_pixels_with_black_fill():
    x = torch.rand(1, 3, 6, 8) + 0.1
    y = ta.translate_x(x, _m(3.0))
    assert torch.equal(y[..., 3:], x[..., :-3]) and y[..., :3].abs().max() == 0
    y = ta.translate_y(x, _m(-2.0))
    assert torch.equal(y[..., :-2, :], x[..., 2:, :]) and y[..., -2:, :].abs().max() == 0


def test_colour_ops_at_factor_zero_give_their_blend_target():
    x = torch.rand(2, 3, 4, 4)
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]                      # (2, 4, 4)
    assert ta.brightness(x, _m(-1, -1)).abs().max() == 0
    torch.testing.assert_close(ta.color(x, _m(-1, -1)), gray[:, None].expand_as(x))
    torch.testing.assert_close(ta.contrast(x, _m(-1, -1)),
                               gray.mean((1, 2)).view(2, 1, 1, 1).expand_as(x))
    for op in (ta.brightness, ta.color, ta.contrast, ta.sharpness):
        torch.testing.assert_close(op(x, _m(0, 0)), x)                                   # factor 1


def test_sharpness_factor_zero_is_pil_smooth_on_the_interior():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    y = ta.sharpness(x, _m(-1.0))
    assert y[0, 0, 2, 2] == pytest.approx(5 / 13) and y[0, 0, 1, 1] == pytest.approx(1 / 13)
    assert y[0, 0, 0].abs().max() == 0                                                  # border kept


def test_posterize_solarize_autocontrast():
    x = torch.tensor([255.0, 100.0, 63.0, 64.0]).view(1, 1, 2, 2) / 255
    got = ta.posterize(x, _m(2.0)) * 255
    torch.testing.assert_close(got.flatten(), torch.tensor([192.0, 64.0, 0.0, 64.0]))
    torch.testing.assert_close(ta.posterize(x, _m(8.0)), x)
    s = ta.solarize(torch.tensor([0.7, 0.2, 0.5, 0.49]).view(1, 1, 2, 2), _m(0.5))
    torch.testing.assert_close(s.flatten(), torch.tensor([0.3, 0.2, 0.5, 0.49]))
    a = ta.autocontrast(torch.tensor([0.2, 0.6, 0.4, 0.3]).view(1, 1, 2, 2), _m(0.0))
    torch.testing.assert_close(a.flatten(), torch.tensor([0.0, 1.0, 0.5, 0.25]))


def test_equalize_flattens_the_histogram():
    ramp = torch.arange(256.0).view(1, 1, 16, 16) / 255            # every value once: already equal
    torch.testing.assert_close(ta.equalize(ramp, _m(0.0)), ramp)
    two = torch.full((1, 1, 4, 4), 100 / 255)
    two[..., :2, :] = 30 / 255                                     # two values, half each
    assert set((ta.equalize(two, _m(0.0)) * 255).round().flatten().tolist()) == {0.0, 255.0}
    flat = torch.full((1, 1, 4, 4), 0.4)
    torch.testing.assert_close(ta.equalize(flat, _m(0.0)), (flat * 255).round() / 255)


def test_magnitude_bins_span_the_wide_ranges_with_signs():
    lv = torch.tensor([0, 30])
    torch.testing.assert_close(ta.magnitudes("rotate", lv, 31, torch.tensor([False, True])), _m(0, -135))
    torch.testing.assert_close(ta.magnitudes("posterize", lv, 31, torch.tensor([True, True])), _m(8, 2))
    torch.testing.assert_close(ta.magnitudes("solarize", lv, 31, torch.tensor([True, True])), _m(1, 0))


def test_train_transform_and_config_wiring():
    tf = train_transform((0.5,) * 3, (0.5,) * 3, image_size=32, augment=True, flip=True, trivial=True)
    assert any(isinstance(t, ta.TrivialAugment) for t in tf.transforms)
    with pytest.raises(ConfigError, match="add --augment"):
        TrainConfig(trivial_augment=True, augment=False).validate()
