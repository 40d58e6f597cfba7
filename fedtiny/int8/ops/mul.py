"""MUL of two int8 tensors, as TFLM's reference kernel computes it (the second may broadcast over H, W: the
gate of a squeeze-and-excitation block)."""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.kernels_misc import mul_int8, mul_params
from fedtiny.int8.ops.base import ACTIVATIONS, CKind, to_nchw_shape
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register


def sum_hw_in_order(t: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x C x 1 x 1``: each plane summed in float32 in row-major order, as the C step
    adds a broadcast operand's gradient."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    acc = flat[:, :, 0].clone()
    for i in range(1, flat.shape[2]):
        acc = acc + flat[:, :, i]
    return acc[:, :, None, None]


class QMul(ParameterFreeOp):
    """``y = clamp(MBQM((a - z_a)(b - z_b), M) + z_y)`` with ``M`` TFLM's multiplier of ``s_a s_b / s_y``.

    Backward (exact step), where the output is not clamped: ``g_a = g * (f32(b - z_b) * r)`` and
    ``g_b = g * (f32(a - z_a) * r)`` in float32 with ``r = f32(s_a s_b / s_y)``; a ``b`` broadcast over
    H, W gets its plane of ``g_b`` summed in row-major order (:func:`sum_hw_in_order`). The device keeps
    both int8 inputs and the clamp's mask.
    """

    def __init__(
        self,
        a_scale: float,
        a_zero: int,
        b_scale: float,
        b_zero: int,
        y_scale: float,
        y_zero: int,
        activation: str = "NONE",
    ) -> None:
        super().__init__((a_scale, a_zero, b_scale, b_zero, y_scale, y_zero))
        if activation not in ACTIVATIONS:
            raise ModelFileError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.tag = "mul"

    def derive(self):
        """TFLM's multiplier and the backward's ratio ``r``."""
        (sa, za), (sb, zb), (sy, zy) = self.q(0), self.q(1), self.q(2)
        return mul_params(sa, za, sb, zb, sy, zy), float(np.float32(sa * sb / sy))

    def act_range(self) -> tuple[int, int]:
        return kernels.activation_range(self.activation, *self.q(2))

    def out_shape(self, in_shapes):
        return tuple(max(int(u), int(v)) for u, v in zip(in_shapes[0][1:], in_shapes[1][1:]))

    def saved_bytes(self, in_shapes, need) -> int:
        out = int(in_shapes[0][0]) * int(np.prod(self.out_shape(in_shapes)))
        return sum(int(np.prod(s)) for s in in_shapes) + (out + 7) // 8

    def compute(self, xs, need):
        a, b = (x.detach().to(torch.int64) for x in xs)
        lo, hi = self.act_range()
        y = mul_int8(a, b, self.derived()[0], -(2**31), 2**31 - 1)
        saved = (a, b, (y >= lo) & (y <= hi)) if any(need) else None
        return y.clamp(lo, hi).to(torch.float32), saved

    def gradients(self, g, saved, need, shapes):
        a, b, mask = saved
        r = torch.tensor(self.derived()[1], dtype=torch.float32)
        za, zb = self.q(0)[1], self.q(1)[1]
        gm = torch.where(mask, g, torch.zeros((), dtype=g.dtype))
        ga = gb = None
        if need[0]:
            ga = gm * ((b - zb).to(torch.float32) * r)
            if tuple(ga.shape) != tuple(shapes[0]):
                ga = sum_hw_in_order(ga)
        if need[1]:
            gb = gm * ((a - za).to(torch.float32) * r)
            if tuple(gb.shape) != tuple(shapes[1]):
                gb = sum_hw_in_order(gb)
        return ga, gb


def _read(rd, k: int, op) -> tuple[QMul, tuple[str, ...]]:
    label = rd.label(k, op)
    sa, sb = (tuple(rd.tensor(i).shape) for i in op.inputs[:2])
    if len(sa) != len(sb) or len(sa) not in (2, 4):
        raise ModelFileError(
            f"{label}: MUL of shapes {list(sa)} and {list(sb)}: fedtiny multiplies tensors of one rank (2 or 4)"
        )
    na, nb = to_nchw_shape(sa), to_nchw_shape(sb)
    if na[1] != nb[1] or not (na == nb or nb[2:] == (1, 1) or na[2:] == (1, 1)):
        raise ModelFileError(
            f"{label}: MUL of shapes {list(sa)} and {list(sb)}: fedtiny multiplies equal shapes, "
            "or one of 1x1 planes per channel"
        )
    inputs = [op.inputs[0], op.inputs[1]]
    if na[2:] == (1, 1) and nb[2:] != (1, 1):  # the broadcast operand second
        inputs.reverse()
    module = QMul(*rd.q(inputs[0]), *rd.q(inputs[1]), *rd.q(op.outputs[0]), op.options.get("fused_activation", "NONE"))
    module.tag = rd.name("mul")
    return module, tuple(rd.names[i] for i in inputs)


def _write(wr, m: QMul, name: str, ins):
    (ai, ashape, arank, _), (bi, bshape, *_) = ins
    yshape = (1, *m.out_shape([ashape, bshape]))
    out = wr.tensor(name, wr.shape(yshape, arank), scale=m.q(2)[0], zero=m.q(2)[1])
    wr.op("MUL", (ai, bi), (out,), fused_activation=m.activation)
    return out, yshape, arank, m.q(2)


def _c_fill(cs, op, m: QMul, in_ids, in_shape) -> None:
    """MUL's fields of an ``ft_op``: the inputs' zero points (``z1``, ``z2``), the output's (``z_out``), TFLM's
    multiplier (``mo``, ``so``), the activation's range and the backward's ``r`` (``ratio_a``). The C step
    takes the broadcast operand (one value per channel) second: a broadcast first operand is swapped with
    the other (the product and both gradients are the same numbers either way round)."""
    p, r = m.derived()
    (a, za), (b, zb) = (in_ids[0], p.a_zero), (in_ids[1], p.b_zero)
    sa, sb = cs.tensor_shapes[a], cs.tensor_shapes[b]
    out = (op.oc, op.oh, op.ow)
    if sa != out and sb == out:
        (a, za, sa), (b, zb, sb) = (b, zb, sb), (a, za, sa)
        op.c, op.h, op.w = out
    if sa != out or sb not in (out, (out[0], 1, 1)):
        raise ModelFileError(
            f"the C step does not run op {m.tag!r} (a MUL of {sa} and {sb}: it multiplies equal "
            "shapes, or one by a value per channel)"
        )
    op.kind = CKind.MUL
    op.in0, op.in1 = a, b
    op.z1, op.z2, op.z_out, op.mo, op.so = za, zb, p.y_zero, p.mult, p.shift
    op.act_lo, op.act_hi = m.act_range()
    op.ratio_a = r


KIND = register(
    OpKind(
        "mul",
        QMul,
        ("MUL",),
        read=_read,
        write=_write,
        describe=lambda m: {"activation": m.activation},
        build=lambda d, where: QMul(1.0, 0, 1.0, 0, 1.0, 0, str(d.get("activation", "NONE"))),
        c_kind=CKind.MUL,
        c_fill=_c_fill,
    )
)
