"""Standalone int8 activations: RELU, RELU6, LEAKY_RELU and TANH (what converters emit when they cannot fuse one).

Each is a lookup (:class:`~fedtiny.int8.ops.lookup.QLookup`): its table of 256 outputs computed once with
TFLM's arithmetic (:mod:`fedtiny.int8.kernels_act`), its exact-step backward ``g * slope[x + 128]`` with the
lookup's default slope, the table's central difference (one-sided at -128 and 127). At a kink (RELU's
output zero, RELU6's zero and six, LEAKY_RELU's input zero) that is half the sum of the two sides' steps, a
subgradient between them; elsewhere it is the table's own local slope, as for LOGISTIC and HARD_SWISH.

TFLM's quirks that these kinds keep, because the device computes them:

- RELU6 reads only its *input* quantization (``clamp(x, x_zero, q(6))`` on the int8 values): an output
  tensor quantized differently gets the input's values unchanged.
- TANH computes in 1/128 steps around 0 and checks neither the output scale nor its zero point (converters
  write 1/128 and 0); another output quantization is only how the next op reads those values.
- TFLM has no RELU_N1_TO_1 kernel (a model holding one does not load), and PRELU takes its alpha as a
  broadcast int8 tensor (one table per channel, not a lookup); neither is a kind here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels_act
from fedtiny.int8.ops.lookup import QLookup, register_lookup

__all__ = ["QRelu", "QRelu6", "QLeakyRelu", "QTanh"]


class QRelu(QLookup):
    """RELU: a requantize from the input's quantization to the output's, clamped below at the output's zero."""

    def table(self) -> torch.Tensor:
        params = kernels_act.relu_params(self.x_scale, self.x_zero, self.y_scale, self.y_zero)
        return kernels_act.table(kernels_act.relu_int8, params)


class QRelu6(QLookup):
    """RELU6: the int8 input clamped to ``[x_zero, q(6)]`` in the input's quantization (TFLM ignores the output's)."""

    def table(self) -> torch.Tensor:
        return kernels_act.table(kernels_act.relu6_int8, kernels_act.relu6_params(self.x_scale, self.x_zero))


class QTanh(QLookup):
    """TANH: output in 1/128 steps around 0, whatever the output tensor's quantization says (TFLM checks neither)."""

    def table(self) -> torch.Tensor:
        return kernels_act.table(kernels_act.tanh_int8, kernels_act.tanh_params(self.x_scale, self.x_zero))


class QLeakyRelu(QLookup):
    """LEAKY_RELU: ``x`` for ``x >= 0``, ``alpha x`` below, with TFLM's two multipliers (identity and alpha).

    ``alpha`` is the operator's option (a float32, as the ``.tflite`` file stores it); it is part of the op's
    layout, not of its state.
    """

    def __init__(self, x_scale: float, x_zero: int, y_scale: float, y_zero: int, alpha: float = 0.2) -> None:
        super().__init__(x_scale, x_zero, y_scale, y_zero)
        a = float(np.float32(alpha))
        if not math.isfinite(a):
            raise ValueError(f"leaky-relu alpha must be finite, got {alpha!r}")
        self._alpha = a

    alpha = property(lambda self: self._alpha)  # fixed once built: the cached table depends on it

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def table(self) -> torch.Tensor:
        params = kernels_act.leaky_relu_params(self.x_scale, self.x_zero, self.y_scale, self.y_zero, self.alpha)
        return kernels_act.table(kernels_act.leaky_relu_int8, params)


def _read_leaky_relu(rd, k: int, op) -> tuple[QLeakyRelu, tuple[str, ...]]:
    label = rd.label(k, op)
    alpha = op.options.get("alpha", 0.0)  # no options table: TFLM's parser leaves alpha at 0
    try:
        module = QLeakyRelu(*rd.q(op.inputs[0]), *rd.q(op.outputs[0]), alpha=float(alpha))
        module.tables()
    except (TypeError, ValueError) as exc:  # a quantization or alpha TFLM cannot run
        raise ModelFileError(f"{label}: {exc}") from None
    module.tag = rd.name("leakyrelu")
    return module, (rd.names[op.inputs[0]],)


def _write_leaky_relu(wr, m: QLeakyRelu, name: str, ins):
    xi, xshape, xrank, _ = ins[0]
    out = wr.tensor(name, wr.shape(xshape, xrank), scale=m.y_scale, zero=m.y_zero)
    wr.op("LEAKY_RELU", (xi,), (out,), alpha=m.alpha)
    return out, xshape, xrank, (m.y_scale, m.y_zero)


def _build_leaky_relu(d, where: str) -> QLeakyRelu:
    alpha = d["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ModelFileError(f"{where}: leaky-relu alpha must be a number, not {alpha!r}")
    return QLeakyRelu(1.0, 0, 1.0, 0, alpha=float(alpha))  # placeholder quantization (the model's state sets it)


RELU = register_lookup("relu", QRelu, "RELU", "relu")
RELU6 = register_lookup("relu6", QRelu6, "RELU6", "relu6_")
TANH = register_lookup("tanh", QTanh, "TANH", "tanh")
LEAKY_RELU = register_lookup(
    "leaky-relu",
    QLeakyRelu,
    "LEAKY_RELU",
    "leaky_relu",
    read=_read_leaky_relu,
    write=_write_leaky_relu,
    describe=lambda m: {"alpha": m.alpha},
    build=_build_leaky_relu,
)
