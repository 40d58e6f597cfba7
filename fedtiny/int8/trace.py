"""A float PyTorch model -> the int8 graph: trace with torch.fx, fold BatchNorm, calibrate, quantize.

:func:`trace` reads any ``nn.Module`` whose forward torch.fx can trace symbolically and
maps its layers onto the ops of :mod:`fedtiny.int8.graph`:

- ``Conv2d`` (regular, depthwise, grouped; zero padding, no dilation), with the
  ``BatchNorm2d`` that follows it folded into its weight and bias;
- ``ReLU`` / ``ReLU6`` (modules, ``F.relu``, ``torch.relu``, ``x.relu()``, ``F.relu6``,
  ``Hardtanh(0, 6)``) fused into the convolution or add that produces their input;
- ``+`` / ``torch.add`` of two tensors (a residual add);
- ``*`` / ``torch.mul`` of two tensors of one shape, or by a per-channel ``N x C x 1 x 1`` gate
  (squeeze-and-excitation), ``torch.cat`` along channels (its inputs get its quantization: TFLM's
  CONCATENATION copies), ``MaxPool2d`` / ``F.max_pool2d``, ``Sigmoid`` (LOGISTIC, output 1/256,
  -128), ``Hardswish``, ``Tanh`` (TANH, output 1/128, 0) and ``LeakyReLU``, each an op of its own;
- the global average pool (``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``,
  ``x.mean((2, 3))``);
- ``flatten`` / ``view`` / ``reshape`` of the pooled ``N x C x 1 x 1`` features to ``[N, C]``
  (no op: the graph keeps them ``N x C x 1 x 1``);
- ``Linear`` on pooled features: a 1x1 convolution; the one whose output is the model's
  output is the head, the op named ``classifier`` (a 1x1 ``Conv2d`` there is one too);
- ``Dropout`` and ``Identity``: removed (inference).

The first layer it cannot map stops the trace with one :class:`ModelFileError` line naming
it. The result is a :class:`FloatGraph`: a float network (trainable, ``forward`` returns
logits) in the int8 graph's layout, whose ops carry the names the int8 ops get
(``conv0``.. in forward order, ``add0``.., ``pool``, ``classifier``).

:func:`calibrate` records each op's output range on calibration images and :func:`quantize`
builds the :class:`~fedtiny.int8.graph.QModel`: symmetric per-output-channel int8 weights
(``max|W| / 127``), int32 biases ``round(b / (s_w s_x))``, asymmetric activations covering
``[min(lo, 0), max(hi, 0)]`` (a fused ReLU/ReLU6 is in the range: its zero point is -128),
images in [0, 1] at scale 1/255, zero point -128. A graph of the inverted-residual layout
(tiny-ir, MobileNetV2) is assembled by :func:`~fedtiny.int8.graph.from_blocks`, so its
adds are named by block (``add<block index>``), as in every published model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.int8.graph import INT8_MAX, INT8_MIN, FloatHead, QAdd, QAvgPool, QConv, QModel, from_blocks
from fedtiny.int8.ops.activations import QLeakyRelu, QTanh
from fedtiny.int8.ops.concat import QConcat
from fedtiny.int8.ops.lookup import QHardSwish, QLogistic
from fedtiny.int8.ops.maxpool import QMaxPool
from fedtiny.int8.ops.mul import QMul

__all__ = [
    "trace",
    "FloatGraph",
    "FloatConv",
    "FloatAdd",
    "FloatPool",
    "FloatLinear",
    "FloatMaxPool",
    "FloatCat",
    "FloatMul",
    "FloatUnary",
    "ActRange",
    "calibrate",
    "quantize",
    "SUPPORTED",
    "INPUT_SCALE",
    "INPUT_ZERO",
]

# Images in [0, 1] are quantized with this scale and zero point (exact for 8-bit images).
INPUT_SCALE, INPUT_ZERO = 1.0 / 255.0, -128

SUPPORTED = (
    "Conv2d, BatchNorm2d, ReLU, ReLU6, Linear, add, AdaptiveAvgPool2d(1), mean, MaxPool2d, cat, mul, "
    "Sigmoid, Hardswish, Tanh, LeakyReLU, flatten, Dropout (removed), Identity"
)


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "RELU6":
        return F.relu6(y)
    if activation == "RELU":
        return F.relu(y)
    return y


# ---------------------------------------------------------------- the float graph


class FloatConv(nn.Module):
    """A convolution with BatchNorm folded into its weight and bias, and its fused activation."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stride: int,
        groups: int,
        padding: tuple[int, int, int, int],
        activation: str = "NONE",
        layer: str = "",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.stride, self.groups, self.padding = int(stride), int(groups), tuple(int(p) for p in padding)
        self.activation, self.layer = activation, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, pb, pl, pr = self.padding
        if pt == pb and pl == pr:
            y = F.conv2d(x, self.weight, self.bias, self.stride, (pt, pl), 1, self.groups)
        else:
            y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), self.weight, self.bias, self.stride, 0, 1, self.groups)
        return _act(y, self.activation)


