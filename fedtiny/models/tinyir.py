"""``tiny-ir``: a small MCU-class CNN of inverted-residual blocks (MobileNetV2 style).

Every layer has an int8-deployable shape: 3x3 convolutions (the blocks' depthwise
ones), 1x1 pointwise convolutions, BatchNorm after each convolution (folded away
for deployment), ReLU6 (folded into the int8 output clamp), residual adds, a global
average pool and a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtiny.errors import ScenarioError

__all__ = ["TinyIR", "InvertedResidual", "build_model", "MODELS"]


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1), with a residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class TinyIR(nn.Module):
    """Stem conv, inverted-residual blocks, global average pool, linear classifier.

    Parameters
    ----------
    in_channels, num_classes
        Input channels (1 for digits/MNIST, 3 for CIFAR) and classes.
    width
        Channels of the stem; the blocks use ``width``, ``width`` and ``2 * width``.
    image_size
        Input side length; inputs of 16 pixels or more get a stride-2 stem so that
        activation buffers stay MCU-sized.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 8) -> None:
        super().__init__()
        w = width
        # (cin, cout, stride, expand)
        cfg = [(w, w, 1, 1), (w, 2 * w, 2, 3), (2 * w, 2 * w, 1, 3)]
        if image_size >= 24:
            cfg.append((2 * w, 2 * w, 2, 3))
        self.stem = conv_bn(in_channels, w, 3, stride=2 if image_size >= 16 else 1)
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in cfg])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = ("tiny-ir",)


def build_model(
    name: str, in_channels: int, num_classes: int, *, width: int = 16, image_size: int = 8, seed: int = 0
) -> nn.Module:
    """Build a built-in model with seeded initial weights."""
    if name != "tiny-ir":
        raise ScenarioError(f"model.name: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyIR(in_channels, num_classes, width, image_size)
    finally:
        torch.random.set_rng_state(gen_state)
