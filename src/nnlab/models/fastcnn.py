"""A small, fast-training CIFAR CNN (``cnn-fast-cifar``): the teacher for distilling the CPU ViT
(issue 13: "DeiT-style distillation from a CNN teacher, the teacher's training counts in the 3
hours").

The shape follows Keller Jordan's airbench (2024, the "94% on CIFAR-10 in 3.29 seconds" network),
learnt from its paper and repository, written here from scratch::

    stem   2x2 conv, no padding, -> 24 channels, GELU                     32 -> 31 px
    group  3x3 conv -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU, widths 64, 256, 256
                                                                          31 -> 15 -> 7 -> 3 px
    head   global max-pool -> linear (no bias) -> x logit_scale

About 118 M multiply-accumulates per 32x32 image and 1.97 M parameters. What nnlab leaves out
of airbench, on purpose: the stem's frozen patch-whitening initialisation, BatchNorm with frozen
weights, the Lookahead optimiser and test-time augmentation; the model trains with nnlab's
plain SGD recipe (``configs/cnn-fast-cifar.yaml``) and is scored without test-time augmentation
(the distillation targets average the image and its mirror image, see
:func:`nnlab.engine.distill.teacher_logits`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nnlab.models import MODELS
from nnlab.models.layers import check_image_args, check_positive, reject_unknown


@dataclass
class FastCNNConfig:
    num_classes: int = 10
    in_chans: int = 3
    stem: int = 24                                               # channels of the 2x2 stem conv
    widths: list[int] = field(default_factory=lambda: [64, 256, 256])   # one conv group each
    logit_scale: float = 1 / 9                                   # airbench's scaling of the logits


def _group(cin: int, cout: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, cout, H // 2, W // 2)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class FastCNN(nn.Module):
    def __init__(self, config: FastCNNConfig):
        super().__init__()
        c = self.config = config
        self.stem = nn.Sequential(nn.Conv2d(c.in_chans, c.stem, 2), nn.GELU())
        chans = [c.stem, *c.widths]
        self.groups = nn.Sequential(*[_group(a, b) for a, b in zip(chans, chans[1:])])
        self.head = nn.Linear(chans[-1], c.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, num_classes)."""
        h = self.groups(self.stem(x))                    # (B, widths[-1], h, w)
        return self.head(h.amax((2, 3))) * self.config.logit_scale


@MODELS.register("cnn-fast-cifar")
def cnn_fast_cifar(*, num_classes: int = 10, in_chans: int = 3, image_size: int = 32, **options) -> FastCNN:
    """The airbench-shaped CNN above; options: stem, widths, logit_scale."""
    name = "cnn-fast-cifar"
    check_image_args(name, num_classes, in_chans, image_size, min_size=2 ** (len(options.get("widths", [0] * 3)) + 1))
    c = FastCNNConfig(num_classes=num_classes, in_chans=in_chans)
    for key in ("stem", "widths", "logit_scale"):
        if key in options:
            setattr(c, key, options.pop(key))
    reject_unknown(name, options, ("stem", "widths", "logit_scale"))
    check_positive(name, "stem", c.stem, integer=True)
    check_positive(name, "logit_scale", c.logit_scale)
    for w in c.widths:
        check_positive(name, "widths entry", w, integer=True)
    return FastCNN(c)
