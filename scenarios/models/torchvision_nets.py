"""Float PyTorch models for ``model.module`` (see scenarios/pytorch-model.toml).

fedtiny calls the function with the arguments it accepts among ``in_channels``, ``num_classes``
and ``image_size``; no weights are downloaded (the cloud pretrains on the public split).
"""

from torch import nn
from torchvision.models import mobilenet_v2


def mobilenet_v2_035(num_classes: int) -> nn.Module:
    """torchvision's MobileNetV2 at width 0.35 (the tiny-training paper's mbv2-w0.35 backbone)."""
    return mobilenet_v2(weights=None, width_mult=0.35, num_classes=num_classes)


def small_resnet(in_channels: int, num_classes: int) -> nn.Module:
    """A ResNet-8-like network with ReLU: three residual stages, global pool, linear head."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + self.skip(x))

    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def se_net(in_channels: int, num_classes: int) -> nn.Module:
    """A small MCU network with the operators converters emit beyond convolutions: max pooling, a two-branch
    block joined by ``torch.cat``, a squeeze-and-excitation gate (mean, 1x1 convolutions, sigmoid, ``*``) and
    hardswish."""
    import torch
    import torch.nn.functional as F

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int, reduced: int) -> None:
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.wide = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.narrow = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.se = SqueezeExcite(32, 8)
            self.mix = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32))
            self.head = nn.Linear(32, num_classes)

        def forward(self, x):
            x = self.pool(self.stem(x))
            x = self.se(torch.cat([self.wide(x), self.narrow(x)], 1))
            x = F.hardswish(self.mix(x))
            return self.head(x.mean((2, 3)))

    return Net()
