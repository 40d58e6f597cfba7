"""Post-training quantization: fold BatchNorm, calibrate activation ranges, quantize to a :class:`QModel`.

Works on fedtiny's ``tiny-ir`` and on torchvision's MobileNetV2 (any width); both
are first turned into a :class:`FoldedNet` (float, BatchNorm folded into the
convolutions) of the same layout as the int8 graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.int8.graph import INT8_MAX, INT8_MIN, FloatHead, QAdd, QConv, QModel, from_blocks

__all__ = ["FoldedConv", "FoldedBlock", "FoldedNet", "fold", "calibrate", "quantize", "ptq", "ActRange"]

# Images in [0, 1] are quantized with this scale and zero point (exact for 8-bit images).
INPUT_SCALE, INPUT_ZERO = 1.0 / 255.0, -128


class FoldedConv(nn.Module):
    """A convolution with BatchNorm folded into its weight and bias, and an optional ReLU6."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu6: bool) -> None:
        super().__init__()
        w = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if bn is not None:
            gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
            beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(gamma)
            inv = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
            w = w * inv.view(-1, 1, 1, 1)
            b = (b - bn.running_mean.double()) * inv + beta
        self.weight = nn.Parameter(w.float())
        self.bias = nn.Parameter(b.float())
        self.stride, self.groups, self.relu6 = conv.stride[0], conv.groups, relu6
        if conv.padding[0] != conv.kernel_size[0] // 2:
            raise ModelFileError(f"unsupported padding {conv.padding} for kernel {conv.kernel_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.weight.shape[-1] // 2, 1, self.groups)
        return F.relu6(y) if self.relu6 else y


class FoldedBlock(nn.Module):
    def __init__(self, convs: list[FoldedConv], residual: bool) -> None:
        super().__init__()
        if len(convs) not in (2, 3):
            raise ModelFileError(f"an inverted-residual block has 2 or 3 convolutions, got {len(convs)}")
        self.pointwise1 = convs[0] if len(convs) == 3 else None
        self.depthwise, self.pointwise2 = convs[-2], convs[-1]
        self.residual = residual

    def convs(self) -> list[FoldedConv]:
        return [c for c in (self.pointwise1, self.depthwise, self.pointwise2) if c is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for c in self.convs():
            y = c(y)
        return x + y if self.residual else y


class FoldedNet(nn.Module):
    """Float network in the int8 graph's layout (BatchNorm folded); ``forward`` returns logits."""

    def __init__(self, first_conv: FoldedConv, blocks: list[FoldedBlock], feature_mix: FoldedConv | None,
                 classifier: nn.Linear) -> None:
        super().__init__()
        self.first_conv, self.blocks, self.feature_mix = first_conv, nn.ModuleList(blocks), feature_mix
        self.classifier = classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first_conv(x)
        for b in self.blocks:
            y = b(y)
        if self.feature_mix is not None:
            y = self.feature_mix(y)
        return y.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_groups(module: nn.Module) -> list[FoldedConv]:
    """Group a module's leaves, in order, into (Conv2d, BatchNorm2d?, ReLU6?) and fold each."""
    leaves = [m for m in module.modules() if not list(m.children())]
    out, i = [], 0
    while i < len(leaves):
        conv = leaves[i]
        if not isinstance(conv, nn.Conv2d):
            if isinstance(conv, (nn.Dropout, nn.Identity)):
                i += 1
                continue
            raise ModelFileError(f"unsupported layer {type(conv).__name__} (expected Conv2d, BatchNorm2d, ReLU6)")
        i += 1
        bn = None
        if i < len(leaves) and isinstance(leaves[i], nn.BatchNorm2d):
            bn, i = leaves[i], i + 1
        act = False
        if i < len(leaves) and isinstance(leaves[i], (nn.ReLU6, nn.ReLU)):
            if isinstance(leaves[i], nn.ReLU):
                raise ModelFileError("ReLU (unbounded) is not int8-foldable here; use ReLU6")
            act, i = True, i + 1
        out.append(FoldedConv(conv, bn, act))
    return out


def fold(model: nn.Module) -> FoldedNet:
    """Fold BatchNorm of ``tiny-ir`` or a torchvision MobileNetV2 into a :class:`FoldedNet`."""
    from fedtiny.models.tinyir import TinyIR

    model = model.eval()
    if isinstance(model, TinyIR):
        (first,) = _conv_groups(model.stem)
        blocks = [FoldedBlock(_conv_groups(b.conv), b.residual) for b in model.blocks]
        return FoldedNet(first, blocks, None, _copy_linear(model.classifier))
    try:
        from torchvision.models import MobileNetV2
    except ImportError:  # pragma: no cover
        MobileNetV2 = ()  # type: ignore[assignment]
    if isinstance(model, MobileNetV2):
        feats = list(model.features)
        (first,) = _conv_groups(feats[0])
        blocks = [FoldedBlock(_conv_groups(b.conv), b.use_res_connect) for b in feats[1:-1]]
        (mix,) = _conv_groups(feats[-1])
        linear = [m for m in model.classifier if isinstance(m, nn.Linear)][-1]
        return FoldedNet(first, blocks, mix, _copy_linear(linear))
    raise ModelFileError(f"cannot convert {type(model).__name__}: supported are tiny-ir and torchvision MobileNetV2")


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features)
    out.load_state_dict(linear.state_dict())
    return out


@dataclass
class ActRange:
    """Observed min/max of one activation."""

    lo: float = 0.0
    hi: float = 0.0

    def update(self, t: torch.Tensor) -> None:
        self.lo, self.hi = min(self.lo, float(t.min())), max(self.hi, float(t.max()))

    def qparams(self) -> tuple[float, int]:
        """Asymmetric int8 ``(scale, zero)`` covering ``[min(lo, 0), max(hi, 0)]``."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        zero = int(np.clip(round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
        return scale, zero


@torch.no_grad()
def calibrate(net: FoldedNet, batches) -> dict[str, ActRange]:
    """Run calibration batches (images in [0, 1]) and record each activation's range.

    Keys: ``conv{i}`` for every convolution output (forward order), ``block{j}`` for
    every block output, ``logits``.
    """
    ranges: dict[str, ActRange] = {}

    def rec(key: str, t: torch.Tensor) -> torch.Tensor:
        ranges.setdefault(key, ActRange()).update(t)
        return t

    for x in batches:
        x = torch.as_tensor(x, dtype=torch.float32)
        idx = 0
        y = rec(f"conv{idx}", net.first_conv(x))
        for j, b in enumerate(net.blocks):
            inp = y
            for c in b.convs():
                idx += 1
                y = rec(f"conv{idx}", c(y))
            if b.residual:
                y = inp + y
            rec(f"block{j}", y)
        if net.feature_mix is not None:
            idx += 1
            y = rec(f"conv{idx}", net.feature_mix(y))
        rec("logits", net.classifier(y.mean(dim=(2, 3))))
    return ranges


def _qconv(fc: FoldedConv, x_q: tuple[float, int], y_q: tuple[float, int]) -> QConv:
    w = fc.weight.detach().double()
    w_scales = (w.abs().flatten(1).max(dim=1).values / 127.0).clamp_min(1e-12)
    w_int = torch.clamp(torch.round(w / w_scales.view(-1, 1, 1, 1)), -127, 127)
    b_int = torch.round(fc.bias.detach().double() / (w_scales * x_q[0]))
    return QConv(w_int.float(), b_int.float(), w_scales.float(), x_q[0], x_q[1], y_q[0], y_q[1], fc.stride, fc.groups)


def quantize(net: FoldedNet, ranges: dict[str, ActRange], *, classifier_precision: str = "int8") -> QModel:
    """Build the int8 graph of ``net`` from calibrated activation ranges."""
    x_q = (INPUT_SCALE, INPUT_ZERO)
    idx = 0
    first = _qconv(net.first_conv, x_q, ranges["conv0"].qparams())
    x_q = (first.y_scale, first.y_zero)
    blocks = []
    for j, b in enumerate(net.blocks):
        block_in = x_q
        convs = []
        for c in b.convs():
            idx += 1
            convs.append(_qconv(c, x_q, ranges[f"conv{idx}"].qparams()))
            x_q = (convs[-1].y_scale, convs[-1].y_zero)
        residual = None
        if b.residual:
            out_q = ranges[f"block{j}"].qparams()
            residual = QAdd(block_in[0], block_in[1], x_q[0], x_q[1], out_q[0], out_q[1])
            x_q = out_q
        pw1 = convs[0] if len(convs) == 3 else None
        blocks.append((pw1, convs[-2], convs[-1], residual))
    mix = None
    if net.feature_mix is not None:
        idx += 1
        mix = _qconv(net.feature_mix, x_q, ranges[f"conv{idx}"].qparams())
        x_q = (mix.y_scale, mix.y_zero)
    lin = net.classifier
    if classifier_precision == "fp32":
        head: QConv | FloatHead = FloatHead(lin.weight.detach(), lin.bias.detach(), x_q[0], x_q[1])
    elif classifier_precision == "int8":
        fc = FoldedConv(nn.Conv2d(lin.in_features, lin.out_features, 1), None, False)
        fc.weight.data = lin.weight.detach().view(lin.out_features, lin.in_features, 1, 1).clone()
        fc.bias.data = lin.bias.detach().clone()
        head = _qconv(fc, x_q, ranges["logits"].qparams())
    else:
        raise ScenarioError(f"model.classifier_precision: expected int8 or fp32, got {classifier_precision!r}")
    return from_blocks(first, blocks, mix, head, INPUT_SCALE, INPUT_ZERO)


def ptq(model: nn.Module, calibration: np.ndarray, *, batch_size: int = 128, classifier_precision: str = "int8") -> QModel:
    """Post-training quantization of ``model`` calibrated on images ``calibration`` (N x C x H x W in [0, 1])."""
    net = fold(model)
    batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    qmodel = quantize(net, calibrate(net, batches), classifier_precision=classifier_precision)
    qmodel.input_shape = tuple(int(v) for v in calibration.shape[1:])
    return qmodel
