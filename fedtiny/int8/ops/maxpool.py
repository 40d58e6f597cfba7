"""MAX_POOL_2D in the int8 domain (quantization unchanged), as TFLM's reference kernel computes it."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.kernels_misc import max_pool_int8
from fedtiny.int8.ops.base import ACTIVATIONS, CKind
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register


class QMaxPool(ParameterFreeOp):
    """Max over ``kernel`` windows at ``stride`` with ``(top, bottom, left, right)`` padding; padded taps are
    skipped. ``scale``/``zero`` (input = output) give the fused activation's range.

    Backward (exact step): each output's gradient goes to the first tap holding the window's maximum
    (taps in row-major order), nothing where the activation clamped the output; where windows overlap,
    an input's gradients add in float32 tap by tap (tap (0, 0) first), so every input gets one sum in
    one stated order, as the C step adds them.
    """

    def __init__(
        self,
        kernel: tuple[int, int],
        stride: int,
        padding: tuple[int, int, int, int],
        scale: float,
        zero: int,
        activation: str = "NONE",
    ) -> None:
        super().__init__((scale, zero))
        if activation not in ACTIVATIONS:
            raise ModelFileError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.kernel = (int(kernel[0]), int(kernel[1]))
        self.stride, self.padding = int(stride), tuple(int(p) for p in padding)
        self.activation = activation
        self.tag = "maxpool"

    def act_range(self) -> tuple[int, int]:
        return kernels.activation_range(self.activation, *self.q(0))

    def out_hw(self, hw: Sequence[int]) -> tuple[int, int]:
        (kh, kw), (pt, pb, pl, pr), s = self.kernel, self.padding, self.stride
        return (int(hw[0]) + pt + pb - kh) // s + 1, (int(hw[1]) + pl + pr - kw) // s + 1

    def out_shape(self, in_shapes):
        return (int(in_shapes[0][1]), *self.out_hw(in_shapes[0][2:]))

    def saved_bytes(self, in_shapes, need) -> int:
        # one byte per output: the tap of its maximum (255: clamped, no gradient)
        return int(in_shapes[0][0]) * int(np.prod(self.out_shape(in_shapes)))

    def _taps(self, x: torch.Tensor) -> torch.Tensor:
        """``kh*kw x N x C x OH x OW``: each window's values tap by tap (padding -129, below any int8)."""
        (kh, kw), (pt, pb, pl, pr), s = self.kernel, self.padding, self.stride
        xp = F.pad(x.to(torch.float32), (pl, pr, pt, pb), value=-129.0)
        oh, ow = self.out_hw(x.shape[2:])
        return torch.stack(
            [xp[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s] for i in range(kh) for j in range(kw)]
        )

    def compute(self, xs, need):
        (x,) = xs
        lo, hi = self.act_range()
        y = max_pool_int8(x.detach().to(torch.int64), self.kernel, self.stride, self.padding, lo, hi)
        saved = None
        if any(need):
            taps = self._taps(x.detach())
            m = taps.max(dim=0).values
            first = (taps == m).to(torch.int8).argmax(dim=0)  # the first tap holding the maximum
            inside = (m >= lo) & (m <= hi)
            saved = torch.where(inside, first, torch.full_like(first, 255, dtype=torch.int64)).to(torch.uint8)
        return y.to(torch.float32), saved

    def gradients(self, g, saved, need, shapes):
        (kh, kw), (pt, pb, pl, pr), s = self.kernel, self.padding, self.stride
        n, c, h, w = shapes[0]
        oh, ow = g.shape[2:]
        gp = torch.zeros(n, c, h + pt + pb, w + pl + pr, dtype=torch.float32)
        tap = saved.to(torch.int64)
        for i in range(kh):
            for j in range(kw):
                sel = torch.where(tap == i * kw + j, g, torch.zeros((), dtype=g.dtype))
                # a tap's outputs reach distinct inputs: one float32 add each, tap after tap
                gp[:, :, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s] += sel
        return (gp[:, :, pt : pt + h, pl : pl + w].contiguous() if need[0] else None,)


def _read(rd, k: int, op) -> tuple[QMaxPool, tuple[str, ...]]:
    label = rd.label(k, op)
    (xs, xz), (ys, yz) = rd.q(op.inputs[0]), rd.q(op.outputs[0])
    if abs(np.float32(xs) - np.float32(ys)) > 1e-6 or xz != yz:  # TFLM's Prepare
        raise ModelFileError(
            f"{label}: a max pool keeps its input's quantization (input {xs:g}/{xz}, output {ys:g}/{yz})"
        )
    kernel = (int(op.options["filter_h"]), int(op.options["filter_w"]))
    x = rd.tensor(op.inputs[0])
    module = QMaxPool(
        kernel, rd.stride(op, label), rd.padding(op, x, kernel), ys, yz, op.options.get("fused_activation", "NONE")
    )
    module.tag = rd.name("maxpool")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QMaxPool, name: str, ins):
    xi, xshape, _, xq = ins[0]
    yshape = (1, xshape[1], *m.out_hw(xshape[2:]))
    mode = wr.pad_mode(m.padding, xshape[2:], m.kernel, m.stride)
    if mode is None:
        raise ModelFileError(f"export: {name}: padding {m.padding} is neither SAME nor VALID")
    out = wr.tensor(name, wr.shape(yshape, 4), scale=xq[0], zero=xq[1])
    wr.op(
        "MAX_POOL_2D",
        (xi,),
        (out,),
        padding=mode,
        stride_h=m.stride,
        stride_w=m.stride,
        filter_h=m.kernel[0],
        filter_w=m.kernel[1],
        fused_activation=m.activation,
    )
    return out, yshape, 4, xq


def _build(d: dict, where: str) -> QMaxPool:
    return QMaxPool(tuple(d["kernel"]), int(d["stride"]), tuple(d["padding"]), 1.0, 0, str(d.get("activation", "NONE")))


def _c_fill(cs, op, m: QMaxPool, in_ids, in_shape) -> None:
    """MAX_POOL_2D's fields of an ``ft_op``: the window, stride, top and left padding (the output's size implies
    the rest) and the fused activation's range. The C step keeps one tap byte per output (``saved_bytes``)."""
    if m.kernel[0] * m.kernel[1] >= 255:  # a tap is one byte, 255 meaning none
        raise ModelFileError(f"the C step does not run op {m.tag!r} (a max pool window of 255 taps or more)")
    op.kind = CKind.MAXPOOL
    op.kh, op.kw = m.kernel
    op.stride = m.stride
    op.pad_t, op.pad_l = m.padding[0], m.padding[2]
    op.act_lo, op.act_hi = m.act_range()


KIND = register(
    OpKind(
        "maxpool",
        QMaxPool,
        ("MAX_POOL_2D",),
        read=_read,
        write=_write,
        describe=lambda m: {
            "kernel": list(m.kernel),
            "stride": m.stride,
            "padding": list(m.padding),
            "activation": m.activation,
        },
        build=_build,
        c_kind=CKind.MAXPOOL,
        c_fill=_c_fill,
    )
)
