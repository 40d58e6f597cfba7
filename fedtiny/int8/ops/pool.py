"""AVERAGE_POOL_2D (windowed or global) in the int8 domain."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.ledger import GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, tensor_bytes
from fedtiny.int8.ops.base import INT8_MAX, INT8_MIN, CKind, Wiring, as_int, check_grads, grads, layout_ints, numel
from fedtiny.int8.ops.registry import OpKind, register


class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool: "QAvgPool", events: OpEvents, led: Ledger | NullLedger):
        ctx.in_shape, ctx.pool, ctx.events, ctx.ledger = x.shape, pool, events, led
        kernel, pad = pool.window(tuple(x.shape))
        return kernels.avg_pool_int8(as_int(x), kernel, pool.stride_for(tuple(x.shape)), pad, INT8_MIN, INT8_MAX).to(
            torch.float32
        )

    @staticmethod
    def backward(ctx, g):
        led, events, pool = ctx.ledger, ctx.events, ctx.pool
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        n, c, h, w = ctx.in_shape
        if pool.is_global(tuple(ctx.in_shape)):
            gx = (g / (h * w)).expand(n, c, h, w).contiguous()
        else:
            gx = pool.window_grad(tuple(ctx.in_shape), g)
        check_grads(led, events, [tensor_bytes(gx, "fp32")])
        events.backward(led)
        return gx, None, None, None


class QAvgPool(nn.Module):
    """Average pool in the int8 domain (scale and zero point unchanged), as TFLM rounds it.

    ``kernel=None`` is the global pool; otherwise a ``(kh, kw)`` window with ``stride``
    and ``(top, bottom, left, right)`` padding (only valid elements are averaged).
    """

    def __init__(
        self, kernel: tuple[int, int] | None = None, stride: int = 1, padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    ) -> None:
        super().__init__()
        self.kernel = None if kernel is None else (int(kernel[0]), int(kernel[1]))
        self.stride = int(stride)
        self.padding = tuple(int(p) for p in padding)
        self.tag = "pool"

    def is_global(self, in_shape: tuple[int, ...]) -> bool:
        return self.kernel is None or (self.kernel == tuple(in_shape[2:]) and not any(self.padding))

    def window(self, in_shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        if self.kernel is None:
            return (int(in_shape[2]), int(in_shape[3])), (0, 0, 0, 0)
        return self.kernel, self.padding

    def stride_for(self, in_shape: tuple[int, ...]) -> int:
        return 1 if self.kernel is None else self.stride

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.kernel is None:
            return 1, 1
        (kh, kw), (pt, pb, pl, pr), s = self.kernel, self.padding, self.stride
        return (hw[0] + pt + pb - kh) // s + 1, (hw[1] + pl + pr - kw) // s + 1

    def window_grad(self, in_shape: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
        """Gradient of a windowed mean over the valid elements of each window."""
        pt, pb, pl, pr = self.padding
        with torch.enable_grad():
            x = torch.zeros(in_shape, requires_grad=True)
            ones = torch.ones(in_shape)
            pad = (pl, pr, pt, pb)
            count = F.avg_pool2d(F.pad(ones, pad), self.kernel, self.stride, divisor_override=1)
            y = F.avg_pool2d(F.pad(x, pad), self.kernel, self.stride, divisor_override=1) / count
            (gx,) = torch.autograd.grad(y, x, g)
        return gx

    def events(self, in_shape: tuple[int, ...], wiring: Wiring, *, need_x: bool) -> OpEvents:
        """The buffers of the pool in a training step, for an ``N x C x H x W`` input."""
        out = in_shape[0] * in_shape[1] * numel(self.out_hw(in_shape[2:]))
        return OpEvents(
            self.tag,
            out,
            wiring.frees(),
            in_backward=need_x,
            grad_bytes=GRAD_BYTES * out,
            input_grads=((wiring.grad_tags[0], GRAD_BYTES * numel(in_shape)),) * need_x,
        )

    def schedule(self, ins, wiring: Wiring, need, *, inplace_depthwise: bool = True):
        """Output shape (per sample) and buffers of the op in a training step, from its inputs' shapes
        (``ins``, batch first) and whether a gradient must reach each input (``need``)."""
        return (ins[0][1], *self.out_hw(ins[0][2:])), self.events(ins[0], wiring, need_x=need[0])

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        (x,) = inputs
        led = NULL if quiet else active()
        events = self.events(tuple(x.shape), wiring or Wiring.single(), need_x=grads(x.requires_grad)[0])
        y = _PoolFn.apply(x, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- the kind


def _read(rd, k: int, op) -> tuple[QAvgPool, tuple[str, ...]]:
    label = rd.label(k, op)
    x = rd.tensor(op.inputs[0])
    if op.options.get("fused_activation", "NONE") != "NONE" or rd.q(op.inputs[0]) != rd.q(op.outputs[0]):
        raise ModelFileError(f"{label}: a pool must keep its input's quantization and have no activation")
    kernel = (int(op.options["filter_h"]), int(op.options["filter_w"]))
    padding = rd.padding(op, x, kernel)
    # A window over the whole input is the global pool, whatever its stride.
    whole = kernel == rd.hw(x) and not any(padding)
    module = QAvgPool(kernel, 1 if whole else rd.stride(op, label), padding)
    module.tag = rd.name("pool")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QAvgPool, name: str, ins):
    xi, xshape, _, xq = ins[0]
    kernel, pad = m.window(xshape)
    stride = m.stride_for(xshape)
    yshape = (1, xshape[1], *m.out_hw(xshape[2:]))
    mode = wr.pad_mode(pad, xshape[2:], kernel, stride)
    if mode is None:
        raise ModelFileError(f"export: {name}: padding {pad} is neither SAME nor VALID")
    out = wr.tensor(name, wr.shape(yshape, 4), scale=xq[0], zero=xq[1])
    wr.op(
        "AVERAGE_POOL_2D",
        (xi,),
        (out,),
        padding=mode,
        stride_h=stride,
        stride_w=stride,
        filter_h=kernel[0],
        filter_w=kernel[1],
        fused_activation="NONE",
    )
    return out, yshape, 4, xq


def _build(d: dict, where: str) -> QAvgPool:
    kernel = None if d.get("kernel") is None else layout_ints(d, "kernel", 2, where)
    return QAvgPool(
        kernel, int(d.get("stride", 1)), layout_ints(d, "padding", 4, where) if "padding" in d else (0,) * 4
    )


def _c_fill(cs, op, pool: QAvgPool, in_ids, in_shape) -> None:
    """AVERAGE_POOL_2D's fields of an ``ft_op``: the window, stride, top and left padding (the global pool's
    window is the whole plane, at stride 1). The C step's backward gives each input the share of the one
    window holding it, so windows must not overlap."""
    (kh, kw), pad = pool.window(tuple(in_shape))
    stride = pool.stride_for(tuple(in_shape))
    oh, ow = pool.out_hw(tuple(in_shape[2:]))
    if (kh > stride and oh > 1) or (kw > stride and ow > 1):
        raise ModelFileError(f"the C step does not run op {pool.tag!r} (an average pool whose windows overlap)")
    op.kind = CKind.POOL
    op.kh, op.kw, op.stride = kh, kw, stride
    op.pad_t, op.pad_l = pad[0], pad[2]


KIND = register(
    OpKind(
        "avgpool",
        QAvgPool,
        ("AVERAGE_POOL_2D",),
        read=_read,
        write=_write,
        describe=lambda m: {
            "kernel": list(m.kernel) if m.kernel else None,
            "stride": m.stride,
            "padding": list(m.padding),
        },
        build=_build,
        c_kind=CKind.POOL,
        c_fill=_c_fill,
    )
)
