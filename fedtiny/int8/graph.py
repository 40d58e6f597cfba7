"""The int8 graph an MCU runs, emulated in PyTorch so that it can be trained.

Tensors hold integer values in float32 storage: weights are int8 (symmetric, one
scale per output channel), biases int32 (scale ``s_w * s_x``), activations int8
with a scale and a zero point. Each convolution does what the MCU does: subtract
the input zero point, accumulate in int32, add the bias, requantize with the
effective scale ``s_x * s_w / s_y``, add the output zero point, round, clamp
(a folded ReLU6 is the clamp). Rounding is straight-through for gradients, the
clamp passes gradient only inside its range, so backward is what on-device
training computes.

The classifier is a 1x1 convolution on the pooled features; in ``fp32`` precision
it is a float linear layer on the dequantized features instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["round_ste", "QConv", "QAdd", "QAvgPool", "QBlock", "FloatHead", "QModel", "INT8_MIN", "INT8_MAX"]

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as torch.round), identity gradient."""
    return x + (torch.round(x) - x).detach()


def _qparams(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> torch.Tensor:
    return torch.tensor([x_scale, x_zero, y_scale, y_zero], dtype=torch.float64)


class _QParamsMixin:
    """Quantization parameters as a float64 buffer ``[x_scale, x_zero, y_scale, y_zero]`` (saved in state)."""

    qparams: torch.Tensor

    @property
    def x_scale(self) -> float:
        return float(self.qparams[0])

    @property
    def x_zero(self) -> int:
        return int(self.qparams[1])

    @property
    def y_scale(self) -> float:
        return float(self.qparams[2])

    @property
    def y_zero(self) -> int:
        return int(self.qparams[3])


class QConv(_QParamsMixin, nn.Module):
    """An int8 convolution (regular, depthwise or pointwise) with int32 bias and per-channel weight scales.

    Parameters
    ----------
    weight
        int8 values, ``O x I/groups x k x k``.
    bias
        int32 values, ``O`` (scale ``w_scales * x_scale``).
    w_scales
        ``O`` float scales of the weight's output channels.
    x_scale, x_zero, y_scale, y_zero
        Input and output activation quantization.
    stride, groups
        As in ``nn.Conv2d``; padding is ``k // 2``.

    Notes
    -----
    A folded ReLU6 needs no clamp of its own: its output range [0, 6] is the
    int8 range (``y_zero = -128``), so clamping to int8 is the activation.
    """

    # On the device: int8 weights, int32 biases (fedtiny.models.state reads this).
    WIRE_DTYPES = {"weight": "int8", "bias": "int32"}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, w_scales: torch.Tensor, x_scale: float, x_zero: int,
                 y_scale: float, y_zero: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.register_buffer("w_scales", torch.as_tensor(w_scales, dtype=torch.float32).clone())
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.stride, self.groups = int(stride), int(groups)
        self.padding = self.weight.shape[-1] // 2

    @property
    def kernel_size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.out_channels

    def multiplier(self) -> torch.Tensor:
        """Per-channel effective scale ``s_x * s_w / s_y`` of the requantization."""
        return (self.x_scale * self.w_scales.double() / self.y_scale).float()

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """int32 accumulator: ``conv(x - x_zero, W) + b``."""
        return F.conv2d(x - self.x_zero, self.weight, self.bias, self.stride, self.padding, 1, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.accumulate(x) * self.multiplier().view(1, -1, 1, 1) + self.y_zero
        return torch.clamp(round_ste(y), INT8_MIN, INT8_MAX)


class QAdd(_QParamsMixin, nn.Module):
    """Residual add: requantize both int8 inputs to the output scale, add, round, clamp.

    ``x`` is the block input (``x_scale``, ``x_zero``); the other input carries
    its own ``b_scale``, ``b_zero`` (the block's last convolution output).
    """

    def __init__(self, x_scale: float, x_zero: int, b_scale: float, b_zero: int, y_scale: float, y_zero: int) -> None:
        super().__init__()
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.register_buffer("bparams", torch.tensor([b_scale, b_zero], dtype=torch.float64))

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ra, rb = self.x_scale / self.y_scale, float(self.bparams[0]) / self.y_scale
        y = (x - self.x_zero) * ra + (b - float(self.bparams[1])) * rb + self.y_zero
        return torch.clamp(round_ste(y), INT8_MIN, INT8_MAX)


class QAvgPool(nn.Module):
    """Global average pool in the int8 domain: scale and zero point are unchanged, so
    ``mean(x - z) + z = mean(x)``; the MCU sums in int32 and divides with rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(round_ste(x.mean(dim=(2, 3), keepdim=True)), INT8_MIN, INT8_MAX)


class QBlock(nn.Module):
    """Inverted-residual block: optional pointwise expand, depthwise, pointwise project, optional add."""

    def __init__(self, pointwise1: QConv | None, depthwise: QConv, pointwise2: QConv, residual: QAdd | None) -> None:
        super().__init__()
        self.pointwise1, self.depthwise, self.pointwise2, self.residual = pointwise1, depthwise, pointwise2, residual

    def convs(self) -> list[QConv]:
        return [c for c in (self.pointwise1, self.depthwise, self.pointwise2) if c is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in self.convs():
            y = conv(y)
        return self.residual(x, y) if self.residual is not None else y


class FloatHead(nn.Module):
    """A float classifier on dequantized int8 features (``model.classifier_precision = fp32``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, x_scale: float, x_zero: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.register_buffer("xparams", torch.tensor([x_scale, x_zero], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = (x.flatten(1) - float(self.xparams[1])) * float(self.xparams[0])
        return F.linear(feats, self.weight, self.bias)


class QModel(nn.Module):
    """An int8 MCU network: input quantization, first conv, blocks, optional feature mix, pool, classifier.

    Parameters
    ----------
    input_scale, input_zero
        Quantization of the (normalized) input image.
    input_mean, input_std
        Normalization applied to images in ``[0, 1]`` before quantization.
    """

    def __init__(self, first_conv: QConv, blocks: list[QBlock], feature_mix: QConv | None, classifier: QConv | FloatHead,
                 input_scale: float, input_zero: int, input_mean: float = 0.0, input_std: float = 1.0) -> None:
        super().__init__()
        self.first_conv = first_conv
        self.blocks = nn.ModuleList(blocks)
        self.feature_mix = feature_mix
        self.pool = QAvgPool()
        self.classifier = classifier
        self.register_buffer("input_params", torch.tensor([input_scale, input_zero, input_mean, input_std],
                                                          dtype=torch.float64))

    def convs(self) -> list[QConv]:
        """Every int8 convolution in forward order (the classifier excluded): the paper's layer indices."""
        out = [self.first_conv]
        for b in self.blocks:
            out += b.convs()
        if self.feature_mix is not None:
            out.append(self.feature_mix)
        return out

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> int8 input (straight-through, so inputs can be attacked by gradient)."""
        scale, zero, mean, std = (float(v) for v in self.input_params)
        return torch.clamp(round_ste((x - mean) / std / scale) + zero, INT8_MIN, INT8_MAX)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """int8 pooled features (N x C x 1 x 1) of images in [0, 1]."""
        y = self.first_conv(self.quantize_input(x))
        for block in self.blocks:
            y = block(y)
        if self.feature_mix is not None:
            y = self.feature_mix(y)
        return self.pool(y)

    def int8_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's int8 output (only for an int8 classifier)."""
        if not isinstance(self.classifier, QConv):
            raise TypeError("the classifier is fp32; use forward() for float logits")
        return self.classifier(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: dequantized int8 logits, or the fp32 head's output."""
        feats = self.features(x)
        if isinstance(self.classifier, QConv):
            c = self.classifier
            return (c(feats).flatten(1) - c.y_zero) * c.y_scale
        return self.classifier(feats)
