"""Residual networks: ResNet-18 "CD-PreAct" and the CIFAR ResNet-56.

``resnet18-cdpreact`` -- the seed report's improved ResNet-18, combining:

* ResNet-C stem (He et al. 2019, "Bag of Tricks for Image Classification with CNNs", Sec. 4.1):
  the 7x7 conv is replaced by three 3x3 convs (widths 32, 32, 64), with the stride-2
  downsampling postponed to the *third* conv (the first two have stride 1), as specified here;
* ResNet-D shortcut (same paper): a downsampling shortcut is a 2x2 average pool (stride 2)
  followed by a 1x1 conv (stride 1), instead of a strided 1x1 conv that drops 3/4 of the input
  (pooling uses ``ceil_mode`` so odd sizes match the strided 3x3 branch: 7 -> 4). Unlike the
  post-activation ResNet-D there is no BN after the 1x1 conv: its input is already pre-activated
  and the sum is normalised by the next block's pre-activation;
* full pre-activation residual blocks (He et al. 2016, "Identity Mappings in Deep Residual
  Networks"): ``x + conv(relu(bn(conv(relu(bn(x))))))``. As in that paper, a projection
  shortcut takes the pre-activated input ``relu(bn1(x))``, and the network ends with BN-ReLU
  before global average pooling. The stem is conv-BN-ReLU-conv-BN-ReLU-conv: its last conv
  output is normalised by the first block's own pre-activation.

Stages have widths 64-128-256-512, 2 blocks each, strides 1-2-2-2 (ResNet-18, He et al. 2015).
Small inputs (``image_size <= 64``, e.g. 28x28 MNIST, 32x32 CIFAR) follow the CIFAR
convention: the stem keeps stride 1 throughout and has no max-pool, so a 32x32 image reaches
the stages at 32x32 and leaves them at 4x4 (28x28: 28-14-7-4). Larger inputs use the ImageNet
schedule: third stem conv stride 2, then a 3x3 max-pool with stride 2 (224x224: 56 -> 7).
For 3x32x32 inputs and 10 classes it has 11,199,082 parameters.

``resnet56`` -- the CIFAR ResNet of He et al. (2015, "Deep Residual Learning for Image
Recognition", Sec. 4.2): a 3x3 conv with 16 filters, then 3 stages of 9 post-activation basic
blocks (conv-BN-ReLU-conv-BN, add, ReLU) with 16-32-64 filters and strides 1-2-2, global
average pooling and a linear classifier. Option ``shortcut``: ``"A"`` (default, as in the
paper's CIFAR experiments) is a parameter-free identity that subsamples by 2 and zero-pads the
new channels, giving 853,018 parameters for 10 classes; ``"B"`` projects with a strided 1x1
conv + BN where the shape changes (855,770 parameters).

Both use He et al. (2015) init for convs (:func:`~nnlab.models.layers.init_kaiming`), BN (1, 0)
and PyTorch's default init for the final linear layer.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from nnlab.errors import ConfigError
from nnlab.models import MODELS
from nnlab.models.layers import check_image_args, conv3x3, init_kaiming, reject_unknown

# --------------------------------------------------------------------------------------------
# ResNet-18 CD-PreAct
# --------------------------------------------------------------------------------------------

SMALL_INPUT_MAX = 64  # image_size <= this: CIFAR-style stem (no downsampling, no max-pool)


@dataclass
class PreActResNetConfig:
    num_classes: int = 10
    in_chans: int = 3
    small_input: bool = True                       # CIFAR-style stem (see module docstring)
    stem_widths: tuple[int, int, int] = (32, 32, 64)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)          # ResNet-18


class AvgPoolShortcut(nn.Module):
    """ResNet-D shortcut: (B, C_in, H, W) -> 2x2 avg-pool -> 1x1 conv -> (B, C_out, ceil(H/2), ceil(W/2)).

    With ``stride=1`` (only the channel count changes) the pool is skipped.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        # ceil_mode keeps odd sizes aligned with the strided 3x3 conv of the residual branch (7 -> 4)
        self.pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                     if stride > 1 else nn.Identity())
        self.conv = nn.Conv2d(in_chans, out_chans, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class PreActBlock(nn.Module):
    """Full pre-activation basic block: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv1 = conv3x3(in_chans, out_chans, stride)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.conv2 = conv3x3(out_chans, out_chans)
        needs_projection = stride != 1 or in_chans != out_chans
        self.shortcut = AvgPoolShortcut(in_chans, out_chans, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))                                   # pre-activation, (B, C_in, H, W)
        skip = self.shortcut(a) if self.shortcut is not None else x
        out = self.conv1(a)                                       # (B, C_out, H/s, W/s)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """ResNet-18 CD-PreAct: (B, in_chans, H, W) -> logits (B, num_classes)."""

    def __init__(self, config: PreActResNetConfig):
        super().__init__()
        self.config = config
        self.stem = self._make_stem(config)
        chans = config.stem_widths[-1]
        for i, (width, n_blocks) in enumerate(zip(config.widths, config.blocks), start=1):
            stride = 1 if i == 1 else 2
            blocks = [PreActBlock(chans if b == 0 else width, width, stride if b == 0 else 1)
                      for b in range(n_blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            chans = width
        self.bn_final = nn.BatchNorm2d(chans)   # the pre-activation of the (absent) next block
        self.fc = nn.Linear(chans, config.num_classes)
        init_kaiming(self)

    @staticmethod
    def _make_stem(cfg: PreActResNetConfig) -> nn.Sequential:
        w1, w2, w3 = cfg.stem_widths
        last_stride = 1 if cfg.small_input else 2   # downsampling postponed to the third conv
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=conv3x3(cfg.in_chans, w1), bn1=nn.BatchNorm2d(w1), relu1=nn.ReLU(),
            conv2=conv3x3(w1, w2), bn2=nn.BatchNorm2d(w2), relu2=nn.ReLU(),
            conv3=conv3x3(w2, w3, stride=last_stride),
        )
        if not cfg.small_input:
            layers["maxpool"] = nn.MaxPool2d(3, stride=2, padding=1)
        return nn.Sequential(layers)

    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1`` ... ``layer4`` in forward order."""
        return [getattr(self, f"layer{i}") for i in range(1, len(self.config.widths) + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> logits (B, num_classes)."""
        x = self.stem(x)                     # (B, 64, H, W) small inputs; (B, 64, H/4, W/4) otherwise
        for stage in self.stages():          # 32x32: 32 -> 16 -> 8 -> 4, widths 64 -> 512
            x = stage(x)
        x = F.relu(self.bn_final(x))
        x = x.mean(dim=(2, 3))               # global average pool, (B, 512)
        return self.fc(x)                    # (B, num_classes)


@MODELS.register("resnet18-cdpreact")
def resnet18_cdpreact(*, num_classes: int = 10, in_chans: int = 3, image_size: int = 32,
                      **options) -> PreActResNet:
    """ResNet-18 CD-PreAct; CIFAR-style stem when ``image_size <= 64``. No options."""
    check_image_args("resnet18-cdpreact", num_classes, in_chans, image_size)
    reject_unknown("resnet18-cdpreact", options, ())
    small = image_size <= SMALL_INPUT_MAX
    return PreActResNet(PreActResNetConfig(num_classes, in_chans, small_input=small))


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-56 (He et al. 2015)
# --------------------------------------------------------------------------------------------


def pad_shortcut(x: torch.Tensor, out_chans: int, stride: int) -> torch.Tensor:
    """Option-A shortcut: (B, C, H, W) -> (B, out_chans, ceil(H/s), ceil(W/s)).

    Subsamples every ``stride``-th pixel and zero-pads the extra channels equally on both sides
    (an odd surplus goes to the end). Parameter-free.
    """
    x = x[:, :, ::stride, ::stride]
    extra = out_chans - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class ShortcutA(nn.Module):
    """Module wrapper of :func:`pad_shortcut`."""

    def __init__(self, out_chans: int, stride: int):
        super().__init__()
        self.out_chans, self.stride = out_chans, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_shortcut(x, self.out_chans, self.stride)


class BasicBlock(nn.Module):
    """Post-activation basic block: (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = conv3x3(in_chans, out_chans, stride)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = conv3x3(out_chans, out_chans)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = ShortcutA(out_chans, stride) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@dataclass
class CifarResNetConfig:
    num_classes: int = 10
    in_chans: int = 3
    depth: int = 56                   # 6n + 2: n blocks per stage
    widths: tuple[int, int, int] = (16, 32, 64)
    shortcut: str = "A"               # "A": zero-pad identity; "B": 1x1 conv + BN projection


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): (B, in_chans, H, W) -> logits (B, num_classes)."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__()
        self.config = config
        if config.depth < 8 or (config.depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), "
                              f"got {config.depth}")
        n = (config.depth - 2) // 6
        w1, w2, w3 = config.widths
        self.conv1 = conv3x3(config.in_chans, w1)
        self.bn1 = nn.BatchNorm2d(w1)
        chans = w1
        for i, (width, stride) in enumerate(((w1, 1), (w2, 2), (w3, 2)), start=1):
            blocks = [BasicBlock(chans if b == 0 else width, width, stride if b == 0 else 1,
                                 config.shortcut) for b in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            chans = width
        self.fc = nn.Linear(chans, config.num_classes)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> logits (B, num_classes)."""
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        x = self.layer1(x)                   # (B, 16, H, W)
        x = self.layer2(x)                   # (B, 32, H/2, W/2)
        x = self.layer3(x)                   # (B, 64, H/4, W/4)
        return self.fc(x.mean(dim=(2, 3)))   # global average pool, then (B, num_classes)


@MODELS.register("resnet56")
def resnet56(*, num_classes: int = 10, in_chans: int = 3, image_size: int = 32,
             **options) -> CifarResNet:
    """CIFAR ResNet-56. Option: ``shortcut`` = ``"A"`` (default, zero-pad identity) or ``"B"``."""
    check_image_args("resnet56", num_classes, in_chans, image_size)
    shortcut = options.pop("shortcut", "A")
    reject_unknown("resnet56", options, ("shortcut",))
    if shortcut not in ("A", "B"):
        raise ConfigError(f"model resnet56: shortcut must be 'A' or 'B', got {shortcut!r}")
    return CifarResNet(CifarResNetConfig(num_classes, in_chans, depth=56, shortcut=shortcut))
