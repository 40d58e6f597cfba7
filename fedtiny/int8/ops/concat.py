"""CONCATENATION of int8 tensors along one axis (TFLM copies: every input has the output's quantization)."""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.ops.base import CKind
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register

_NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}


class QConcat(ParameterFreeOp):
    """Inputs joined along NCHW ``axis`` (1: channels). Backward: the output gradient split back, unchanged."""

    def __init__(self, axis: int, scale: float, zero: int) -> None:
        super().__init__((scale, zero))
        if axis not in (1, 2, 3):
            raise ModelFileError(f"concatenation axis {axis}: fedtiny joins along channels, height or width")
        self.axis = int(axis)
        self.tag = "concat"

    def out_shape(self, in_shapes):
        shape = list(in_shapes[0][1:])
        shape[self.axis - 1] = sum(int(s[self.axis]) for s in in_shapes)
        return tuple(int(v) for v in shape)

    def compute(self, xs, need):
        return torch.cat([x.detach() for x in xs], dim=self.axis), None

    def gradients(self, g, saved, need, shapes):
        parts = torch.split(g, [int(s[self.axis]) for s in shapes], dim=self.axis)
        return tuple(p.contiguous() if n else None for p, n in zip(parts, need))


def _read(rd, k: int, op) -> tuple[QConcat, tuple[str, ...]]:
    label = rd.label(k, op)
    y = rd.q(op.outputs[0])
    for i in op.inputs:
        s, z = rd.q(i)
        if np.float32(s) != np.float32(y[0]) or z != y[1]:  # TFLM's Prepare refuses it too
            raise ModelFileError(
                f"{label}: input tensor {i} has quantization {s:g}/{z}, the output {y[0]:g}/{y[1]}: "
                "TFLM's int8 CONCATENATION needs them equal"
            )
    if op.options.get("fused_activation", "NONE") != "NONE":
        raise ModelFileError(f"{label}: TFLM's int8 CONCATENATION takes no fused activation")
    rank = len(rd.tensor(op.outputs[0]).shape)
    axis = int(op.options.get("axis", 0)) % rank
    module = QConcat(_NHWC_TO_NCHW[axis] if rank == 4 else axis, *y)
    module.tag = rd.name("concat")
    return module, tuple(rd.names[i] for i in op.inputs)


def _write(wr, m: QConcat, name: str, ins):
    rank = ins[0][2]
    yshape = (1, *m.out_shape([s for _, s, _, _ in ins]))
    axis = {v: k for k, v in _NHWC_TO_NCHW.items()}[m.axis] if rank == 4 else m.axis
    out = wr.tensor(name, wr.shape(yshape, rank), scale=m.q(0)[0], zero=m.q(0)[1])
    wr.op("CONCATENATION", tuple(i for i, *_ in ins), (out,), axis=axis, fused_activation="NONE")
    return out, yshape, rank, m.q(0)


def _c_fill(cs, op, m: QConcat, in_ids, in_shape) -> None:
    """CONCATENATION's fields of an ``ft_op``: its inputs (``in0``, ``in1``, the rest in ``in_more``; 2 to 10,
    TFLM's limit), joined along channels (the only axis the C step joins)."""
    if m.axis != 1 or not 2 <= len(in_ids) <= 10:
        raise ModelFileError(
            f"the C step does not run op {m.tag!r} (it joins 2 to 10 inputs along channels, "
            f"not {len(in_ids)} along axis {m.axis})"
        )
    op.kind = CKind.CONCAT
    op.in1, op.n_in = in_ids[1], len(in_ids)
    if len(in_ids) > 2:
        op.in_more = cs.ptr(cs.array(np.asarray(in_ids[2:], np.int32)))


KIND = register(
    OpKind(
        "concat",
        QConcat,
        ("CONCATENATION",),
        read=_read,
        write=_write,
        describe=lambda m: {"axis": m.axis},
        build=lambda d, where: QConcat(int(d["axis"]), 1.0, 0),
        c_kind=CKind.CONCAT,
        c_fill=_c_fill,
    )
)
