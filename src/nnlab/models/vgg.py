"""VGG-A (Simonyan & Zisserman 2015, configuration "A", 11 weight layers) for 32x32 inputs,
with and without BatchNorm, as in the BatchNorm-landscape study of Santurkar et al. (2018),
"How Does Batch Normalization Help Optimization?".

Architecture (``M`` = 2x2 max-pool, stride 2)::

    conv 64 - M - 128 - M - 256 - 256 - M - 512 - 512 - M - 512 - 512 - M     (3x3, pad 1, ReLU)
    classifier  fc1 512 - fc2 512 - fc3 num_classes                             (ReLU between)

On 32x32x3 inputs with 10 classes the plain model has exactly 9,750,922 parameters.

* ``bn=True`` (registered as ``vgg-a-bn``) puts a BatchNorm after every conv (BatchNorm2d) and
  after fc1 and fc2 (BatchNorm1d), each before its ReLU. Conv and linear biases are kept in both
  variants, so the BN model differs from the plain one only by its BN layers.
* ``width`` (default 1.0) multiplies every conv width and the two hidden linear widths
  (``round(c * width)``, at least 1), for reduced CPU schedules of the landscape study.
* ``dropout`` (default 0.0, off) adds dropout after the ReLUs of fc1 and fc2.

Other input sizes: every max-pool uses ``ceil_mode=True`` and the last feature map is averaged
to 1x1 (``AdaptiveAvgPool2d``). For 32x32 inputs both are no-ops (all maps have even sizes and
the last one is already 1x1), so the 32x32 model is the standard one; a 28x28 MNIST digit goes
28-14-7-4-2-1 instead of collapsing to 0x0, and larger images are average-pooled after the
last block.

Init: Kaiming-normal convs (fan_out, ReLU) with zero biases, BN (1, 0), PyTorch's default for
the linear layers (:func:`~nnlab.models.layers.init_kaiming`).

Layers are named so studies can address them: ``features.conv3_1``, ``features.bn3_1``,
``classifier.fc1``, ``classifier.bn_fc1``, ... (see :meth:`VGG.conv_layers`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from nnlab.errors import ConfigError
from nnlab.models import MODELS
from nnlab.models.layers import (check_dropout, check_image_args, check_positive, conv3x3,
                                 init_kaiming, reject_unknown)

# (block name, conv widths) for configuration A; a max-pool follows every block.
VGG_A_BLOCKS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("1", (64,)), ("2", (128,)), ("3", (256, 256)), ("4", (512, 512)), ("5", (512, 512)),
)
VGG_A_HIDDEN = 512


@dataclass
class VGGConfig:
    num_classes: int = 10
    in_chans: int = 3
    bn: bool = False        # BatchNorm after every conv and after fc1, fc2
    width: float = 1.0      # multiplier of all conv widths and of the hidden linear width
    dropout: float = 0.0    # dropout after the ReLUs of fc1 and fc2 (0 = off)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG(nn.Module):
    """VGG-A: (B, in_chans, H, W) -> logits (B, num_classes). Any H, W >= 1; designed for 32x32."""

    def __init__(self, config: VGGConfig):
        super().__init__()
        self.config = config
        self.features = self._make_features(config)
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, C, h, w) -> (B, C, 1, 1); identity on 32x32 inputs
        self.classifier = self._make_classifier(config)
        init_kaiming(self)

    @staticmethod
    def _make_features(cfg: VGGConfig) -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        chans = cfg.in_chans
        for block, widths in VGG_A_BLOCKS:
            for i, width in enumerate(widths, start=1):
                name = block if len(widths) == 1 else f"{block}_{i}"
                out = _scaled(width, cfg.width)
                layers[f"conv{name}"] = conv3x3(chans, out, bias=True)
                if cfg.bn:
                    layers[f"bn{name}"] = nn.BatchNorm2d(out)
                layers[f"relu{name}"] = nn.ReLU()
                chans = out
            layers[f"pool{block}"] = nn.MaxPool2d(2, 2, ceil_mode=True)  # (H, W) -> ceil(H/2), ceil(W/2)
        return nn.Sequential(layers)

    @staticmethod
    def _make_classifier(cfg: VGGConfig) -> nn.Sequential:
        feat = _scaled(VGG_A_BLOCKS[-1][1][-1], cfg.width)
        hidden = _scaled(VGG_A_HIDDEN, cfg.width)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (n_in, n_out) in enumerate(((feat, hidden), (hidden, hidden)), start=1):
            layers[f"fc{i}"] = nn.Linear(n_in, n_out)
            if cfg.bn:
                layers[f"bn_fc{i}"] = nn.BatchNorm1d(n_out)
            layers[f"relu_fc{i}"] = nn.ReLU()
            if cfg.dropout > 0:
                layers[f"drop_fc{i}"] = nn.Dropout(cfg.dropout)
        layers["fc3"] = nn.Linear(hidden, cfg.num_classes)
        return nn.Sequential(layers)

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """The 8 convolutions by name (``conv1`` ... ``conv5_2``), in forward order."""
        return {name: m for name, m in self.features.named_children() if isinstance(m, nn.Conv2d)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> logits (B, num_classes)."""
        x = self.features(x)            # (B, 512w, 1, 1) for 32x32 inputs
        x = self.pool(x).flatten(1)     # (B, 512w)
        return self.classifier(x)       # (B, num_classes)


def _build(name: str, bn: bool, num_classes: int, in_chans: int, image_size: int,
           options: dict) -> VGG:
    check_image_args(name, num_classes, in_chans, image_size)
    width = options.pop("width", 1.0)
    dropout = options.pop("dropout", 0.0)
    reject_unknown(name, options, ("width", "dropout") + (("bn",) if name == "vgg-a" else ()))
    check_positive(name, "width", width)
    check_dropout(name, dropout)
    return VGG(VGGConfig(num_classes, in_chans, bn=bn, width=float(width), dropout=float(dropout)))


@MODELS.register("vgg-a")
def vgg_a(*, num_classes: int = 10, in_chans: int = 3, image_size: int = 32, **options) -> VGG:
    """Plain VGG-A. Options: ``width`` (float, default 1.0), ``dropout`` (float, default 0.0);
    ``bn=True`` gives the BatchNorm variant (same as ``vgg-a-bn``)."""
    bn = options.pop("bn", False)
    if not isinstance(bn, bool):
        raise ConfigError(f"model vgg-a: bn must be true or false, got {bn!r}")
    return _build("vgg-a", bn, num_classes, in_chans, image_size, options)


@MODELS.register("vgg-a-bn")
def vgg_a_bn(*, num_classes: int = 10, in_chans: int = 3, image_size: int = 32, **options) -> VGG:
    """VGG-A with BatchNorm after every conv and after fc1, fc2. Options: ``width``, ``dropout``."""
    return _build("vgg-a-bn", True, num_classes, in_chans, image_size, options)

