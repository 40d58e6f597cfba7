"""``.tflite`` <-> fedtiny's int8 graph: import any model of the supported ops, export any QModel.

Import maps each operator to one op of :class:`~fedtiny.int8.graph.QModel` (NHWC weights to
NCHW, SAME padding to explicit padding, a PAD feeding a VALID convolution into that
convolution's padding). The last weighted op is the head (``classifier``); the ops after it
(a reshape, a softmax) run only in the deployed graph. Export writes the same graph back,
with the scales TFLM expects (a per-tensor FC's bias scale is ``float32(s_x * s_w)``), a PAD
before a convolution whose padding is neither SAME nor VALID (the symmetric padding of a
PyTorch-trained stride-2 convolution), and every constant aligned for TFLM.

Images in ``[0, 1]`` fill the int8 input range (``q = round(255 x) - 128`` for the usual
uint8-minus-128 inputs), which :class:`QModel`'s ``input_mean``/``input_std`` express.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.graph import QModel, QReshape, to_nchw_shape
from fedtiny.int8.resolver import kind_for_tflite, kind_of
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, check_supported, read_tflite, write_tflite

__all__ = ["from_tflite", "to_tflite", "read_tflite_model", "export_tflite"]

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


class Reader:
    """What an op kind's ``read`` sees of the graph being imported: tensors, their fedtiny names and
    quantization, fresh op names, and SAME padding as explicit padding (a folded PAD's included)."""

    def __init__(self, g: TFLiteGraph, where: str, names: dict[int, str], head_k: int) -> None:
        self.g, self.where, self.names, self.head_k = g, where, names, head_k
        self.pads: dict[int, tuple[int, int, int, int]] = {}  # PAD outputs folded into the convolution reading them
        self.ops: list[tuple[nn.Module, tuple[str, ...]]] = []
        self._counts: dict[str, int] = {}
        self.input: int | None = None  # the int8 tensor a folded QUANTIZE made of the float input
        self.output_float = False

    def tensor(self, i: int) -> TensorDesc:
        return self.g.tensors[i]

    def q(self, i: int) -> tuple[float, int]:
        """Scale and zero point of tensor ``i`` (per tensor)."""
        t = self.g.tensors[i]
        return float(t.scales[0]), int(t.zeros[0])

    def label(self, k: int, op: OpDesc) -> str:
        return f"{self.where}: operator {k} ({op.op})"

    def name(self, prefix: str) -> str:
        """A fresh op name: ``conv0``, ``conv1``, ..."""
        self._counts[prefix] = self._counts.get(prefix, 0) + 1
        return f"{prefix}{self._counts[prefix] - 1}"

    @staticmethod
    def hw(t: TensorDesc) -> tuple[int, int]:
        return (int(t.shape[1]), int(t.shape[2])) if len(t.shape) == 4 else (1, 1)

    def padding(self, op: OpDesc, in_t: TensorDesc, k: tuple[int, int]) -> tuple[int, int, int, int]:
        """The op's padding (top, bottom, left, right): a folded PAD's, SAME's, or none."""
        folded = self.pads.get(op.inputs[0])
        if folded is not None:
            return folded
        if op.options.get("padding", "VALID") == "VALID":
            return (0, 0, 0, 0)
        h, w = self.hw(in_t)
        return kernels.same_padding(
            h, w, int(k[0]), int(k[1]), int(op.options.get("stride_h", 1)), int(op.options.get("stride_w", 1))
        )[0]

    @staticmethod
    def stride(op: OpDesc, where: str) -> int:
        sh, sw = int(op.options.get("stride_h", 1)), int(op.options.get("stride_w", 1))
        if sh != sw:
            raise ModelFileError(f"{where}: {op.op} has stride {sh}x{sw}; fedtiny supports equal strides only")
        return sh

    def flatten(self, src: str, width: int) -> str:
        """Add a reshape of ``src`` to ``[N, width]`` before the op being read; its name."""
        flat = QReshape((width,))
        flat.tag = self.name("reshape")
        self.ops.append((flat, (src,)))
        return flat.tag


def _fold_pad(rd: Reader, k: int, op: OpDesc) -> bool:
    """A spatial PAD feeding one VALID convolution becomes that convolution's padding."""
    p = np.asarray(rd.tensor(op.inputs[1]).data, np.int64).reshape(-1, 2)
    nxt = [o for o in rd.g.ops if op.outputs[0] in o.inputs]
    if (
        len(p) != 4
        or p[0].any()
        or p[3].any()
        or len(nxt) != 1
        or nxt[0].op not in _WEIGHTED[:2]
        or nxt[0].options.get("padding") != "VALID"
        or rd.q(op.inputs[0]) != rd.q(op.outputs[0])
    ):
        raise ModelFileError(f"{rd.label(k, op)}: only a spatial PAD feeding one VALID convolution is supported")
    rd.pads[op.outputs[0]] = (int(p[1, 0]), int(p[1, 1]), int(p[2, 0]), int(p[2, 1]))
    rd.names[op.outputs[0]] = rd.names[op.inputs[0]]
    return True


def _fold_input_quantize(rd: Reader, k: int, op: OpDesc) -> bool:
    """A QUANTIZE of the float graph input is the model's input quantization (TFLM's rounding)."""
    if op.inputs[0] not in rd.g.inputs or rd.tensor(op.inputs[0]).dtype != "float32":
        return False  # a requantize between int8 tensors: an op of its own
    if rd.input is not None and rd.input != op.outputs[0]:
        raise ModelFileError(f"{rd.label(k, op)}: the float input is quantized twice")
    rd.input = op.outputs[0]
    rd.names[op.outputs[0]] = "input"
    return True


def _fold_output_dequantize(rd: Reader, k: int, op: OpDesc) -> bool:
    """A DEQUANTIZE of the graph's output: fedtiny's float logits are the int8 ones dequantized already."""
    rd.names[op.outputs[0]] = rd.names[op.inputs[0]]
    rd.output_float = True
    return True


# Operators that become no op of their own (when their handler says so): they fold into their neighbours.
FOLDED = {"PAD": _fold_pad, "QUANTIZE": _fold_input_quantize, "DEQUANTIZE": _fold_output_dequantize}


def from_tflite(g: TFLiteGraph, where: str = "model", names: dict[int, str] | None = None) -> QModel:
    """The :class:`QModel` of a ``.tflite`` graph (checked with :func:`check_supported` first).

    Each operator is read by its registered kind (:func:`fedtiny.int8.ops.kind_for_tflite`).
    ``names``, when given, is filled with the fedtiny tensor name of each TFLite tensor index
    that an op writes (the tests compare every tensor with TFLM's).
    """
    check_supported(g, where)
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise ModelFileError(
            f"{where}: fedtiny runs models with one input and one output "
            f"(this one has {len(g.inputs)} and {len(g.outputs)})"
        )
    names = {} if names is None else names
    names[g.inputs[0]] = "input"
    weighted = [k for k, op in enumerate(g.ops) if op.op in _WEIGHTED]
    if not weighted:
        raise ModelFileError(f"{where}: no CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op to train")
    rd = Reader(g, where, names, weighted[-1])
    for k, op in enumerate(g.ops):
        if op.op in FOLDED and FOLDED[op.op](rd, k, op):
            continue
        kind = kind_for_tflite(op.op)
        if kind is None or kind.read is None:  # check_supported let it through: a bug
            raise AssertionError(op.op)
        module, inputs = kind.read(rd, k, op)
        rd.ops.append((module, inputs))
        names[op.outputs[0]] = module.tag
    inp = g.tensors[g.inputs[0]]
    if rd.input is not None:  # a float input: images in [0, 1] are what the model's QUANTIZE reads
        model = QModel(rd.ops, *rd.q(rd.input), 0.0, 1.0, input_shape=to_nchw_shape(inp.shape)[1:])
    else:
        scale, zero = rd.q(g.inputs[0])
        std = 1.0 / (255.0 * scale)  # images in [0, 1] fill the int8 range: q = round(255 x) - 128
        mean = (zero + 128) / 255.0
        model = QModel(rd.ops, scale, zero, mean, std, input_shape=to_nchw_shape(inp.shape)[1:])
    model.float_input, model.float_output = rd.input is not None, rd.output_float
    return model


def read_tflite_model(path: str | Path) -> QModel:
    """Read a ``.tflite`` file into a :class:`QModel` (one line naming what fedtiny cannot run)."""
    return from_tflite(read_tflite(path), str(path))


# ---------------------------------------------------------------- export


class Writer:
    """Collects tensors and operators of the graph being exported (what an op kind's ``write`` sees)."""

    def __init__(self) -> None:
        self.tensors: list[TensorDesc] = []
        self.ops: list[OpDesc] = []

    def tensor(
        self,
        name: str,
        shape,
        dtype: str = "int8",
        scale=None,
        zero=None,
        qdim: int = 0,
        data: np.ndarray | None = None,
    ) -> int:
        scales = None if scale is None else np.atleast_1d(np.asarray(scale, np.float32))
        zeros = (
            None
            if scale is None
            else (np.zeros(scales.size, np.int64) if zero is None else np.atleast_1d(np.asarray(zero, np.int64)))
        )
        self.tensors.append(TensorDesc(name, tuple(int(v) for v in shape), dtype, scales, zeros, qdim, data))
        return len(self.tensors) - 1

    def op(self, name: str, inputs: tuple[int, ...], outputs: tuple[int, ...], **options) -> None:
        self.ops.append(OpDesc(name, inputs, outputs, options))

    @staticmethod
    def shape(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """A fedtiny NCHW shape as TFLite's (NHWC, or ``[N, C]`` for rank 2)."""
        n, c, h, w = shape
        return (n, c) if rank == 2 else (n, h, w, c)

    @staticmethod
    def pad_mode(pad: tuple[int, int, int, int], hw, kernel, stride) -> str | None:
        """``VALID``, ``SAME`` or ``None`` (neither) for explicit padding."""
        if not any(pad):
            return "VALID"
        if tuple(pad) == kernels.same_padding(int(hw[0]), int(hw[1]), kernel[0], kernel[1], stride, stride)[0]:
            return "SAME"
        return None


def to_tflite(model: QModel, description: str = "fedtiny") -> TFLiteGraph:
    """The deployed graph of ``model`` as a ``.tflite`` description (batch 1).

    Each op is written by its kind; a written tensor is ``(index, NCHW shape, TFLite rank, (scale, zero))``.
    """
    if model.input_shape is None:
        raise ModelFileError("export: the model does not record its input shape (C, H, W)")
    wr = Writer()
    scale, zero, mean, std = (float(v) for v in model.input_params)
    first = model.op(next(n.op for n in model.nodes if "input" in n.inputs))
    in_rank = 2 if getattr(first, "kind", None) == "fc" and model.input_shape[1:] == (1, 1) else 4
    shape = (1, *model.input_shape)
    if model.float_input:  # the float input and TFLM's QUANTIZE of it
        fi = wr.tensor("input/float", wr.shape(shape, in_rank), "float32")
        qi = wr.tensor("input", wr.shape(shape, in_rank), scale=scale, zero=zero)
        wr.op("QUANTIZE", (fi,), (qi,))
        graph_input = fi
    else:
        qi = graph_input = wr.tensor("input", wr.shape(shape, in_rank), scale=scale, zero=zero)
    tensors = {"input": (qi, shape, in_rank, (scale, zero))}
    for node in model.nodes:
        m = model.op(node.op)
        kind = kind_of(m)
        if kind.write is None:
            raise ModelFileError(f"export: op {node.op} ({kind.name}) has no TFLite form")
        tensors[node.op] = kind.write(wr, m, node.op, [tensors[t] for t in node.inputs])
    last, lshape, lrank, _ = tensors[model.nodes[-1].op]
    if model.float_output:
        out = wr.tensor(f"{model.nodes[-1].op}/float", wr.shape(lshape, lrank), "float32")
        wr.op("DEQUANTIZE", (last,), (out,))
        last = out
    return TFLiteGraph(wr.tensors, wr.ops, (graph_input,), (last,), description)


def export_tflite(model: QModel, path: str | Path, description: str = "fedtiny") -> Path:
    """Write ``model`` as a ``.tflite`` file TFLM runs unchanged."""
    path = Path(path)
    path.write_bytes(write_tflite(to_tflite(model, description)))
    return path
