"""SOFTMAX over channels, int8 in, int8 out (only in the deployed graph)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fedtiny.int8 import kernels
from fedtiny.int8.ops.base import Wiring, as_int
from fedtiny.int8.ops.registry import OpKind, register


class QSoftmax(nn.Module):
    """int8 SOFTMAX over channels as TFLM's reference kernel computes it (output scale 1/256, zero -128)."""

    def __init__(self, x_scale: float, beta: float = 1.0, y_scale: float = 1 / 256, y_zero: int = -128) -> None:
        super().__init__()
        self.x_scale, self.beta, self.y_scale, self.y_zero = float(x_scale), float(beta), float(y_scale), int(y_zero)
        self.tag = "softmax"
        self.follows_input_scale = True  # its parameters derive from its input tensor's scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = as_int(x).permute(0, 2, 3, 1).reshape(-1, c)
        y = kernels.softmax_int8(flat, kernels.softmax_params(self.x_scale, self.beta), self.y_zero)
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2).to(torch.float32)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        return self(inputs[0])


# ---------------------------------------------------------------- the kind


def _read(rd, k: int, op) -> tuple[QSoftmax, tuple[str, ...]]:
    module = QSoftmax(rd.q(op.inputs[0])[0], float(op.options.get("beta", 1.0)), *rd.q(op.outputs[0]))
    module.tag = rd.name("softmax")
    return module, (rd.names[op.inputs[0]],)


def _write(wr, m: QSoftmax, name: str, ins):
    xi, xshape, xrank, _ = ins[0]
    out = wr.tensor(name, wr.shape(xshape, xrank), scale=m.y_scale, zero=m.y_zero)
    wr.op("SOFTMAX", (xi,), (out,), beta=m.beta)
    return out, xshape, xrank, (m.y_scale, m.y_zero)


KIND = register(
    OpKind(
        "softmax",
        QSoftmax,
        ("SOFTMAX",),
        read=_read,
        write=_write,
        describe=lambda m: {"x_scale": m.x_scale, "beta": m.beta, "y_scale": m.y_scale, "y_zero": m.y_zero},
        build=lambda d, where: QSoftmax(
            float(d["x_scale"]), float(d.get("beta", 1.0)), float(d.get("y_scale", 1 / 256)), int(d.get("y_zero", -128))
        ),
    )
)
