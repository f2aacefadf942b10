"""LeNet-5 as used in the DessiLBI paper: conv 6-16-120, fc 84-10, ReLU and max pooling.

Layers are named (``conv1``, ``conv2``, ``conv3``, ``fc1``, ``fc2``) so that a study can address
one of them, e.g. DessiLBI's pruning of ``conv3`` by its Gamma support.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from nnlab.errors import ConfigError
from nnlab.models import MODELS
from nnlab.models.layers import check_image_args, reject_unknown


class LeNet5(nn.Module):
    """LeNet-5 for (B, in_chans, image_size, image_size) inputs; image_size 28 or 32.

    28x28 inputs get padding 2 on conv1, so both sizes reach conv3 as (B, 16, 5, 5) and
    conv3 (5x5, 120 filters) produces (B, 120, 1, 1).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 28):
        super().__init__()
        pad = (32 - image_size) // 2
        if pad < 0 or image_size + 2 * pad != 32:
            raise ConfigError(f"LeNet5 takes 28x28 or 32x32 inputs, got image_size={image_size}; "
                              "resize the images or pick a size-agnostic model (e.g. resnet56)")
        self.conv1 = nn.Conv2d(in_chans, 6, 5, padding=pad)  # (B, 6, 28, 28) -> pool (B, 6, 14, 14)
        self.conv2 = nn.Conv2d(6, 16, 5)                       # (B, 16, 10, 10) -> pool (B, 16, 5, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)                     # (B, 120, 1, 1)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


@MODELS.register("lenet5")
def lenet5(*, num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **options) -> LeNet5:
    """LeNet-5 for 28x28 or 32x32 images. No options."""
    check_image_args("lenet5", num_classes, in_chans, image_size)
    reject_unknown("lenet5", options, ())
    return LeNet5(num_classes, in_chans, image_size)
