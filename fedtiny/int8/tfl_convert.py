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
import torch
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.graph import (FloatHead, QAdd, QAvgPool, QConv, QModel, QReshape, QSoftmax, to_nchw_shape)
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, check_supported, read_tflite, write_tflite

__all__ = ["from_tflite", "to_tflite", "read_tflite_model", "export_tflite"]

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _q(t: TensorDesc) -> tuple[float, int]:
    return float(t.scales[0]), int(t.zeros[0])


def _hw(t: TensorDesc) -> tuple[int, int]:
    return (int(t.shape[1]), int(t.shape[2])) if len(t.shape) == 4 else (1, 1)


def _padding(op: OpDesc, in_t: TensorDesc, k: tuple[int, int]) -> tuple[int, int, int, int]:
    if op.options.get("padding", "VALID") == "VALID":
        return (0, 0, 0, 0)
    h, w = _hw(in_t)
    return kernels.same_padding(h, w, k[0], k[1], int(op.options.get("stride_h", 1)),
                                int(op.options.get("stride_w", 1)))[0]


def _stride(op: OpDesc, where: str) -> int:
    sh, sw = int(op.options.get("stride_h", 1)), int(op.options.get("stride_w", 1))
    if sh != sw:
        raise ModelFileError(f"{where}: {op.op} has stride {sh}x{sw}; fedtiny supports equal strides only")
    return sh


def _bias(g: TFLiteGraph, op: OpDesc, n: int) -> np.ndarray:
    i = op.inputs[2] if len(op.inputs) > 2 else -1
    return np.zeros(n, np.int32) if i < 0 else np.asarray(g.tensors[i].data, np.int32).reshape(n)


def _scales(t: TensorDesc, n: int) -> np.ndarray:
    s = np.asarray(t.scales, np.float32)
    return np.full(n, s[0], np.float32) if s.size == 1 else s.reshape(n)


