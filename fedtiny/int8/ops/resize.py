"""RESIZE_NEAREST_NEIGHBOR by integer factors in the int8 domain (values copied, quantization unchanged), as TFLM's
reference kernel computes it without ``align_corners`` or ``half_pixel_centers``."""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.ops.base import CKind, layout_ints
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register


class QResize(ParameterFreeOp):
    """Nearest-neighbour upsampling of each plane by ``factor = (fy, fx)``: an ``H x W`` input becomes
    ``fy H x fx W`` and output ``(y, x)`` is input ``(floor(y H / (fy H)), floor(x W / (fx W)))``, i.e.
    ``(y // fy, x // fx)``. TFLM computes the source row as ``floor(float32(y) * float32(H / oh))``, which for
    an integer factor is the same row (checked for factors up to 32 and inputs up to 256 rows; the TFLM tests
    compare the two).

    Backward (exact step): each input's gradient is the float32 sum of the gradients of its ``fy x fx``
    copies, started at +0 and added copy by copy in row-major order (copy (0, 0) first), as the C step adds
    them. Nothing is kept for it.
    """

    def __init__(self, factor: tuple[int, int]) -> None:
        super().__init__(())  # a copy of its input: the input's quantization is the output's
        self.factor = (int(factor[0]), int(factor[1]))
        if min(self.factor) < 1:
            raise ModelFileError(f"resize factor {self.factor}: two positive integers")
        self.tag = "resize"

    def out_shape(self, in_shapes):
        c, h, w = (int(v) for v in in_shapes[0][1:])
        return c, h * self.factor[0], w * self.factor[1]

    def compute(self, xs, need):
        x = xs[0].detach()
        _, h, w = x.shape[1:]
        _, oh, ow = self.out_shape([x.shape])
        rows = torch.arange(oh) * h // oh  # floor(y H / oh): TFLM's source row
        cols = torch.arange(ow) * w // ow
        return x[:, :, rows][:, :, :, cols].contiguous(), None

    def gradients(self, g, saved, need, shapes):
        if not need[0]:
            return (None,)
        fy, fx = self.factor
        gx = torch.zeros(shapes[0], dtype=torch.float32)
        for i in range(fy):
            for j in range(fx):
                # copy (i, j) of every input: one float32 add each, copy after copy in row-major order
                gx = gx + g[:, :, i::fy, j::fx]
        return (gx,)


def _read(rd, k: int, op) -> tuple[QResize, tuple[str, ...]]:
    label = rd.label(k, op)
    x, size = rd.tensor(op.inputs[0]), rd.tensor(op.inputs[1]).data
    if op.options.get("align_corners", False) or op.options.get("half_pixel_centers", False):
        raise ModelFileError(f"{label}: fedtiny resizes without align_corners and half_pixel_centers")
    if size is None or np.asarray(size).size != 2 or len(x.shape) != 4:
        raise ModelFileError(f"{label}: the new size must be a constant [height, width] of a 4-D tensor")
    (h, w), (oh, ow) = rd.hw(x), (int(v) for v in np.asarray(size).reshape(-1))
    if oh < h or ow < w or oh % h or ow % w:
        raise ModelFileError(f"{label}: fedtiny upsamples by integer factors, not {h}x{w} to {oh}x{ow}")
    if rd.q(op.inputs[0]) != rd.q(op.outputs[0]):  # TFLM copies the bytes: the values keep their meaning only so
        raise ModelFileError(f"{label}: a resize must keep its input's quantization")
    module = QResize((oh // h, ow // w))
    module.tag = rd.name("resize")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QResize, name: str, ins):
    xi, xshape, _, xq = ins[0]
    yshape = (1, *m.out_shape([xshape]))
    size = wr.tensor(f"{name}/size", (2,), "int32", data=np.asarray(yshape[2:], np.int32))
    out = wr.tensor(name, wr.shape(yshape, 4), scale=xq[0], zero=xq[1])
    wr.op("RESIZE_NEAREST_NEIGHBOR", (xi, size), (out,), align_corners=False, half_pixel_centers=False)
    return out, yshape, 4, xq


def _build(d: dict, where: str) -> QResize:
    fy, fx = layout_ints(d, "factor", 2, where)
    if fy < 1 or fx < 1:
        raise ModelFileError(f"{where}: resize factor must be two positive integers, got {[fy, fx]}")
    return QResize((fy, fx))


def _c_fill(cs, op, m: QResize, in_ids, in_shape) -> None:
    """RESIZE_NEAREST_NEIGHBOR's fields of an ``ft_op``: none of its own (the factors are ``oh / h`` and
    ``ow / w`` of the shapes every op has)."""
    op.kind = CKind.RESIZE


KIND = register(
    OpKind(
        "resize",
        QResize,
        ("RESIZE_NEAREST_NEIGHBOR",),
        read=_read,
        write=_write,
        describe=lambda m: {"factor": list(m.factor)},
        build=_build,
        c_kind=CKind.RESIZE,
        c_fill=_c_fill,
        index_inputs={"RESIZE_NEAREST_NEIGHBOR": (1,)},
    )
)
