"""The attacker's differentiable view of an int8 model: the same graph in real (float) units.

Weights ``s_w * W_int``, biases ``s_w * s_x * b_int``, each op's int8 output range as a clamp
(ReLU6 folded in), no rounding. Second-order differentiable, so gradient-matching attacks can
run through it; :func:`to_real_units` turns an int8 client's change into the same units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.int8.graph import QAdd, QAvgPool, QConv, QModel, QReshape, unit_scale
from fedtiny.int8.resolver import kind_of

__all__ = ["Surrogate", "to_real_units"]


def _range(scale: float, zero: int, lo: int = -128, hi: int = 127) -> tuple[float, float]:
    return (lo - zero) * scale, (hi - zero) * scale


class _Conv(nn.Module):
    def __init__(self, q: QConv) -> None:
        super().__init__()
        ws = q.w_scales.double().view(-1, *([1] * (q.weight.dim() - 1)))
        self.weight = nn.Parameter((q.weight.detach().double() * ws).float())
        self.bias = nn.Parameter((q.bias.detach().double() * q.w_scales.double() * q.x_scale).float())
        self.stride, self.groups = q.stride, q.groups
        self.padding, self.symmetric = q.torch_padding()
        self.pad = q.pad_lrtb()
        self.lo, self.hi = _range(q.y_scale, q.y_zero, *q.act_range())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            x = F.pad(x, self.pad)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return torch.clamp(y, self.lo, self.hi)


class _Add(nn.Module):
    def __init__(self, q: QAdd) -> None:
        super().__init__()
        self.lo, self.hi = _range(q.y_scale, q.y_zero, *q.act_range())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.clamp(a + b, self.lo, self.hi)


class _Pool(nn.Module):
    def __init__(self, q: QAvgPool) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.q.is_global(tuple(x.shape)):
            return x.mean(dim=(2, 3), keepdim=True)
        pt, pb, pl, pr = self.q.padding
        pad = (pl, pr, pt, pb)
        count = F.avg_pool2d(F.pad(torch.ones_like(x), pad), self.q.kernel, self.q.stride, divisor_override=1)
        return F.avg_pool2d(F.pad(x, pad), self.q.kernel, self.q.stride, divisor_override=1) / count


class _Linear(nn.Module):
    """An fp32 head on the pooled features."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(q.weight.detach().clone())
        self.bias = nn.Parameter(q.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


class _Clamped(nn.Module):
    """A parameter-free op in real units: ``fn`` of its inputs, clamped to its output's int8 range."""

    def __init__(self, fn, lo: float = float("-inf"), hi: float = float("inf")) -> None:
        super().__init__()
        self.fn, self.lo, self.hi = fn, lo, hi

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.fn(*xs), self.lo, self.hi)


def _max_pool(q) -> nn.Module:
    pt, pb, pl, pr = q.padding
    return _Clamped(
        lambda x: F.max_pool2d(F.pad(x, (pl, pr, pt, pb), value=float("-inf")), q.kernel, q.stride),
        *_range(*q.q(0), *q.act_range()),
    )


def _lookup(fn):
    return lambda q: _Clamped(fn, *_range(*q.q(1)))


# Each op kind's float twin, by kind name.
TWINS: dict[str, object] = {
    "conv": _Conv,
    "add": _Add,
    "avgpool": _Pool,
    "reshape": lambda m: QReshape(m.shape),
    "float-head": _Linear,
    "maxpool": _max_pool,
    "mean": lambda q: _Clamped(lambda x: x.mean(dim=(2, 3), keepdim=True), *_range(*q.q(1))),
    "mul": lambda q: _Clamped(torch.mul, *_range(*q.q(2), *q.act_range())),
    "concat": lambda q: _Clamped(lambda *xs: torch.cat(xs, dim=q.axis)),
    "logistic": _lookup(torch.sigmoid),
    "hard-swish": _lookup(F.hardswish),
    "requantize": _lookup(lambda x: x),
    "slice": lambda q: _Clamped(lambda x: x[q._index()]),
    "resize": lambda q: _Clamped(lambda x: x.repeat_interleave(q.factor[0], 2).repeat_interleave(q.factor[1], 3)),
    "relu": _lookup(F.relu),
    "relu6": _lookup(lambda x: torch.clamp(x, 0.0, 6.0)),
    "tanh": _lookup(torch.tanh),
    "leaky-relu": lambda q: _Clamped(lambda x: F.leaky_relu(x, q.alpha), *_range(*q.q(1))),
}


class Surrogate(nn.Module):
    """Float twin of a :class:`QModel` whose parameter names match the int8 model's (up to its head)."""

    def __init__(self, q: QModel) -> None:
        super().__init__()
        self.nodes = q.nodes[: q.nodes.index(next(n for n in q.nodes if n.op == "classifier")) + 1]
        for node in self.nodes:
            m = q.op(node.op)
            kind = kind_of(m).name
            if kind not in TWINS:
                raise ValueError(f"the float surrogate has no twin of op {node.op!r} ({kind})")
            self.add_module(node.op, TWINS[kind](m))
        scale, zero, mean, std = (float(v) for v in q.input_params)
        self.input = (mean, std, *_range(scale, zero))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std, lo, hi = self.input
        env = {"input": torch.clamp((x - mean) / std, lo, hi)}
        for node in self.nodes:
            env[node.op] = getattr(self, node.op)(*(env[t] for t in node.inputs))
        return env["classifier"].flatten(1)


def to_real_units(q: QModel, name: str, change: torch.Tensor) -> torch.Tensor:
    """An int8 client's change of tensor ``name`` (integer units) in the surrogate's units."""
    return (change.double() * unit_scale(q, name)).float()
