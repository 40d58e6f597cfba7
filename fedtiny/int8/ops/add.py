"""ADD of two int8 tensors (a residual)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels, native
from fedtiny.int8.ledger import GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, tensor_bytes
from fedtiny.int8.ops.base import (
    INT32_MAX,
    INT32_MIN,
    CKind,
    QParamsMixin,
    Wiring,
    as_int,
    check_grads,
    grads,
    numel,
    qparams,
)
from fedtiny.int8.ops.registry import OpKind, register


class _QAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, add: "QAdd", events: OpEvents, led: Ledger | NullLedger):
        lo, hi = add.act_range()
        want_mask = any(ctx.needs_input_grad[:2])
        fast = native.add_clamp(x, b, add.add_params(), lo, hi, want_mask)
        if fast is not None:
            y, mask = fast
        else:
            y = kernels.add_int8(as_int(x), as_int(b), add.add_params(), INT32_MIN, INT32_MAX).to(torch.float32)
            mask = ((y >= lo) & (y <= hi)) if want_mask else None
            y = y.clamp(lo, hi)
        ra, rb = add.x_scale / add.y_scale, float(add.bparams[0]) / add.y_scale
        ctx.ratios, ctx.events, ctx.ledger = (ra, rb), events, led
        led.check(f"saved:{add.tag}", events.saved, 0 if mask is None else tensor_bytes(mask, "bit"))
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        led, events = ctx.ledger, ctx.events
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        gm = g * mask
        gx = gb = None
        held = []
        if ctx.needs_input_grad[0]:
            gx = gm * ctx.ratios[0]
            held.append(tensor_bytes(gx, "fp32"))
        if ctx.needs_input_grad[1]:
            gb = gm * ctx.ratios[1]
            held.append(tensor_bytes(gb, "fp32"))
        check_grads(led, events, held)
        events.backward(led)
        return gx, gb, None, None, None


class QAdd(QParamsMixin, nn.Module):
    """Elementwise add of two int8 tensors (a residual), as TFLM's ADD computes it.

    ``x`` is the first input (``x_scale``, ``x_zero``); the other input carries its own
    ``b_scale``, ``b_zero`` (``bparams``).
    """

    def __init__(
        self,
        x_scale: float,
        x_zero: int,
        b_scale: float,
        b_zero: int,
        y_scale: float,
        y_zero: int,
        *,
        activation: str = "NONE",
    ) -> None:
        super().__init__()
        self.register_buffer("qparams", qparams(x_scale, x_zero, y_scale, y_zero))
        self.register_buffer("bparams", torch.tensor([b_scale, b_zero], dtype=torch.float64))
        self.activation = activation
        self.tag = "add"
        self._key: tuple | None = None
        self._params = None

    def add_params(self):
        key = (tuple(self.qparams.tolist()), tuple(self.bparams.tolist()))
        if key != self._key:
            self._params = kernels.add_params(
                self.x_scale, self.x_zero, float(self.bparams[0]), int(self.bparams[1]), self.y_scale, self.y_zero
            )
            self._key = key
        return self._params

    def act_range(self) -> tuple[int, int]:
        return kernels.activation_range(self.activation, self.y_scale, self.y_zero)

    def events(self, shape: tuple[int, ...], wiring: Wiring, *, need_x: bool, need_b: bool) -> OpEvents:
        """The buffers of the add in a training step (both inputs ``shape``)."""
        out = numel(shape)
        grads = need_x or need_b
        return OpEvents(
            self.tag,
            out,
            wiring.frees(),
            saved=(out + 7) // 8 if grads else 0,
            in_backward=grads,
            grad_bytes=GRAD_BYTES * out,
            input_grads=((wiring.grad_tags[0], GRAD_BYTES * out),) * need_x
            + ((wiring.grad_tags[1], GRAD_BYTES * out),) * need_b,
        )

    def schedule(self, ins, wiring: Wiring, need, *, inplace_depthwise: bool = True):
        """Output shape (per sample) and buffers of the op in a training step, from its inputs' shapes
        (``ins``, batch first) and whether a gradient must reach each input (``need``)."""
        return tuple(ins[1][1:]), self.events(ins[1], wiring, need_x=need[0], need_b=need[1])

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        x, b = inputs
        led = NULL if quiet else active()
        need_x, need_b = grads(x.requires_grad, b.requires_grad)
        events = self.events(tuple(b.shape), wiring or Wiring.single(2), need_x=need_x, need_b=need_b)
        y = _QAddFn.apply(x, b, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.run([x, b])


# ---------------------------------------------------------------- the kind


def _read(rd, k: int, op) -> tuple[QAdd, tuple[str, ...]]:
    x, b = rd.tensor(op.inputs[0]), rd.tensor(op.inputs[1])
    if tuple(x.shape) != tuple(b.shape):
        raise ModelFileError(f"{rd.label(k, op)}: broadcasting adds are not supported ({x.shape} + {b.shape})")
    module = QAdd(
        *rd.q(op.inputs[0]),
        *rd.q(op.inputs[1]),
        *rd.q(op.outputs[0]),
        activation=op.options.get("fused_activation", "NONE"),
    )
    module.tag = rd.name("add")
    return module, (rd.names[op.inputs[0]], rd.names[op.inputs[1]])


def _write(wr, m: QAdd, name: str, ins):
    (xi, xshape, xrank, _), (bi, *_) = ins
    out = wr.tensor(name, wr.shape(xshape, xrank), scale=m.y_scale, zero=m.y_zero)
    wr.op("ADD", (xi, bi), (out,), fused_activation=m.activation)
    return out, xshape, xrank, (m.y_scale, m.y_zero)


def _c_fill(cs, op, add: QAdd, in_ids, in_shape) -> None:
    """TFLM's ADD parameters and the backward's ratios ``s_a / s_y``, ``s_b / s_y``."""
    op.kind, op.in1 = CKind.ADD, in_ids[1]
    p = add.add_params()
    op.z1, op.z2, op.z_out, op.left_shift = p.z1, p.z2, p.z_out, p.left_shift
    op.m1, op.s1, op.m2, op.s2, op.mo, op.so = p.mult1, p.shift1, p.mult2, p.shift2, p.mult_out, p.shift_out
    op.act_lo, op.act_hi = add.act_range()
    op.ratio_a = add.x_scale / add.y_scale
    op.ratio_b = float(add.bparams[0]) / add.y_scale


KIND = register(
    OpKind(
        "add",
        QAdd,
        ("ADD",),
        read=_read,
        write=_write,
        describe=lambda m: {"activation": m.activation},
        build=lambda d, where: QAdd(1.0, 0, 1.0, 0, 1.0, 0, activation=str(d.get("activation", "NONE"))),
        c_kind=CKind.ADD,
        c_fill=_c_fill,
    )
)