def from_tflite(g: TFLiteGraph, where: str = "model", names: dict[int, str] | None = None) -> QModel:
    """The :class:`QModel` of a ``.tflite`` graph (checked with :func:`check_supported` first).

    ``names``, when given, is filled with the fedtiny tensor name of each TFLite tensor index
    that an op writes (the tests compare every tensor with TFLM's).
    """
    check_supported(g, where)
    if len(g.inputs) != 1 or len(g.outputs) != 1:
        raise ModelFileError(f"{where}: fedtiny runs models with one input and one output "
                             f"(this one has {len(g.inputs)} and {len(g.outputs)})")
    names = {} if names is None else names
    names[g.inputs[0]] = "input"
    counts: dict[str, int] = {}
    weighted = [k for k, op in enumerate(g.ops) if op.op in _WEIGHTED]
    if not weighted:
        raise ModelFileError(f"{where}: no CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op to train")
    head_k = weighted[-1]
    pads: dict[int, tuple[int, int, int, int]] = {}  # PAD outputs folded into the convolution reading them
    readers: dict[int, int] = {}
    for op in g.ops:
        for i in op.inputs[:1]:
            readers[i] = readers.get(i, 0) + 1
    ops: list[tuple[nn.Module, tuple[str, ...]]] = []

    def name(prefix: str) -> str:
        counts[prefix] = counts.get(prefix, 0) + 1
        return f"{prefix}{counts[prefix] - 1}"

    for k, op in enumerate(g.ops):
        label = f"{where}: operator {k} ({op.op})"
        x = g.tensors[op.inputs[0]]
        y = g.tensors[op.outputs[0]]
        src = op.inputs[0]
        if op.op == "PAD":
            p = np.asarray(g.tensors[op.inputs[1]].data, np.int64).reshape(-1, 2)
            nxt = [o for o in g.ops if op.outputs[0] in o.inputs]
            if (len(p) != 4 or p[0].any() or p[3].any() or len(nxt) != 1 or nxt[0].op not in _WEIGHTED[:2]
                    or nxt[0].options.get("padding") != "VALID" or _q(x) != _q(y)):
                raise ModelFileError(f"{label}: only a spatial PAD feeding one VALID convolution is supported")
            pads[op.outputs[0]] = (int(p[1, 0]), int(p[1, 1]), int(p[2, 0]), int(p[2, 1]))
            names[op.outputs[0]] = names[src]
            continue
        inputs = (names[src],)
        module: nn.Module
        if op.op in _WEIGHTED:
            wt = g.tensors[op.inputs[1]]
            w = np.asarray(wt.data, np.int8)
            act = op.options.get("fused_activation", "NONE")
            if op.op == "FULLY_CONNECTED":
                if op.options.get("keep_num_dims"):
                    raise ModelFileError(f"{label}: keep_num_dims is not supported")
                o = w.shape[0]
                if len(x.shape) == 4 and _hw(x) != (1, 1):
                    flat = QReshape((int(np.prod(x.shape[1:])),))
                    flat.tag = name("reshape")
                    ops.append((flat, inputs))
                    inputs = (flat.tag,)
                weight, kind, stride, padding, groups = w.reshape(o, -1, 1, 1), "fc", 1, (0, 0, 0, 0), 1
            elif op.op == "CONV_2D":
                o = w.shape[0]
                weight, kind, groups = w.transpose(0, 3, 1, 2), "conv", 1
                stride = _stride(op, label)
                padding = pads.get(src) or _padding(op, x, w.shape[1:3])
            else:
                o = w.shape[3]
                c_in = x.shape[3]
                if c_in < 1 or o % c_in:
                    raise ModelFileError(f"{label}: {o} output channels are not a multiple of the {c_in} input "
                                         "channels")
                # a depth multiplier m above 1 is a convolution of c_in groups of m outputs each (output
                # c * m + j reads input c, as TFLite orders them); kind from the groups
                weight, groups = w.transpose(3, 0, 1, 2), c_in
                kind = "depthwise" if o == c_in else None
                stride = _stride(op, label)
                padding = pads.get(src) or _padding(op, x, w.shape[1:3])
            (xs, xz), (ys, yz) = _q(x), _q(y)
            module = QConv(torch.from_numpy(weight.astype(np.float32)),
                           torch.from_numpy(_bias(g, op, o).astype(np.float64)),
                           torch.from_numpy(_scales(wt, o)), xs, xz, ys, yz, stride, groups,
                           padding=padding, activation=act, kind=kind)
            module.tag = "classifier" if k == head_k else name("conv")
        elif op.op == "ADD":
            b = g.tensors[op.inputs[1]]
            if tuple(x.shape) != tuple(b.shape):
                raise ModelFileError(f"{label}: broadcasting adds are not supported ({x.shape} + {b.shape})")
            module = QAdd(*_q(x), *_q(b), *_q(y), activation=op.options.get("fused_activation", "NONE"))
            module.tag = name("add")
            inputs = (names[src], names[op.inputs[1]])
        elif op.op == "AVERAGE_POOL_2D":
            if op.options.get("fused_activation", "NONE") != "NONE" or _q(x) != _q(y):
                raise ModelFileError(f"{label}: a pool must keep its input's quantization and have no activation")
            kernel = (int(op.options["filter_h"]), int(op.options["filter_w"]))
            padding = _padding(op, x, kernel)
            # A window over the whole input is the global pool, whatever its stride.
            whole = kernel == _hw(x) and not any(padding)
            module = QAvgPool(kernel, 1 if whole else _stride(op, label), padding)
            module.tag = name("pool")
        elif op.op in ("RESHAPE", "SQUEEZE"):  # the same bytes in a new shape: the output tensor's
            module = QReshape(tuple(int(v) for v in y.shape[1:]))
            to_nchw_shape(y.shape)  # refuses ranks fedtiny cannot hold
            module.tag = name("reshape")
        elif op.op == "SOFTMAX":
            module = QSoftmax(_q(x)[0], float(op.options.get("beta", 1.0)), *_q(y))
            module.tag = name("softmax")
        else:  # check_supported let it through: a bug
            raise AssertionError(op.op)
        ops.append((module, inputs))
        names[op.outputs[0]] = module.tag
    inp = g.tensors[g.inputs[0]]
    scale, zero = _q(inp)
    std = 1.0 / (255.0 * scale)  # images in [0, 1] fill the int8 range: q = round(255 x) - 128
    mean = (zero + 128) / 255.0
    return QModel(ops, scale, zero, mean, std, input_shape=to_nchw_shape(inp.shape)[1:])


def read_tflite_model(path: str | Path) -> QModel:
    """Read a ``.tflite`` file into a :class:`QModel` (one line naming what fedtiny cannot run)."""
    return from_tflite(read_tflite(path), str(path))


# ---------------------------------------------------------------- export

