"""A multi-layer perceptron: flatten, then Linear-ReLU(-Dropout) per hidden layer, then Linear.

Use :class:`MLP` directly on feature vectors (e.g. the functa classifier on modulation vectors)::

    MLP(in_features=512, hidden=(1024, 1024), num_classes=10, dropout=0.2)

or through the registry (``mlp``), which computes ``in_features = in_chans * image_size**2``.
Layers are named ``fc1``, ``fc2``, ..., the last one being the classifier.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from nnlab.errors import ConfigError
from nnlab.models import MODELS
from nnlab.models.layers import check_dropout, check_image_args, check_positive, reject_unknown

DEFAULT_HIDDEN = (512, 256)


def _parse_hidden(hidden: Sequence[int] | str) -> tuple[int, ...]:
    """``(512, 256)``, ``[512, 256]`` or ``"512,256"`` -> ``(512, 256)``; ``()`` or ``""`` = no hidden layer."""
    if isinstance(hidden, str):
        try:
            return tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            raise ConfigError(f"model mlp: hidden must be comma-separated integers, got {hidden!r}") from None
    if isinstance(hidden, int):
        return (hidden,)
    try:
        return tuple(hidden)
    except TypeError:
        raise ConfigError(f"model mlp: hidden must be a list of integers, got {hidden!r}") from None


class MLP(nn.Module):
    """(B, *) -> flatten -> (B, in_features) -> logits (B, num_classes).

    Args:
        in_features: size of the flattened input.
        hidden: widths of the hidden layers (may be empty: a linear classifier).
        num_classes: number of outputs.
        dropout: dropout probability after each hidden ReLU (0 = off).
    """

    def __init__(self, in_features: int, hidden: Sequence[int] | str = DEFAULT_HIDDEN,
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        hidden = _parse_hidden(hidden)
        check_positive("mlp", "in_features", in_features, integer=True)
        check_positive("mlp", "num_classes", num_classes, integer=True)
        for h in hidden:
            check_positive("mlp", "every hidden width", h, integer=True)
        check_dropout("mlp", dropout)
        self.in_features, self.hidden, self.num_classes = in_features, hidden, num_classes
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = h
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, num_classes)
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) or (B, C, H, W) with C*H*W == in_features -> logits (B, num_classes)."""
        features = x.shape[1:].numel()
        if features != self.in_features:
            raise ConfigError(f"MLP expects inputs of {self.in_features} features per example, got "
                              f"shape {tuple(x.shape)}; build it with in_features={features}")
        return self.net(x)


@MODELS.register("mlp")
def mlp(*, num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **options) -> MLP:
    """MLP on flattened images. Options: ``hidden`` (ints or ``"512,256"``, default (512, 256)),
    ``dropout`` (float, default 0.0)."""
    check_image_args("mlp", num_classes, in_chans, image_size)
    hidden = options.pop("hidden", DEFAULT_HIDDEN)
    dropout = options.pop("dropout", 0.0)
    reject_unknown("mlp", options, ("hidden", "dropout"))
    return MLP(in_chans * image_size * image_size, hidden, num_classes, dropout)