class FloatLinear(nn.Module):
    """A ``Linear`` on pooled ``N x C x 1 x 1`` features (output ``N x O x 1 x 1``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str = "NONE", layer: str = "") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.activation, self.layer = activation, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.flatten(1), self.weight, self.bias)
        return _act(y, self.activation).view(y.shape[0], -1, 1, 1)


class FloatAdd(nn.Module):
    """A residual add with its fused activation."""

    def __init__(self, activation: str = "NONE", layer: str = "") -> None:
        super().__init__()
        self.activation, self.layer = activation, layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _act(a + b, self.activation)


class FloatPool(nn.Module):
    """The global average pool (``N x C x 1 x 1`` out)."""

    def __init__(self, layer: str = "") -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class FloatMaxPool(nn.Module):
    """A max pool (padded taps never win)."""

    def __init__(
        self, kernel: tuple[int, int], stride: int, padding: tuple[int, int, int, int], layer: str = ""
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding, self.layer = kernel, stride, padding, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, pb, pl, pr = self.padding
        return F.max_pool2d(F.pad(x, (pl, pr, pt, pb), value=float("-inf")), self.kernel, self.stride)


class FloatCat(nn.Module):
    """Tensors joined along the channels."""

    def __init__(self, layer: str = "") -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class FloatMul(nn.Module):
    """An elementwise product (the second factor may be one value per channel: a gate)."""

    def __init__(self, activation: str = "NONE", layer: str = "") -> None:
        super().__init__()
        self.activation, self.layer = activation, layer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _act(a * b, self.activation)


class FloatUnary(nn.Module):
    """An elementwise activation of its own (``sigmoid`` or ``hardswish``)."""

    FUNCTIONS = {"sigmoid": torch.sigmoid, "hardswish": F.hardswish, "tanh": torch.tanh, "leaky_relu": F.leaky_relu}

    def __init__(self, fn: str, layer: str = "", alpha: float = 0.01) -> None:
        super().__init__()
        self.fn, self.layer, self.alpha = fn, layer, float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn == "leaky_relu":
            return F.leaky_relu(x, self.alpha)
        return self.FUNCTIONS[self.fn](x)


class FloatGraph(nn.Module):
    """A float network in the int8 graph's layout: ops in topological order, BatchNorm folded.

    Parameters
    ----------
    ops
        ``(name, module, inputs)``: a :class:`FloatConv`, :class:`FloatLinear`, :class:`FloatAdd` or
        :class:`FloatPool` named as its int8 op will be, reading ``"input"`` or earlier ops.
        The last op is the head, ``classifier``.
    input_shape
        ``(C, H, W)`` of the example the model was traced with.
    """

    def __init__(
        self, ops: Sequence[tuple[str, nn.Module, Sequence[str]]], input_shape: tuple[int, int, int] | None = None
    ) -> None:
        super().__init__()
        self.nodes: list[tuple[str, tuple[str, ...]]] = []
        for name, module, inputs in ops:
            self.add_module(name, module)
            self.nodes.append((name, tuple(inputs)))
        if not self.nodes or self.nodes[-1][0] != "classifier":
            raise ModelFileError("float graph: the last op must be the classifier")
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None

    def op(self, name: str) -> nn.Module:
        return getattr(self, name)

    def tensors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every op's output (after its activation) on images ``x``, by name."""
        env = {"input": x}
        for name, inputs in self.nodes:
            env[name] = self.op(name)(*(env[t] for t in inputs))
        return env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]``."""
        return self.tensors(x)["classifier"].flatten(1)


# ---------------------------------------------------------------- tracing


class _Unmappable(Exception):
    """A layer the int8 graph has no op for (turned into one ModelFileError line by ``trace``)."""


@dataclass
class _Op:
    kind: str  # conv, linear, add, pool, maxpool, cat, mul, sigmoid, hardswish
    inputs: tuple[int | str, ...]
    layer: str  # the source layer, for messages
    shape: tuple[int, ...]  # N x C x H x W of its output
    weight: torch.Tensor | None = None  # float64
    bias: torch.Tensor | None = None
    stride: int = 1
    groups: int = 1
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    activation: str = "NONE"
    folded: bool = False  # a BatchNorm is folded in
    kernel: tuple[int, int] = (1, 1)  # a max pool's window
    alpha: float = 0.0  # a leaky ReLU's negative slope


_SHAPE = object()  # a non-tensor value (a size, a shape) that only feeds a reshape

_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)
_ALIAS_FUNCTIONS = {torch.flatten, F.dropout, torch.dropout, F.dropout2d, torch.reshape}
_ALIAS_METHODS = {"flatten", "view", "reshape", "contiguous"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_UNARY_FUNCTIONS = {
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardswish: "hardswish",
    torch.tanh: "tanh",
    F.tanh: "tanh",
}
_UNARY_MODULES = ((nn.Sigmoid, "sigmoid"), (nn.Hardswish, "hardswish"), (nn.Tanh, "tanh"))
_RELU_FUNCTIONS = {F.relu: "RELU", torch.relu: "RELU", torch.relu_: "RELU", F.relu_: "RELU", F.relu6: "RELU6"}


def _label(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str]:
    """``(layer name, what it is)`` of an fx node, for messages."""
    if node.op == "call_module":
        return str(node.target), type(modules[node.target]).__name__
    # A function's or method's layer: the module whose forward calls it, when torch.fx recorded it.
    stack = list(node.meta.get("nn_module_stack", {}).values())
    where = f"{stack[-1][0]}:" if stack and stack[-1][0] else ""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{where}{node.name}", f"function {name}"
    if node.op == "call_method":
        return f"{where}{node.name}", f"method .{node.target}()"
    if node.op == "get_attr":
        return str(node.target), "a tensor attribute"
    return node.name, node.op


def _combine(first: str, then: str) -> str:
    """The activation of ``then`` applied after ``first``."""
    return "RELU6" if "RELU6" in (first, then) else "RELU" if "RELU" in (first, then) else "NONE"


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0, 0, 0
        # "same" (stride 1): torch puts the odd extra pixel at the bottom/right
        return (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2
    ph, pw = conv.padding
    return ph, ph, pw, pw


def _fold_bn(op: _Op, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (float64, as the device's values)."""
    if bn.running_var is None or bn.running_mean is None:
        raise _Unmappable("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    w, b = op.weight, op.bias
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(gamma)
    inv = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    op.weight = w * inv.view(-1, *([1] * (w.dim() - 1)))
    op.bias = (b - bn.running_mean.double()) * inv + beta
    op.folded = True


class _Tracer:
    """Walks an fx graph once, in order, building the float ops."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[_Op] = []
        self.value: dict[torch.fx.Node, Any] = {}  # fx node -> op index, "input" or _SHAPE
        self.root: dict[int | str, torch.fx.Node] = {}  # tensor -> the fx node that last defined it
        self.output: int | None = None

    # -- helpers

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(int(v) for v in meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_shape(self, t: int | str) -> tuple[int, ...]:
        return self.ops[t].shape if isinstance(t, int) else self.input_shape

    def tensor(self, arg: Any, what: str) -> int | str:
        if not isinstance(arg, torch.fx.Node) or arg not in self.value or self.value[arg] is _SHAPE:
            raise _Unmappable(f"its {what} is not a tensor of the graph")
        return self.value[arg]

    def readers(self, node: torch.fx.Node) -> int:
        """Ops reading ``node``'s tensor, looking through removed layers (shape queries do not count)."""
        n = 0
        for user in node.users:
            if self.is_alias(user):
                n += self.readers(user)
            elif not (user.op == "call_method" and user.target in ("size", "dim")) and not (
                user.op == "call_function" and user.target is getattr
            ):
                n += 1
        return n

    def is_alias(self, node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], _ALIAS_MODULES)
        if node.op == "call_function":
            return node.target in _ALIAS_FUNCTIONS
        return node.op == "call_method" and node.target in _ALIAS_METHODS

    def producer(self, node: torch.fx.Node, arg: Any, kinds: tuple[str, ...], what: str) -> _Op:
        """The op whose output ``node`` modifies in place of it (a folded BN, a fused activation)."""
        t = self.tensor(arg, "input")
        if not isinstance(t, int) or self.ops[t].kind not in kinds:
            raise _Unmappable(
                f"{what} must follow a {' or '.join(kinds)} (it follows "
                f"{'the input' if t == 'input' else self.ops[t].kind})"
            )
        if self.readers(self.root[t]) != 1:
            raise _Unmappable(f"{what} cannot be fused: the output of {self.ops[t].layer} is also read elsewhere")
        return self.ops[t]

    def add_op(self, node: torch.fx.Node, op: _Op) -> None:
        self.ops.append(op)
        self.value[node] = len(self.ops) - 1
        self.root[len(self.ops) - 1] = node

    def fused(self, node: torch.fx.Node, arg: Any) -> None:
        t = self.tensor(arg, "input")
        self.value[node] = t
        self.root[t] = node

    def is_pooled(self, t: int | str) -> bool:
        s = self.tensor_shape(t)
        return len(s) == 4 and s[2] == 1 and s[3] == 1

    # -- layers

    def conv(self, node: torch.fx.Node, conv: nn.Conv2d) -> None:
        t = self.tensor(node.args[0], "input")
        if tuple(conv.dilation) != (1, 1):
            raise _Unmappable(f"dilation {tuple(conv.dilation)} is not supported")
        if conv.padding_mode != "zeros":
            raise _Unmappable(f"padding_mode {conv.padding_mode!r} is not supported (zeros only)")
        if conv.stride[0] != conv.stride[1]:
            raise _Unmappable(f"stride {tuple(conv.stride)} is not supported (equal strides only)")
        w = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        self.add_op(
            node,
            _Op(
                "conv",
                (t,),
                str(node.target),
                self.shape(node),
                w,
                b,
                int(conv.stride[0]),
                int(conv.groups),
                _conv_padding(conv),
            ),
        )

    def linear(self, node: torch.fx.Node, lin: nn.Linear) -> None:
        t = self.tensor(node.args[0], "input")
        if not self.is_pooled(t):
            raise _Unmappable(
                "a Linear reads pooled N x C x 1 x 1 features only (it reads "
                f"{'x'.join(map(str, self.tensor_shape(t)))})"
            )
        w = lin.weight.detach().double()
        b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        n = self.tensor_shape(t)[0]
        self.add_op(node, _Op("linear", (t,), str(node.target), (n, w.shape[0], 1, 1), w, b))

    def add(self, node: torch.fx.Node, a: Any, b: Any) -> None:
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            raise _Unmappable("only the add of two tensors (a residual) is supported, not of a constant")
        ta, tb = self.tensor(a, "first input"), self.tensor(b, "second input")
        if self.tensor_shape(ta) != self.tensor_shape(tb):
            raise _Unmappable(
                f"adds tensors of different shapes {self.tensor_shape(ta)} and {self.tensor_shape(tb)} "
                "(no broadcasting)"
            )
        self.add_op(node, _Op("add", (ta, tb), node.name, self.tensor_shape(ta)))

    def pool(self, node: torch.fx.Node, x: Any) -> None:
        t = self.tensor(x, "input")
        s = self.tensor_shape(t)
        if len(s) != 4:
            raise _Unmappable("the average pool needs an N x C x H x W input")
        layer = str(node.target) if node.op == "call_module" else node.name
        self.add_op(node, _Op("pool", (t,), layer, (s[0], s[1], 1, 1)))

    def maxpool(self, node: torch.fx.Node, x: Any, kernel, stride, padding, dilation=1, ceil_mode=False) -> None:
        t = self.tensor(x, "input")
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        stride = kernel if stride is None or stride == [] else stride
        sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
        ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if dilation not in (1, (1, 1)) or ceil_mode or sh != sw:
            raise _Unmappable("only max pools with equal strides, no dilation and ceil_mode=False are supported")
        self.add_op(
            node,
            _Op(
                "maxpool",
                (t,),
                _label(node, self.modules)[0],
                self.shape(node),
                stride=int(sh),
                padding=(ph, ph, pw, pw),
                kernel=(int(kh), int(kw)),
            ),
        )

    def cat(self, node: torch.fx.Node, xs: Any, dim: int) -> None:
        if not isinstance(xs, (list, tuple)) or len(xs) < 2:
            raise _Unmappable("torch.cat needs a list of two or more tensors")
        ts = tuple(self.tensor(x, f"input {i}") for i, x in enumerate(xs))
        if dim % 4 != 1 or any(len(self.tensor_shape(u)) != 4 for u in ts):
            raise _Unmappable(f"torch.cat along dim {dim}: only channels (dim 1) of N x C x H x W tensors")
        self.add_op(node, _Op("cat", ts, node.name, self.shape(node)))

    def mul(self, node: torch.fx.Node, a: Any, b: Any) -> None:
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            raise _Unmappable("only the product of two tensors is supported, not with a constant")
        ta, tb = self.tensor(a, "first input"), self.tensor(b, "second input")
        sa, sb = self.tensor_shape(ta), self.tensor_shape(tb)
        if sa[2:] == (1, 1) and sb[2:] != (1, 1):  # the gate second
            ta, tb, sa, sb = tb, ta, sb, sa
        if len(sa) != 4 or not (sa == sb or (sb[:2] == sa[:2] and sb[2:] == (1, 1))):
            raise _Unmappable(f"multiplies {sa} by {sb}: equal shapes, or one value per channel, only")
        self.add_op(node, _Op("mul", (ta, tb), node.name, sa))

    def unary(self, node: torch.fx.Node, x: Any, fn: str, alpha: float = 0.0) -> None:
        t = self.tensor(x, "input")
        self.add_op(node, _Op(fn, (t,), _label(node, self.modules)[0], self.tensor_shape(t), alpha=float(alpha)))

    def activation(self, node: torch.fx.Node, x: Any, act: str) -> None:
        op = self.producer(node, x, ("conv", "linear", "add", "mul"), act.replace("RELU", "ReLU"))
        op.activation = _combine(op.activation, act)
        self.fused(node, x)

    def alias(self, node: torch.fx.Node, x: Any) -> None:
        t = self.tensor(x, "input")
        out = self.shape(node)
        if out is not None and out != self.tensor_shape(t):
            # a flatten/view/reshape: only of pooled features, to [N, C]
            s = self.tensor_shape(t)
            if not (self.is_pooled(t) and tuple(out) in ((s[0], s[1]), (s[0], s[1], 1, 1))):
                raise _Unmappable(
                    f"reshapes {'x'.join(map(str, s))} to {'x'.join(map(str, out))}; only pooled "
                    "N x C x 1 x 1 features can be flattened"
                )
        self.value[node] = t

    # -- the walk

    def run(self, example_shape: tuple[int, ...]) -> None:
        self.input_shape = tuple(example_shape)
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except _Unmappable as exc:
                layer, what = _label(node, self.modules)
                raise ModelFileError(f"layer {layer} ({what}) cannot be mapped to an int8 op: {exc}") from None

    def unsupported(self, node: torch.fx.Node) -> ModelFileError:
        layer, what = _label(node, self.modules)
        return ModelFileError(f"layer {layer} ({what}) cannot be mapped to an int8 op; supported: {SUPPORTED}")

    def visit(self, node: torch.fx.Node) -> None:
        args, kwargs = node.args, node.kwargs
        if node.op == "placeholder":
            if "input" in self.value.values():
                raise _Unmappable("the model takes more than one input")
            self.value[node] = "input"
            self.root["input"] = node
        elif node.op == "output":
            out = args[0]
            if not isinstance(out, torch.fx.Node):
                raise _Unmappable("the model must return one tensor (the logits)")
            t = self.tensor(out, "output")
            op = self.ops[t] if isinstance(t, int) else None
            if (
                op is None
                or op.kind not in ("conv", "linear")
                or op.activation != "NONE"
                or op.shape[2:] != (1, 1)
                or not self.is_pooled(op.inputs[0])
                or (op.kind == "conv" and op.weight.shape[-2:] != (1, 1))
            ):
                raise _Unmappable(
                    "the model's output must be a Linear (or 1x1 Conv2d) on pooled features, "
                    "without an activation after it: the classifier"
                )
            self.output = t
        elif node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d):
                self.conv(node, m)
            elif isinstance(m, nn.BatchNorm2d):
                op = self.producer(node, args[0], ("conv",), "BatchNorm2d")
                if op.folded or op.activation != "NONE":
                    raise _Unmappable("a BatchNorm must directly follow its convolution")
                _fold_bn(op, m)
                self.fused(node, args[0])
            elif isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
                self.activation(node, args[0], "RELU6")
            elif isinstance(m, nn.ReLU):
                self.activation(node, args[0], "RELU")
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                if m.output_size not in (1, (1, 1)):
                    raise _Unmappable(f"output size {m.output_size}: only the global pool (output size 1) is supported")
                self.pool(node, args[0])
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise _Unmappable("only Flatten(1) of pooled features is supported")
                self.alias(node, args[0])
            elif isinstance(m, _ALIAS_MODULES):
                self.alias(node, args[0])
            elif isinstance(m, nn.Linear):
                self.linear(node, m)
            elif isinstance(m, nn.MaxPool2d):
                self.maxpool(node, args[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            elif isinstance(m, nn.LeakyReLU):
                self.unary(node, args[0], "leaky_relu", m.negative_slope)
            elif any(isinstance(m, cls) for cls, _ in _UNARY_MODULES):
                self.unary(node, args[0], next(fn for cls, fn in _UNARY_MODULES if isinstance(m, cls)))
            else:
                raise self.unsupported(node)
        elif node.op == "call_function":
            f = node.target
            if f in _ADD_FUNCTIONS:
                if kwargs.get("alpha", 1) != 1 or len(args) > 2:
                    raise _Unmappable("torch.add with alpha is not supported")
                self.add(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
            elif f in _RELU_FUNCTIONS:
                self.activation(node, args[0], _RELU_FUNCTIONS[f])
            elif f in _MUL_FUNCTIONS:
                self.mul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
            elif f in _UNARY_FUNCTIONS:
                self.unary(node, args[0], _UNARY_FUNCTIONS[f])
            elif f is F.leaky_relu:
                self.unary(
                    node, args[0], "leaky_relu", args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
                )
            elif f is torch.cat or f is torch.concat:
                self.cat(node, args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
            elif f is F.max_pool2d:
                names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
                given = dict(zip(names, args[1:]), **{k: v for k, v in kwargs.items() if k in names})
                self.maxpool(
                    node,
                    args[0],
                    given["kernel_size"],
                    given.get("stride"),
                    given.get("padding", 0),
                    given.get("dilation", 1),
                    given.get("ceil_mode", False),
                )
            elif f is F.hardtanh and tuple(args[1:3]) + tuple(
                kwargs.get(k) for k in ("min_val", "max_val") if k in kwargs
            ) in ((0, 6), (0.0, 6.0)):
                self.activation(node, args[0], "RELU6")
            elif f is F.adaptive_avg_pool2d:
                size = args[1] if len(args) > 1 else kwargs.get("output_size")
                if size not in (1, (1, 1), [1, 1]):
                    raise _Unmappable(f"output size {size}: only the global pool (output size 1) is supported")
                self.pool(node, args[0])
            elif f is torch.mean:
                self.mean(node, args[1:], kwargs)
            elif f is torch.flatten:
                if (args[1] if len(args) > 1 else kwargs.get("start_dim", 0)) != 1:
                    raise _Unmappable("only flatten(x, 1) of pooled features is supported")
                self.alias(node, args[0])
            elif f in _ALIAS_FUNCTIONS:
                self.alias(node, args[0])
            elif f is getattr or (f is operator.getitem and self.value.get(args[0]) is _SHAPE):
                self.value[node] = _SHAPE
            else:
                raise self.unsupported(node)
        elif node.op == "call_method":
            name = node.target
            if name in ("relu", "relu_"):
                self.activation(node, args[0], "RELU")
            elif name in ("add", "add_"):
                if kwargs.get("alpha", 1) != 1 or len(args) > 2:
                    raise _Unmappable("add with alpha is not supported")
                self.add(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
            elif name == "mean":
                self.mean(node, args[1:], kwargs)
            elif name in ("mul", "mul_"):
                self.mul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
            elif name == "sigmoid":
                self.unary(node, args[0], "sigmoid")
            elif name in ("size", "dim"):
                self.value[node] = _SHAPE
            elif name == "flatten":
                if (args[1] if len(args) > 1 else kwargs.get("start_dim", 0)) != 1:
                    raise _Unmappable("only x.flatten(1) of pooled features is supported")
                self.alias(node, args[0])
            elif name in _ALIAS_METHODS:
                self.alias(node, args[0])
            else:
                raise self.unsupported(node)
        else:  # get_attr
            raise self.unsupported(node)

    def mean(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> None:
        dims = args[0] if args else kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        t = self.tensor(node.args[0], "input")
        rank = len(self.tensor_shape(t))
        if rank != 4 or sorted(d % 4 for d in dims if isinstance(d, int)) != [2, 3]:
            raise _Unmappable(f"mean over {dims}: only the global pool (mean over dims 2, 3) is supported")
        self.pool(node, node.args[0])


def _live(ops: list[_Op], output: int) -> list[int]:
    """Indices of the ops the output depends on (dead branches dropped), in order."""
    need, stack = set(), [output]
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        stack.extend(t for t in ops[i].inputs if isinstance(t, int))
    return sorted(need)


def trace(model: nn.Module, example: torch.Tensor) -> FloatGraph:
    """Trace ``model`` (a float ``nn.Module``) into a :class:`FloatGraph` with BatchNorm folded.

    ``example`` is an input batch (``N x C x H x W``) giving the shapes. The model is traced in
    eval mode (its training flag is restored). Raises :class:`ModelFileError` naming the first
    layer that has no int8 op.
    """
    example = torch.as_tensor(example, dtype=torch.float32)
    if example.dim() != 4:
        raise ModelFileError(f"the example input must be N x C x H x W, got shape {tuple(example.shape)}")
    was_training = model.training
    model.eval()
    try:
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 (any failure of a user's forward under torch.fx is one line)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelFileError(
                f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {first}"
            ) from None
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example[:1])
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelFileError(
                f"{type(model).__name__} fails on a {'x'.join(map(str, example.shape[1:]))} input: "
                f"{type(exc).__name__}: {first}"
            ) from None
        tracer = _Tracer(gm)
        tracer.run(tuple(example[:1].shape))
    finally:
        model.train(was_training)
    if tracer.output is None:
        raise ModelFileError(f"{type(model).__name__}: the traced graph has no output")
    return _float_graph(tracer.ops, tracer.output, tuple(int(v) for v in example.shape[1:]))


def _float_graph(ops: list[_Op], output: int, input_shape: tuple[int, int, int]) -> FloatGraph:
    live = _live(ops, output)
    names: dict[int | str, str] = {"input": "input"}
    counts = {
        "conv": 0,
        "add": 0,
        "pool": 0,
        "maxpool": 0,
        "cat": 0,
        "mul": 0,
        **dict.fromkeys(FloatUnary.FUNCTIONS, 0),
    }
    out: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    for i in live:
        op = ops[i]
        if i == output:
            name = "classifier"
        elif op.kind in ("conv", "linear"):
            name, counts["conv"] = f"conv{counts['conv']}", counts["conv"] + 1
        elif op.kind != "pool":
            name, counts[op.kind] = f"{op.kind}{counts[op.kind]}", counts[op.kind] + 1
        else:
            name = "pool" if counts["pool"] == 0 else f"pool{counts['pool']}"
            counts["pool"] += 1
        names[i] = name
        # Folded in float64, kept in float32 (the float network the device's integers come from).
        if op.kind == "conv":
            module: nn.Module = FloatConv(
                op.weight.float(), op.bias.float(), op.stride, op.groups, op.padding, op.activation, op.layer
            )
        elif op.kind == "linear":
            module = FloatLinear(op.weight.float(), op.bias.float(), op.activation, op.layer)
        elif op.kind == "add":
            module = FloatAdd(op.activation, op.layer)
        elif op.kind == "maxpool":
            module = FloatMaxPool(op.kernel, op.stride, op.padding, op.layer)
        elif op.kind == "cat":
            module = FloatCat(op.layer)
        elif op.kind == "mul":
            module = FloatMul(op.activation, op.layer)
        elif op.kind in FloatUnary.FUNCTIONS:
            module = FloatUnary(op.kind, op.layer, op.alpha)
        else:
            module = FloatPool(op.layer)
        out.append((name, module, tuple(names[t] for t in op.inputs)))
    return FloatGraph(out, input_shape)


# ---------------------------------------------------------------- calibration


@dataclass
class ActRange:
    """Observed min/max of one activation."""

    lo: float = 0.0
    hi: float = 0.0

    def update(self, t: torch.Tensor) -> None:
        self.lo, self.hi = min(self.lo, float(t.min())), max(self.hi, float(t.max()))

    def qparams(self) -> tuple[float, int]:
        """Asymmetric int8 ``(scale, zero)`` covering ``[min(lo, 0), max(hi, 0)]``."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        zero = int(np.clip(round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
        return scale, zero


@torch.no_grad()
def calibrate(graph: FloatGraph, batches: Iterable) -> dict[str, ActRange]:
    """Run calibration batches (images in [0, 1]) and record each op's output range, by op name."""
    ranges: dict[str, ActRange] = {}
    for x in batches:
        env = graph.tensors(torch.as_tensor(x, dtype=torch.float32))
        for name, _ in graph.nodes:
            ranges.setdefault(name, ActRange()).update(env[name])
    return ranges


# ---------------------------------------------------------------- quantization


def _qconv(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x_q: tuple[float, int],
    y_q: tuple[float, int],
    *,
    stride: int = 1,
    groups: int = 1,
    padding: tuple[int, int, int, int] | None = None,
    activation: str = "NONE",
) -> QConv:
    """Symmetric per-output-channel int8 weights, int32 bias at ``s_w * s_x``."""
    w = weight.detach().double()
    w_scales = (w.abs().flatten(1).max(dim=1).values / 127.0).clamp_min(1e-12)
    w_int = torch.clamp(torch.round(w / w_scales.view(-1, 1, 1, 1)), -127, 127)
    b_int = torch.round(bias.detach().double() / (w_scales * x_q[0]))
    return QConv(
        w_int.float(),
        b_int.float(),
        w_scales.float(),
        x_q[0],
        x_q[1],
        y_q[0],
        y_q[1],
        stride,
        groups,
        padding=padding,
        activation=activation,
    )


def quantize(graph: FloatGraph, ranges: dict[str, ActRange], *, classifier_precision: str = "int8") -> QModel:
    """Build the int8 graph of ``graph`` from calibrated activation ranges."""
    if classifier_precision not in ("int8", "fp32"):
        raise ScenarioError(f"model.classifier_precision: expected int8 or fp32, got {classifier_precision!r}")
    ranges = _concat_ranges(graph, ranges)
    q: dict[str, tuple[float, int]] = {"input": (INPUT_SCALE, INPUT_ZERO)}
    ops: list[tuple[nn.Module, tuple[str, ...]]] = []
    for name, inputs in graph.nodes:
        m = graph.op(name)
        x_q = q[inputs[0]]
        if isinstance(m, FloatPool):
            module: nn.Module = QAvgPool()
            q[name] = x_q
        elif isinstance(m, FloatMaxPool):
            module = QMaxPool(m.kernel, m.stride, m.padding, *x_q)
            q[name] = x_q
        elif isinstance(m, FloatCat):
            q[name] = ranges[name].qparams()
            module = QConcat(1, *q[name])
        elif isinstance(m, FloatMul):
            q[name] = ranges[name].qparams()
            module = QMul(*x_q, *q[inputs[1]], *q[name], activation=m.activation)
        elif isinstance(m, FloatUnary):
            cls, fixed = _UNARY_OPS[m.fn]
            q[name] = fixed or ranges[name].qparams()
            module = cls(*x_q, *q[name], **({"alpha": m.alpha} if m.fn == "leaky_relu" else {}))
        elif isinstance(m, FloatAdd):
            q[name] = ranges[name].qparams()
            module = QAdd(*x_q, *q[inputs[1]], *q[name], activation=m.activation)
        elif name == "classifier" and classifier_precision == "fp32":
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            module = FloatHead(w, m.bias.detach(), x_q[0], x_q[1])
        else:
            q[name] = ranges[name].qparams()
            if isinstance(m, FloatLinear):
                w = m.weight.detach().view(*m.weight.shape, 1, 1)
                module = _qconv(w, m.bias, x_q, q[name], padding=(0, 0, 0, 0), activation=m.activation)
            else:
                module = _qconv(
                    m.weight,
                    m.bias,
                    x_q,
                    q[name],
                    stride=m.stride,
                    groups=m.groups,
                    padding=m.padding,
                    activation=m.activation,
                )
        module.tag = name
        ops.append((module, inputs))
    blocks = _inverted_residual(ops)
    if blocks is not None:
        return from_blocks(*blocks, INPUT_SCALE, INPUT_ZERO, input_shape=graph.input_shape, pool=ops[-2][0])
    return QModel(ops, INPUT_SCALE, INPUT_ZERO, input_shape=graph.input_shape)


# Each elementwise activation's int8 op, and the output quantization TFLM fixes for it (None: calibrated):
# LOGISTIC writes [0, 1) in steps of 1/256, TANH (-1, 1) in steps of 1/128.
_UNARY_OPS = {
    "sigmoid": (QLogistic, (1 / 256, -128)),
    "tanh": (QTanh, (1 / 128, 0)),
    "hardswish": (QHardSwish, None),
    "leaky_relu": (QLeakyRelu, None),
}


def _concat_ranges(graph: FloatGraph, ranges: dict[str, ActRange]) -> dict[str, ActRange]:
    """Ranges where every concatenation's inputs share its range (TFLM's int8 CONCATENATION copies, so its
    inputs must have its quantization): the union of theirs, given to each producer."""
    ranges = dict(ranges)
    for name, inputs in graph.nodes:
        if not isinstance(graph.op(name), FloatCat):
            continue
        fixed = [
            t
            for t in inputs
            if t == "input"
            or isinstance(graph.op(t), (FloatPool, FloatMaxPool))
            or (isinstance(graph.op(t), FloatUnary) and _UNARY_OPS[graph.op(t).fn][1] is not None)
        ]
        if fixed:
            raise ModelFileError(
                f"{name}: torch.cat of {fixed[0]!r}, whose quantization is another op's or fixed: "
                "fedtiny concatenates outputs of convolutions, adds, products, hardswish and "
                "leaky ReLU"
            )
        union = ActRange(min(ranges[t].lo for t in (*inputs, name)), max(ranges[t].hi for t in (*inputs, name)))
        for t in (*inputs, name):
            ranges[t] = union
    return ranges


def _inverted_residual(ops: list[tuple[nn.Module, tuple[str, ...]]]):
    """``(first_conv, blocks, feature_mix, classifier)`` when ``ops`` is the layout :func:`from_blocks` builds.

    That is: a first conv on the input, blocks of (1x1 expansion?, depthwise, 1x1 projection, residual add
    of the block's input?) in a chain, a feature-mix conv?, the global pool, the classifier on it; with an
    activation after exactly the convolutions ``from_blocks`` gives one (not after projections or adds).
    """

    def conv(i: int, src: str, *, act: bool, depthwise: bool = False, pointwise: bool = False) -> QConv | None:
        if i >= len(ops):
            return None
        m, inputs = ops[i]
        ok = (
            isinstance(m, QConv)
            and inputs == (src,)
            and (m.activation != "NONE") == act
            and (not depthwise or m.is_depthwise)
            and (not pointwise or (m.kernel_hw == (1, 1) and m.groups == 1))
        )
        return m if ok else None

    if (
        len(ops) < 3
        or not isinstance(ops[-2][0], QAvgPool)
        or ops[-1][0].tag != "classifier"
        or ops[-1][1] != (ops[-2][0].tag,)
    ):
        return None
    body = len(ops) - 2
    first = conv(0, "input", act=True)
    if first is None:
        return None
    i, t, blocks, mix = 1, first.tag, [], None
    while i < body:
        if i == body - 1:  # the feature mix before the pool
            mix = conv(i, t, act=True)
            if mix is None:
                return None
            t, i = mix.tag, i + 1
            break
        block_in = t
        pw1 = conv(i, t, act=True, pointwise=True)
        if pw1 is not None and conv(i + 1, pw1.tag, act=True, depthwise=True) is not None:
            t, i = pw1.tag, i + 1
        else:
            pw1 = None
        dw = conv(i, t, act=True, depthwise=True)
        pw2 = conv(i + 1, dw.tag, act=False) if dw is not None else None
        if pw2 is None:
            return None
        t, i = pw2.tag, i + 2
        res = None
        if i < body and isinstance(ops[i][0], QAdd) and ops[i][1] == (block_in, t) and ops[i][0].activation == "NONE":
            res = ops[i][0]
            t, i = res.tag, i + 1
        blocks.append((pw1, dw, pw2, res))
    if ops[-2][1] != (t,) or not blocks:
        return None
    return first, blocks, mix, ops[-1][0]