class _Writer:
    """Collects tensors and operators of the graph being exported."""

    def __init__(self) -> None:
        self.tensors: list[TensorDesc] = []
        self.ops: list[OpDesc] = []

    def tensor(self, name: str, shape, dtype: str = "int8", scale=None, zero=None, qdim: int = 0,
               data: np.ndarray | None = None) -> int:
        scales = None if scale is None else np.atleast_1d(np.asarray(scale, np.float32))
        zeros = None if scale is None else (np.zeros(scales.size, np.int64) if zero is None
                                            else np.atleast_1d(np.asarray(zero, np.int64)))
        self.tensors.append(TensorDesc(name, tuple(int(v) for v in shape), dtype, scales, zeros, qdim, data))
        return len(self.tensors) - 1

    def op(self, name: str, inputs: tuple[int, ...], outputs: tuple[int, ...], **options) -> None:
        self.ops.append(OpDesc(name, inputs, outputs, options))


def _tfl_shape(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """A fedtiny NCHW shape as TFLite's (NHWC, or ``[N, C]`` for rank 2)."""
    n, c, h, w = shape
    return (n, c) if rank == 2 else (n, h, w, c)


def to_tflite(model: QModel, description: str = "fedtiny") -> TFLiteGraph:
    """The deployed graph of ``model`` as a ``.tflite`` description (batch 1)."""
    if model.input_shape is None:
        raise ModelFileError("export: the model does not record its input shape (C, H, W)")
    wr = _Writer()
    scale, zero, mean, std = (float(v) for v in model.input_params)
    first = model.op(next(n.op for n in model.nodes if "input" in n.inputs))
    in_rank = 2 if isinstance(first, QConv) and first.kind == "fc" and model.input_shape[1:] == (1, 1) else 4
    shape = (1, *model.input_shape)
    tensors = {"input": (wr.tensor("input", _tfl_shape(shape, in_rank), scale=scale, zero=zero), shape, in_rank,
                         (scale, zero))}
    for node in model.nodes:
        m = model.op(node.op)
        ins = [tensors[t] for t in node.inputs]
        xi, xshape, xrank, xq = ins[0]
        if isinstance(m, FloatHead):
            raise ModelFileError("export: an fp32 classifier cannot run in TFLM's int8 graph; "
                                 "use model.classifier_precision = int8")
        if isinstance(m, QConv):
            xi, out = _export_conv(wr, m, node.op, xi, xshape, xrank)
            tensors[node.op] = (out, (1, m.out_channels, *m.out_hw(xshape[2:])), 2 if m.kind == "fc" else 4,
                                (m.y_scale, m.y_zero))
        elif isinstance(m, QAdd):
            yshape = xshape
            out = wr.tensor(node.op, _tfl_shape(yshape, xrank), scale=m.y_scale, zero=m.y_zero)
            wr.op("ADD", (xi, ins[1][0]), (out,), fused_activation=m.activation)
            tensors[node.op] = (out, yshape, xrank, (m.y_scale, m.y_zero))
        elif isinstance(m, QAvgPool):
            kernel, pad = m.window(xshape)
            stride = m.stride_for(xshape)
            yshape = (1, xshape[1], *m.out_hw(xshape[2:]))
            mode = _pad_mode(pad, xshape[2:], kernel, stride)
            if mode is None:
                raise ModelFileError(f"export: {node.op}: padding {pad} is neither SAME nor VALID")
            out = wr.tensor(node.op, _tfl_shape(yshape, 4), scale=xq[0], zero=xq[1])
            wr.op("AVERAGE_POOL_2D", (xi,), (out,), padding=mode, stride_h=stride, stride_w=stride,
                  filter_h=kernel[0], filter_w=kernel[1], fused_activation="NONE")
            tensors[node.op] = (out, yshape, 4, xq)
        elif isinstance(m, QReshape):
            y = m(torch.zeros(xshape))
            rank = len(m.shape) + 1 if _numel(m.shape) == _numel(xshape[1:]) else 2
            target = (1, *m.shape) if rank == len(m.shape) + 1 else (1, _numel(xshape[1:]))
            shp = wr.tensor(f"{node.op}/shape", (len(target),), "int32", data=np.asarray(target, np.int32))
            out = wr.tensor(node.op, target, scale=xq[0], zero=xq[1])
            wr.op("RESHAPE", (xi, shp), (out,), new_shape=tuple(target))
            tensors[node.op] = (out, tuple(y.shape), rank, xq)
        elif isinstance(m, QSoftmax):
            out = wr.tensor(node.op, _tfl_shape(xshape, xrank), scale=m.y_scale, zero=m.y_zero)
            wr.op("SOFTMAX", (xi,), (out,), beta=m.beta)
            tensors[node.op] = (out, xshape, xrank, (m.y_scale, m.y_zero))
        else:
            raise ModelFileError(f"export: op {node.op} ({type(m).__name__}) has no TFLite form")
    last = tensors[model.nodes[-1].op][0]
    return TFLiteGraph(wr.tensors, wr.ops, (tensors["input"][0],), (last,), description)


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _pad_mode(pad: tuple[int, int, int, int], hw, kernel, stride) -> str | None:
    if not any(pad):
        return "VALID"
    if tuple(pad) == kernels.same_padding(int(hw[0]), int(hw[1]), kernel[0], kernel[1], stride, stride)[0]:
        return "SAME"
    return None


def _export_conv(wr: _Writer, m: QConv, name: str, xi: int, xshape, xrank) -> tuple[int, int]:
    """A QConv as CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED, with a PAD first when it needs one."""
    w = m.weight.detach().numpy().astype(np.int8)
    b = m.bias.detach().numpy()
    b = np.clip(np.round(b.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
    ws = m.w_scales.numpy().astype(np.float32)
    xs = np.float32(m.x_scale)
    oshape = (1, m.out_channels, *m.out_hw(xshape[2:]))
    if m.kind == "fc":
        s = ws[:1]
        wi = wr.tensor(f"{name}/weight", w.shape[:2], scale=s, data=w.reshape(w.shape[:2]))
        bi = wr.tensor(f"{name}/bias", b.shape, "int32", scale=np.float32(xs * s[0]), data=b)
        out = wr.tensor(name, (1, m.out_channels), scale=m.y_scale, zero=m.y_zero)
        wr.op("FULLY_CONNECTED", (xi, wi, bi), (out,), fused_activation=m.activation, weights_format="DEFAULT",
              keep_num_dims=False)
        return xi, out
    kh, kw = m.kernel_hw
    mode = _pad_mode(m.padding, xshape[2:], (kh, kw), m.stride)
    if mode is None:  # e.g. PyTorch's symmetric padding of a stride-2 conv on an even input
        pt, pb, pl, pr = m.padding
        pshape = (xshape[0], xshape[1], xshape[2] + pt + pb, xshape[3] + pl + pr)
        pads = np.asarray([[0, 0], [pt, pb], [pl, pr], [0, 0]], np.int32)
        pi = wr.tensor(f"{name}/paddings", (4, 2), "int32", data=pads)
        po = wr.tensor(f"{name}/padded", _tfl_shape(pshape, 4), scale=m.x_scale, zero=m.x_zero)
        wr.op("PAD", (xi, pi), (po,))
        xi, mode = po, "VALID"
    bscale = (ws.astype(np.float32) * xs).astype(np.float32)
    if m.depth_multiplier:  # one input channel per group: output c * m + j reads input c, TFLite's order too
        wi = wr.tensor(f"{name}/weight", (1, kh, kw, m.out_channels), scale=ws, qdim=3,
                       data=np.ascontiguousarray(w.transpose(1, 2, 3, 0)))
        bi = wr.tensor(f"{name}/bias", b.shape, "int32", scale=bscale, data=b)
        out = wr.tensor(name, _tfl_shape(oshape, 4), scale=m.y_scale, zero=m.y_zero)
        wr.op("DEPTHWISE_CONV_2D", (xi, wi, bi), (out,), padding=mode, stride_h=m.stride, stride_w=m.stride,
              depth_multiplier=m.depth_multiplier, fused_activation=m.activation, dilation_h=1, dilation_w=1)
        return xi, out
    if m.groups != 1:
        raise ModelFileError(f"export: {name}: grouped convolutions have no TFLM form")
    wi = wr.tensor(f"{name}/weight", (m.out_channels, kh, kw, m.in_channels), scale=ws, qdim=0,
                   data=np.ascontiguousarray(w.transpose(0, 2, 3, 1)))
    bi = wr.tensor(f"{name}/bias", b.shape, "int32", scale=bscale, data=b)
    out = wr.tensor(name, _tfl_shape(oshape, 4), scale=m.y_scale, zero=m.y_zero)
    wr.op("CONV_2D", (xi, wi, bi), (out,), padding=mode, stride_h=m.stride, stride_w=m.stride,
          fused_activation=m.activation, dilation_h=1, dilation_w=1)
    return xi, out


def export_tflite(model: QModel, path: str | Path, description: str = "fedtiny") -> Path:
    """Write ``model`` as a ``.tflite`` file TFLM runs unchanged."""
    path = Path(path)
    path.write_bytes(write_tflite(to_tflite(model, description)))
    return path
