"""MEAN over the spatial axes (H and W), as TFLM's reference kernel computes it (its own output quantization)."""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.kernels_misc import mean_int8, mean_params
from fedtiny.int8.ops.base import CKind
from fedtiny.int8.ops.elementwise import ParameterFreeOp
from fedtiny.int8.ops.registry import OpKind, register


class QMean(ParameterFreeOp):
    """The mean of each channel's plane: ``N x C x H x W`` -> ``N x C x 1 x 1``.

    Backward (exact step): ``g_x = (g / f32(H W)) * f32(s_x / s_y)`` in float32, the same for every
    element of the plane. ``keep_dims`` only says how the ``.tflite`` output is shaped (``[N, 1, 1, C]``
    or ``[N, C]``).
    """

    def __init__(self, x_scale: float, x_zero: int, y_scale: float, y_zero: int, keep_dims: bool = True) -> None:
        super().__init__((x_scale, x_zero, y_scale, y_zero))
        self.keep_dims = bool(keep_dims)
        self.tag = "mean"

    def out_shape(self, in_shapes):
        return (int(in_shapes[0][1]), 1, 1)

    def compute(self, xs, need):
        (x,) = xs
        n, c, h, w = x.shape
        p = mean_params(*self.q(0), *self.q(1), h * w)
        return mean_int8(x.detach().to(torch.int64), (1, 2), True, p).to(torch.float32), None

    def gradients(self, g, saved, need, shapes):
        n, c, h, w = shapes[0]
        ratio = torch.tensor(self.q(0)[0] / self.q(1)[0], dtype=torch.float32)
        per = (g / torch.tensor(float(h * w), dtype=torch.float32)) * ratio
        return (per.expand(n, c, h, w).contiguous() if need[0] else None,)


def _read(rd, k: int, op) -> tuple[QMean, tuple[str, ...]]:
    label = rd.label(k, op)
    x = rd.tensor(op.inputs[0])
    axes = sorted({int(a) % len(x.shape) for a in np.asarray(rd.tensor(op.inputs[1]).data).reshape(-1)})
    if len(x.shape) != 4 or axes != [1, 2]:
        raise ModelFileError(
            f"{label}: MEAN over axes {axes} of a rank-{len(x.shape)} tensor: fedtiny takes the "
            "mean over H and W (axes [1, 2]) of an NHWC tensor"
        )
    module = QMean(*rd.q(op.inputs[0]), *rd.q(op.outputs[0]), bool(op.options.get("keep_dims", False)))
    module.tag = rd.name("mean")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QMean, name: str, ins):
    xi, xshape, _, _ = ins[0]
    yshape = (1, xshape[1], 1, 1)
    axes = wr.tensor(f"{name}/axes", (2,), "int32", data=np.asarray([1, 2], np.int32))
    rank = 4 if m.keep_dims else 2
    out = wr.tensor(name, wr.shape(yshape, rank), scale=m.q(1)[0], zero=m.q(1)[1])
    wr.op("MEAN", (xi, axes), (out,), keep_dims=m.keep_dims)
    return out, yshape, rank, m.q(1)


def _c_fill(cs, op, m: QMean, in_ids, in_shape) -> None:
    """MEAN's fields of an ``ft_op``: the input's and output's zero points (``z1``, ``z_out``), TFLM's multiplier
    with ``1 / (H W)`` folded in (``mo``, ``so``) and the backward's ``f32(s_x / s_y)`` (``ratio_a``)."""
    p = mean_params(*m.q(0), *m.q(1), int(in_shape[2]) * int(in_shape[3]))
    op.kind = CKind.MEAN
    op.z1, op.z_out, op.mo, op.so = p.x_zero, p.y_zero, p.count_mult, p.count_shift
    op.ratio_a = float(np.float32(m.q(0)[0] / m.q(1)[0]))


KIND = register(
    OpKind(
        "mean",
        QMean,
        ("MEAN",),
        read=_read,
        write=_write,
        describe=lambda m: {"keep_dims": m.keep_dims},
        build=lambda d, where: QMean(1.0, 0, 1.0, 0, bool(d.get("keep_dims", True))),
        index_inputs={"MEAN": (1,)},
        c_kind=CKind.MEAN,
        c_fill=_c_fill,
    )
)
