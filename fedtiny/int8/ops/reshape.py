"""RESHAPE / SQUEEZE: the same bytes in a new shape."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8.ops.base import Wiring, numel, to_nchw_shape
from fedtiny.int8.ops.registry import OpKind, register


class QReshape(nn.Module):
    """RESHAPE in TFLite's (NHWC, row-major) element order; ``shape`` excludes the batch.

    It writes no buffer of its own (a view of its input on the device).
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(v) for v in shape)
        self.tag = "reshape"

    def out_shape(self, in_shape: Sequence[int]) -> tuple[int, int, int]:
        """The NCHW shape (per sample) it gives an input of ``in_shape`` (per sample)."""
        per = numel(in_shape)
        target = self.shape if numel(self.shape) == per else (per,)  # a replaced head changed the width
        return to_nchw_shape((1, *target))[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        nhwc = x.permute(0, 2, 3, 1).reshape(n, -1)
        per = numel(self.shape)
        shape = self.shape if per == nhwc.shape[1] else (nhwc.shape[1],)  # a replaced head changed the width
        c, h, w = to_nchw_shape((n, *shape))[1:]
        return nhwc.reshape(n, h, w, c).permute(0, 3, 1, 2)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        return self(inputs[0])


# ---------------------------------------------------------------- the kind


def _read(rd, k: int, op) -> tuple[QReshape, tuple[str, ...]]:
    """RESHAPE or SQUEEZE: the same bytes in the output tensor's shape."""
    y = rd.tensor(op.outputs[0])
    module = QReshape(tuple(int(v) for v in y.shape[1:]))
    to_nchw_shape(y.shape)  # refuses ranks fedtiny cannot hold
    module.tag = rd.name("reshape")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QReshape, name: str, ins):
    xi, xshape, _, xq = ins[0]
    y = m(torch.zeros(xshape))
    rank = len(m.shape) + 1 if numel(m.shape) == numel(xshape[1:]) else 2
    target = (1, *m.shape) if rank == len(m.shape) + 1 else (1, numel(xshape[1:]))
    shp = wr.tensor(f"{name}/shape", (len(target),), "int32", data=np.asarray(target, np.int32))
    out = wr.tensor(name, target, scale=xq[0], zero=xq[1])
    wr.op("RESHAPE", (xi, shp), (out,), new_shape=tuple(target))
    return out, tuple(y.shape), rank, xq


def _build(d: dict, where: str) -> QReshape:
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(isinstance(v, int) and v > 0 for v in shape):
        raise ModelFileError(f"{where}: reshape shape must be positive integers, got {shape!r}")
    return QReshape(shape)


KIND = register(
    OpKind(
        "reshape",
        QReshape,
        ("RESHAPE", "SQUEEZE"),
        read=_read,
        write=_write,
        describe=lambda m: {"shape": list(m.shape)},
        build=_build,
        view=True,
        index_inputs={"RESHAPE": (1,)},
    )
)
