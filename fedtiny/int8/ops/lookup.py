"""Elementwise int8 -> int8 ops: LOGISTIC, HARD_SWISH and QUANTIZE (a requantize between two int8 tensors).

An elementwise op of one int8 input is its table of 256 outputs (``table[x + 128]``), computed once
from TFLM's arithmetic (:mod:`fedtiny.int8.kernels_act`, :mod:`fedtiny.int8.kernels_misc`). Its
backward in the exact step is ``g * slope[x + 128]`` (float32), the slope a table of 256 float32
values the op states: for LOGISTIC and HARD_SWISH the lookup's own slope, the central difference
``(table[i + 1] - table[i - 1]) / 2`` (one-sided at -128 and 127); for a requantize the ratio
``s_in / s_out`` where the output is not clamped, 0 where it is. The device keeps the int8 input.
"""

from __future__ import annotations

import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels_act, kernels_misc
from fedtiny.int8.ops.base import CKind
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register

__all__ = ["QLookup", "QLogistic", "QHardSwish", "QRequantize", "lookup_slope", "register_lookup"]


def lookup_slope(table: torch.Tensor) -> torch.Tensor:
    """The central difference of a 256-entry table, one-sided at its ends (float32, exact: halves of integers)."""
    t = table.to(torch.float32)
    d = torch.empty(256, dtype=torch.float32)
    d[1:-1] = (t[2:] - t[:-2]) * 0.5
    d[0], d[-1] = t[1] - t[0], t[-1] - t[-2]
    return d


class QLookup(ParameterFreeOp):
    """An elementwise int8 op given by its table and slope (subclasses compute them)."""

    def __init__(self, x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> None:
        super().__init__((x_scale, x_zero, y_scale, y_zero))

    x_scale = property(lambda self: self.q(0)[0])
    x_zero = property(lambda self: self.q(0)[1])
    y_scale = property(lambda self: self.q(1)[0])
    y_zero = property(lambda self: self.q(1)[1])

    def derive(self) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.table()
        return table, self.slope(table)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(table, slope)``: int64 outputs and float32 slopes of the 256 int8 inputs."""
        return self.derived()

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def slope(self, table: torch.Tensor) -> torch.Tensor:
        return lookup_slope(table)

    def out_shape(self, in_shapes):
        return tuple(int(v) for v in in_shapes[0][1:])

    def saved_bytes(self, in_shapes, need) -> int:
        return int(torch.Size(in_shapes[0]).numel())  # the int8 input, to look its slope up

    def compute(self, xs, need):
        (x,) = xs
        index = x.detach().to(torch.int64) + 128
        return self.tables()[0][index].to(torch.float32), (index if any(need) else None)

    def gradients(self, g, saved, need, shapes):
        return (g * self.tables()[1][saved] if need[0] else None,)


class QLogistic(QLookup):
    """LOGISTIC: output scale 1/256, zero point -128 (TFLM requires that zero point)."""

    def table(self) -> torch.Tensor:
        if self.y_zero != -128:  # TFLM's Prepare refuses any other
            raise ValueError(f"TFLM's int8 LOGISTIC needs output zero point -128, not {self.y_zero}")
        return kernels_act.table(kernels_act.logistic_int8, kernels_act.logistic_params(self.x_scale, self.x_zero))


class QHardSwish(QLookup):
    """HARD_SWISH: ``x * relu6(x + 3) / 6`` in TFLM's int16 fixed point."""

    def table(self) -> torch.Tensor:
        params = kernels_act.hard_swish_params(self.x_scale, self.x_zero, self.y_scale, self.y_zero)
        return kernels_act.table(kernels_act.hard_swish_int8, params)


class QRequantize(QLookup):
    """QUANTIZE from one int8 quantization to another."""

    def table(self) -> torch.Tensor:
        x = torch.arange(-128, 128, dtype=torch.int64)
        return kernels_misc.quantize_int8(x, self.x_scale, self.x_zero, self.y_scale, self.y_zero)

    def slope(self, table: torch.Tensor) -> torch.Tensor:
        ratio = torch.tensor(self.x_scale / self.y_scale, dtype=torch.float32)
        inside = (table > -128) & (table < 127)
        return torch.where(inside, ratio, torch.zeros((), dtype=torch.float32))


def _reader(cls: type[QLookup], prefix: str):
    def read(rd, k: int, op) -> tuple[QLookup, tuple[str, ...]]:
        label = rd.label(k, op)
        (xs, xz), (ys, yz) = rd.q(op.inputs[0]), rd.q(op.outputs[0])
        try:
            module = cls(xs, xz, ys, yz)
            module.tables()
        except ValueError as exc:  # a quantization TFLM's Prepare refuses
            raise ModelFileError(f"{label}: {exc}") from None
        module.tag = rd.name(prefix)
        return module, (rd.names[op.inputs[0]],)

    return read


def _writer(op_name: str):
    def write(wr, m: QLookup, name: str, ins):
        xi, xshape, xrank, _ = ins[0]
        out = wr.tensor(name, wr.shape(xshape, xrank), scale=m.y_scale, zero=m.y_zero)
        wr.op(op_name, (xi,), (out,))
        return out, xshape, xrank, (m.y_scale, m.y_zero)

    return write


def _builder(cls: type[QLookup]):
    # placeholder quantization (the model's state sets it); LOGISTIC's output is always 1/256, -128
    return lambda d, where: cls(1.0, 0, 1 / 256, -128)


def _c_fill(cs, op, m: QLookup, in_ids, in_shape) -> None:
    """A lookup's fields of an ``ft_op`` (LOGISTIC, HARD_SWISH and QUANTIZE alike): its 256-entry int8 table and
    the backward's 256 float32 slopes, both indexed by ``x + 128``."""
    table, slope = m.tables()
    op.kind = CKind.LOOKUP
    op.table = cs.ptr(cs.array(table.to(torch.int8).numpy()))
    op.slope = cs.ptr(cs.array(slope.to(torch.float32).numpy()))


def register_lookup(name: str, cls: type[QLookup], op: str, prefix: str, **fields) -> OpKind:
    """Register a lookup kind: read and written as ``op``, built with placeholder quantization, run in the C
    step as a table (``fields`` override any of these, e.g. an op with options of its own)."""
    kind = dict(read=_reader(cls, prefix), write=_writer(op), build=_builder(cls), c_kind=CKind.LOOKUP, c_fill=_c_fill)
    return register(OpKind(name, cls, (op,), **{**kind, **fields}))


LOGISTIC = register_lookup("logistic", QLogistic, "LOGISTIC", "logistic")
HARD_SWISH = register_lookup("hard-swish", QHardSwish, "HARD_SWISH", "hardswish")
REQUANTIZE = register_lookup("requantize", QRequantize, "QUANTIZE", "requantize")
