"""The attacker's differentiable view of an int8 model: the same graph in real (float) units.

Weights ``s_w * W_int``, biases ``s_w * s_x * b_int``, each op's int8 output range as a clamp
(ReLU6 folded in), no rounding. Second-order differentiable, so gradient-matching attacks can
run through it; :func:`to_real_units` turns an int8 client's change into the same units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.int8.graph import INT8_MAX, INT8_MIN, QConv, QModel, unit_scale

__all__ = ["Surrogate", "to_real_units"]


def _range(scale: float, zero: int) -> tuple[float, float]:
    return (INT8_MIN - zero) * scale, (INT8_MAX - zero) * scale


class _Conv(nn.Module):
    def __init__(self, q: QConv) -> None:
        super().__init__()
        ws = q.w_scales.double().view(-1, *([1] * (q.weight.dim() - 1)))
        self.weight = nn.Parameter((q.weight.detach().double() * ws).float())
        self.bias = nn.Parameter((q.bias.detach().double() * q.w_scales.double() * q.x_scale).float())
        self.stride, self.groups, self.padding = q.stride, q.groups, q.padding
        self.lo, self.hi = _range(q.y_scale, q.y_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return torch.clamp(y, self.lo, self.hi)


class Surrogate(nn.Module):
    """Float twin of a :class:`QModel` whose parameter names match the int8 model's."""

    def __init__(self, q: QModel) -> None:
        super().__init__()
        self.first_conv = _Conv(q.first_conv)
        self.blocks = nn.ModuleList()
        self._residual = []
        for b in q.blocks:
            block = nn.Module()
            for name in ("pointwise1", "depthwise", "pointwise2"):
                conv = getattr(b, name)
                setattr(block, name, _Conv(conv) if conv is not None else None)
            self.blocks.append(block)
            self._residual.append(_range(b.residual.y_scale, b.residual.y_zero) if b.residual is not None else None)
        self.feature_mix = _Conv(q.feature_mix) if q.feature_mix is not None else None
        scale, zero, mean, std = (float(v) for v in q.input_params)
        self.input = (mean, std, *_range(scale, zero))
        if isinstance(q.classifier, QConv):
            self.classifier = _Conv(q.classifier)
        else:
            self.classifier = nn.Module()
            self.classifier.weight = nn.Parameter(q.classifier.weight.detach().clone())
            self.classifier.bias = nn.Parameter(q.classifier.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, lo, hi = self.input
        y = self.first_conv(torch.clamp((x - mean) / std, lo, hi))
        for block, res in zip(self.blocks, self._residual):
            inp = y
            for name in ("pointwise1", "depthwise", "pointwise2"):
                conv = getattr(block, name)
                if conv is not None:
                    y = conv(y)
            if res is not None:
                y = torch.clamp(inp + y, *res)
        if self.feature_mix is not None:
            y = self.feature_mix(y)
        y = y.mean(dim=(2, 3), keepdim=True)
        if isinstance(self.classifier, _Conv):
            return self.classifier(y).flatten(1)
        return F.linear(y.flatten(1), self.classifier.weight, self.classifier.bias)


def to_real_units(q: QModel, name: str, change: torch.Tensor) -> torch.Tensor:
    """An int8 client's change of tensor ``name`` (integer units) in the surrogate's units."""
    return (change.double() * unit_scale(q, name)).float()
