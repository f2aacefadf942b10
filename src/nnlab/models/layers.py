"""Small pieces shared by the model families: argument checks, 3x3 convolutions, weight init.

The checks turn a bad factory argument (a negative size, an unknown option) into a
:class:`~nnlab.errors.ConfigError` that names the problem and the fix, instead of a PyTorch
traceback from deep inside a layer constructor.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from nnlab.errors import ConfigError


def check_image_args(model: str, num_classes: int, in_chans: int, image_size: int,
                     min_size: int = 1) -> None:
    """Raise ConfigError unless the three image arguments are positive integers (size >= min_size)."""
    for name, value, low in (("num_classes", num_classes, 1), ("in_chans", in_chans, 1),
                             ("image_size", image_size, min_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model {model}: {name} must be an integer >= {low}, got {value!r}")


def reject_unknown(model: str, options: dict[str, Any], valid: Iterable[str]) -> None:
    """Raise ConfigError if ``options`` (left-over factory keywords) is not empty."""
    if options:
        valid = sorted(valid)
        raise ConfigError(
            f"model {model} has no option(s) {', '.join(sorted(options))}; "
            f"valid options: {', '.join(valid) if valid else '(none)'}"
        )


def check_positive(model: str, name: str, value: Any, *, integer: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a positive number (an integer when ``integer``)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"model {model}: {name} must be {kind}, got {value!r}")


def check_dropout(model: str, dropout: Any) -> None:
    """Raise ConfigError unless 0 <= dropout < 1."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model {model}: dropout must be a probability in [0, 1), got {dropout!r}")


def conv3x3(in_chans: int, out_chans: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1: (B, in, H, W) -> (B, out, ceil(H/stride), ceil(W/stride))."""
    return nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=bias)


def init_kaiming(module: nn.Module) -> None:
    """He et al. (2015) init for ReLU nets: conv weights Kaiming-normal (fan_out), conv biases 0,
    BatchNorm weight 1 and bias 0. Linear layers keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
