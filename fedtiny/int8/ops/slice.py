"""STRIDED_SLICE of a 4-D int8 tensor (values copied, quantization unchanged), as TFLM resolves its bounds."""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.kernels_misc import _slice_start, _slice_stop
from fedtiny.int8.ops.base import CKind
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register

_NCHW_FROM_NHWC = (0, 3, 1, 2)  # NCHW axis i is NHWC axis _NCHW_FROM_NHWC[i]


class QSlice(ParameterFreeOp):
    """Elements ``start:stop:step`` of channels, rows and columns (``bounds``: three resolved triples, NCHW
    order, positive steps). Backward: the output gradient placed back where its elements came from,
    zeros elsewhere."""

    def __init__(self, bounds) -> None:
        super().__init__(())
        self.bounds = tuple(tuple(int(v) for v in b) for b in bounds)
        if len(self.bounds) != 3 or any(len(b) != 3 or b[2] < 1 or b[0] < 0 for b in self.bounds):
            raise ModelFileError(f"slice bounds {self.bounds}: three (start, stop, positive step) triples")
        self.tag = "slice"

    def _index(self):
        return (slice(None), *(slice(a, b, s) for a, b, s in self.bounds))

    def out_shape(self, in_shapes):
        return tuple(len(range(a, min(b, int(n)), s)) for (a, b, s), n in zip(self.bounds, in_shapes[0][1:]))

    def compute(self, xs, need):
        return xs[0].detach()[self._index()].contiguous(), None

    def gradients(self, g, saved, need, shapes):
        if not need[0]:
            return (None,)
        gx = torch.zeros(shapes[0], dtype=torch.float32)
        gx[self._index()] = g
        return (gx,)


def _read(rd, k: int, op) -> tuple[QSlice, tuple[str, ...]]:
    label = rd.label(k, op)
    x = rd.tensor(op.inputs[0])
    begin, end, strides = (np.asarray(rd.tensor(i).data, np.int64).reshape(-1) for i in op.inputs[1:4])
    o = op.options
    if (
        len(x.shape) != 4
        or len(begin) != 4
        or o.get("shrink_axis_mask", 0)
        or o.get("ellipsis_mask", 0)
        or o.get("new_axis_mask", 0)
        or np.any(strides <= 0)
    ):
        raise ModelFileError(
            f"{label}: fedtiny slices 4-D tensors with positive strides, without shrink, ellipsis or new axes"
        )
    bm, em = int(o.get("begin_mask", 0)), int(o.get("end_mask", 0))
    resolved = []
    for a in range(4):
        start = _slice_start(int(begin[a]), int(strides[a]), int(x.shape[a]), bool(bm >> a & 1))
        stop = _slice_stop(int(end[a]), int(strides[a]), int(x.shape[a]), start, bool(em >> a & 1), False)
        resolved.append((start, stop, int(strides[a])))
    if resolved[0][:2] != (0, int(x.shape[0])):
        raise ModelFileError(f"{label}: a slice of the batch axis is not supported")
    module = QSlice([resolved[_NCHW_FROM_NHWC[i]] for i in (1, 2, 3)])
    module.tag = rd.name("slice")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QSlice, name: str, ins):
    xi, xshape, _, xq = ins[0]
    yshape = (1, *m.out_shape([xshape]))
    c, h, w = m.bounds
    begin, end, strides = ([0, h[i], w[i], c[i]] for i in range(3))
    end[0] = strides[0] = 1
    idx = [
        wr.tensor(f"{name}/{n}", (4,), "int32", data=np.asarray(v, np.int32))
        for n, v in (("begin", begin), ("end", end), ("strides", strides))
    ]
    out = wr.tensor(name, wr.shape(yshape, 4), scale=xq[0], zero=xq[1])
    wr.op(
        "STRIDED_SLICE",
        (xi, *idx),
        (out,),
        begin_mask=0,
        end_mask=0,
        ellipsis_mask=0,
        new_axis_mask=0,
        shrink_axis_mask=0,
        offset=False,
    )
    return out, yshape, 4, xq


def _c_fill(cs, op, m: QSlice, in_ids, in_shape) -> None:
    """STRIDED_SLICE's fields of an ``ft_op``: the start and step of channels, rows and columns (the output's
    shape gives the stops)."""
    op.kind = CKind.SLICE
    (op.begin_c, _, op.step_c), (op.begin_h, _, op.step_h), (op.begin_w, _, op.step_w) = m.bounds


KIND = register(
    OpKind(
        "slice",
        QSlice,
        ("STRIDED_SLICE",),
        read=_read,
        write=_write,
        describe=lambda m: {"bounds": [list(b) for b in m.bounds]},
        build=lambda d, where: QSlice(d["bounds"]),
        index_inputs={"STRIDED_SLICE": (1, 2, 3)},
        c_kind=CKind.SLICE,
        c_fill=_c_fill,
    )
)
