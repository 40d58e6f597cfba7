"""The int8 graph an MCU runs, emulated in PyTorch so that it can be trained.

A :class:`QModel` is a list of ops in topological order, each reading named
tensors (``"input"`` or an earlier op's name) and writing one: int8 convolutions
(regular, depthwise, and fully connected as a 1x1 convolution), residual adds,
average pools, reshapes and a softmax. The published MCUNet-style models,
tiny-ir, a ``.tflite`` file and a traced PyTorch model are all this one kind
of object (:func:`from_blocks` builds the inverted-residual layout).

Tensors hold integer values in float32 storage: weights are int8 (symmetric, one
scale per output channel), biases int32 (scale ``s_w * s_x``), activations int8
with a scale and a zero point, in NCHW layout (a TFLite ``[N, C]`` tensor is
``N x C x 1 x 1`` here). The forward is TensorFlow Lite Micro's integer
arithmetic (:mod:`fedtiny.int8.kernels`): fixed-point multipliers, its rounding,
its add and pool; the same integers on every CPU. Rounding is straight-through for
gradients, the clamp passes gradient only inside its range, so backward is what
on-device training computes.

The classifier (the op named ``classifier``, the head) is a 1x1 convolution on the
pooled features; in ``fp32`` precision it is a float linear layer on the
dequantized features instead. Ops after the head (a softmax) run only in
:meth:`QModel.int8_forward`, the deployed graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.int8.kernels_misc import quantize_float
from fedtiny.int8.ledger import NULL, OpEvents, active, fused_workspace_bytes
from fedtiny.int8.ops.add import QAdd
from fedtiny.int8.ops.base import (
    ACTIVATIONS,
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    INT32_MIN,
    Wiring,
    round_ste,
    to_nchw_shape,
)
from fedtiny.int8.ops.conv import QConv
from fedtiny.int8.ops.head import FloatHead
from fedtiny.int8.ops.pool import QAvgPool
from fedtiny.int8.ops.reshape import QReshape
from fedtiny.int8.ops.softmax import QSoftmax
from fedtiny.int8.resolver import kind_of

__all__ = [
    "round_ste",
    "QConv",
    "QAdd",
    "QAvgPool",
    "QReshape",
    "QSoftmax",
    "FloatHead",
    "QModel",
    "Node",
    "Wiring",
    "from_blocks",
    "replace_head",
    "head_weight_scales",
    "to_nchw_shape",
    "unit_scale",
    "INT8_MIN",
    "INT8_MAX",
    "INT32_MIN",
    "INT32_MAX",
    "ACTIVATIONS",
    "kind_of",
]


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Node:
    """One op of the graph: the module's name (also its output tensor and buffer tag) and what it reads."""

    op: str
    inputs: tuple[str, ...]


def fusable(pw: nn.Module, dw: nn.Module) -> bool:
    """A pointwise convolution whose output only a depthwise convolution reads can run fused with it."""
    return (
        isinstance(pw, QConv)
        and isinstance(dw, QConv)
        and pw.kind == "conv"
        and pw.kernel_hw == (1, 1)
        and pw.groups == 1
        and dw.is_depthwise
    )


def fused_events(pw: QConv, dw: QConv, in_shape: tuple[int, ...], wiring: Wiring) -> OpEvents:
    """The buffers of a pointwise expansion + depthwise run fused (one expanded channel at a time, no gradient)."""
    hw = (in_shape[2], in_shape[3])
    mid_hw = pw.out_hw(hw)
    out_hw = dw.out_hw(mid_hw)
    return OpEvents(
        dw.tag,
        in_shape[0] * dw.out_channels * out_hw[0] * out_hw[1],
        wiring.frees(),
        workspace=fused_workspace_bytes(pw.in_channels, dw.kernel_hw, mid_hw, out_hw, dw.padding),
    )


class QModel(nn.Module):
    """An int8 MCU network: a graph of ops in topological order, from the quantized input to the head.

    Parameters
    ----------
    ops
        ``(module, inputs)`` in topological order; each module's ``tag`` is its name, the name of
        the tensor it writes, and its attribute on the model (so parameters are ``conv3.weight``).
        ``inputs`` names the tensors it reads: ``"input"`` or earlier ops. One op must be
        named ``classifier`` (the head: what transfer learning replaces).
    input_scale, input_zero
        Quantization of the (normalized) input.
    input_mean, input_std
        Normalization applied to images in ``[0, 1]`` before quantization.
    input_shape
        ``(C, H, W)`` the network was built and quantized for, when known.
    """

    def __init__(
        self,
        ops: Sequence[tuple[nn.Module, Sequence[str]]],
        input_scale: float,
        input_zero: int,
        input_mean: float = 0.0,
        input_std: float = 1.0,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        # A .tflite whose input is float (a QUANTIZE first) and whose output is float (a DEQUANTIZE last):
        # the input is quantized as TFLM's QUANTIZE does it, and export writes both edges back.
        self.float_input = self.float_output = False
        self.register_buffer(
            "input_params", torch.tensor([input_scale, input_zero, input_mean, input_std], dtype=torch.float64)
        )
        known = {"input"}
        nodes = []
        for module, inputs in ops:
            name = module.tag
            if name in known or not name.isidentifier() or hasattr(nn.Module, name):
                raise ModelFileError(f"graph: op name {name!r} is repeated or not a valid name")
            twice = sorted({t for t in inputs if list(inputs).count(t) > 1})
            if twice:  # its two gradients would need one buffer each, which the memory planner does not lay out
                raise ModelFileError(
                    f"graph: op {name!r} reads {twice[0]!r} twice (as x * x or cat(x, x)); "
                    "fedtiny's ops read each tensor once"
                )
            missing = [t for t in inputs if t not in known]
            if missing:
                raise ModelFileError(f"graph: op {name!r} reads {missing[0]!r} before it is written")
            self.add_module(name, module)
            nodes.append(Node(name, tuple(inputs)))
            known.add(name)
        if "classifier" not in known:
            raise ModelFileError("graph: no op is named 'classifier' (the head)")
        self.nodes: list[Node] = nodes
        self._head = [n.op for n in nodes].index("classifier")

    # -- structure

    def op(self, name: str) -> nn.Module:
        return self._modules[name]

    def number_convs(self) -> None:
        """Number every convolution (the head included) in forward order: ``slot``, the exact step's stream index."""
        for i, conv in enumerate(m for m in (self.op(n.op) for n in self.nodes) if isinstance(m, QConv)):
            conv.slot = i

    def convs(self) -> list[QConv]:
        """Every int8 convolution (and FC) before the head, in forward order: the paper's layer indices."""
        return [m for m in (self.op(n.op) for n in self.nodes[: self._head]) if isinstance(m, QConv)]

    def buffer_of(self, tensor: str) -> str:
        """The buffer holding ``tensor``: a reshape's output is its input's buffer."""
        while tensor != "input" and kind_of(self.op(tensor)).view:
            tensor = self.nodes[[n.op for n in self.nodes].index(tensor)].inputs[0]
        return tensor

    def wiring(self, upto: int | None = None) -> list[Wiring | None]:
        """Each op's :class:`Wiring` (``None`` for reshapes) for the graph run up to op ``upto`` (the head)."""
        upto = self._head if upto is None else upto
        nodes = self.nodes[: upto + 1]
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            if kind_of(self.op(node.op)).view:
                continue
            for t in node.inputs:
                readers.setdefault(self.buffer_of(t), []).append(i)
        out: list[Wiring | None] = []
        for i, node in enumerate(nodes):
            if kind_of(self.op(node.op)).view:
                out.append(None)
                continue
            tags = tuple(self.buffer_of(t) for t in node.inputs)
            last = tuple(readers[t][-1] == i for t in tags)
            # one gradient per tensor, however many read it: its first writer in the backward (the last
            # reader) takes it, the other readers add into it, as the C step does (fedtiny_step.c)
            out.append(Wiring(tags, last, tuple(f"grad:{t}" for t in tags)))
        return out

    @property
    def head(self) -> nn.Module:
        return self.classifier

    @property
    def input_channels(self) -> int:
        """Channels of the input image."""
        if self.input_shape:
            return self.input_shape[0]
        first = next(self.op(n.op) for n in self.nodes if "input" in n.inputs)
        return first.in_channels

    # -- forward

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> int8 input (straight-through, so inputs can be attacked by gradient)."""
        scale, zero, mean, std = (float(v) for v in self.input_params)
        if self.float_input:  # TFLM's QUANTIZE: float32 division, rounded half away from zero
            v = (x - mean) / std
            q = quantize_float(v.detach().to(torch.float32), scale, zero).to(x.dtype)
            return q + (v / scale - (v / scale).detach())
        return torch.clamp(round_ste((x - mean) / std / scale) + zero, INT8_MIN, INT8_MAX)

    def _run(
        self,
        xq: torch.Tensor | None,
        upto: int,
        *,
        record: bool = True,
        start: int = 0,
        env: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run ops ``start..upto`` on the int8 input (``start`` 0), or on ``env``, the tensors ops before
        ``start`` wrote that later ops read (:meth:`boundary`); every tensor by name."""
        led = active() if record else NULL
        if start:
            if led is not NULL:
                raise RuntimeError("a run from a cached prefix cannot be recorded: the memory model counts every op")
            env = dict(env or {})
        else:
            if record:
                OpEvents("input", xq.numel()).forward(led)
            env = {"input": xq}
        wiring = self.wiring(upto) if record and led is not NULL else [None] * (upto + 1)
        i = start
        while i <= upto:
            node = self.nodes[i]
            module = self.op(node.op)
            xs = [env[t] for t in node.inputs]
            nxt = self.nodes[i + 1] if i + 1 <= upto else None
            w = wiring[i] or (None if kind_of(module).view else Wiring.single(len(xs)))
            if (
                led.fuse_frozen
                and nxt is not None
                and fusable(module, self.op(nxt.op))
                and nxt.inputs == (node.op,)
                and self._only_reader(i)
                and not xs[0].requires_grad
                and not any(p.requires_grad for m in (module, self.op(nxt.op)) for p in m.parameters())
            ):
                dw = self.op(nxt.op)
                mid = module.run(xs, quiet=True)
                env[node.op] = mid
                env[nxt.op] = dw.run([mid], quiet=True)
                fused_events(module, dw, tuple(xs[0].shape), w).forward(led)
                i += 2
                continue
            if getattr(module, "follows_input_scale", False):
                # TFLM derives a softmax's parameters from its input tensor's scale, which a new or
                # refitted head (transfer learning, a checkpoint) sets: the softmax follows it
                module.x_scale = self._output_scale(node.inputs[0], module.x_scale)
            env[node.op] = module.run(xs, w, quiet=not record)
            i += 1
        return env

    def _output_scale(self, tensor: str, default: float) -> float:
        """The int8 scale of ``tensor`` as its producer writes it (through reshapes); ``default`` if unknown."""
        while tensor != "input":
            op = self.op(tensor)
            if not kind_of(op).view:
                return float(op.y_scale) if hasattr(op, "y_scale") else default
            tensor = next(n.inputs[0] for n in self.nodes if n.op == tensor)
        return default

    def _only_reader(self, i: int) -> bool:
        """Op ``i + 1`` is the only reader of op ``i``'s output."""
        name = self.nodes[i].op
        return sum(name in n.inputs for n in self.nodes) == 1

    def head_input_name(self) -> str:
        return self.nodes[self._head].inputs[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """int8 input of the head (``N x C x 1 x 1`` pooled features) of images in [0, 1]."""
        upto = self._head - 1
        env = self._run(self.quantize_input(x), upto)
        return env[self.head_input_name()]

    def int8_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's int8 output (only for an int8 classifier)."""
        if not isinstance(self.classifier, QConv):
            raise TypeError("the classifier is fp32; use forward() for float logits")
        return self._run(self.quantize_input(x), self._head)["classifier"].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: dequantized int8 logits, or the fp32 head's output."""
        return self._logits(self._run(self.quantize_input(x), self._head)["classifier"])

    def forward_from(self, start: int, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` from op ``start`` on: ``tensors`` are the :meth:`boundary` tensors of ``start``
        (what ops ``0..start-1`` wrote for the batch). The same logits, bit for bit, when they are."""
        return self._logits(self._run(None, self._head, start=start, env=tensors)["classifier"])

    def _logits(self, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.classifier, QConv):
            return (y.flatten(1) - self.classifier.y_zero) * self.classifier.y_scale
        return y

    # -- the frozen prefix (what a sparse update does not change)

    def first_trained_op(self) -> int:
        """Index of the first op (up to the head) with a trained parameter; the head's index when none is."""
        for i, node in enumerate(self.nodes[: self._head + 1]):
            if any(p.requires_grad for p in self.op(node.op).parameters()):
                return i
        return self._head

    def boundary(self, start: int) -> tuple[str, ...]:
        """The tensors that ops ``0..start-1`` (or the input) write and ops ``start..head`` read, skips included."""
        written = {"input"} | {n.op for n in self.nodes[:start]}
        out: list[str] = []
        for node in self.nodes[start : self._head + 1]:
            out += [t for t in node.inputs if t in written and t not in out]
        return tuple(out)

    @torch.no_grad()
    def int8_forward(self, xq: torch.Tensor) -> torch.Tensor:
        """The deployed graph on an int8 input (``N x C x H x W``): every op, the softmax included."""
        env = self._run(xq.to(torch.float32), len(self.nodes) - 1, record=False)
        return env[self.nodes[-1].op]

    @torch.no_grad()
    def int8_tensors(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the deployed graph by name (tests compare them with TFLM's)."""
        return self._run(xq.to(torch.float32), len(self.nodes) - 1, record=False)


def from_blocks(
    first_conv: QConv,
    blocks: Sequence[tuple[QConv | None, QConv, QConv, QAdd | None]],
    feature_mix: QConv | None,
    classifier: QConv | FloatHead,
    input_scale: float,
    input_zero: int,
    input_mean: float = 0.0,
    input_std: float = 1.0,
    input_shape: tuple[int, int, int] | None = None,
    pool: QAvgPool | None = None,
) -> QModel:
    """The inverted-residual layout (tiny-training's MCUNet, MobileNetV2, ProxylessNAS; tiny-ir) as a graph.

    ``blocks`` are ``(pointwise1 or None, depthwise, pointwise2, residual add or None)``. Convolutions
    are named ``conv0``.. in forward order, a block's add ``add<block index>``; ReLU6 (folded into the
    int8 clamp) follows the first conv, expansions, depthwise convs and the feature mix.
    """
    ops: list[tuple[nn.Module, tuple[str, ...]]] = []
    convs: list[QConv] = []

    def conv(c: QConv, relu: bool, src: str) -> str:
        c.tag, c.relu = f"conv{len(convs)}", relu
        convs.append(c)
        ops.append((c, (src,)))
        return c.tag

    t = conv(first_conv, True, "input")
    for j, (pw1, dw, pw2, res) in enumerate(blocks):
        block_in = t
        if pw1 is not None:
            t = conv(pw1, True, t)
        t = conv(dw, True, t)
        t = conv(pw2, False, t)
        if res is not None:
            res.tag = f"add{j}"
            ops.append((res, (block_in, t)))
            t = res.tag
    if feature_mix is not None:
        t = conv(feature_mix, True, t)
    pool = pool or QAvgPool()
    pool.tag = "pool"
    ops.append((pool, (t,)))
    classifier.tag = "classifier"
    ops.append((classifier, ("pool",)))
    return QModel(ops, input_scale, input_zero, input_mean, input_std, input_shape)


def head_weight_scales(w: torch.Tensor, *, per_tensor: bool) -> torch.Tensor:
    """Symmetric int8 scales of a float head's rows: one per row, or one shared (a per-tensor FC)."""
    rows = w.abs().max(dim=1).values
    if per_tensor:
        rows = rows.max().expand_as(rows)
    return rows.clamp_min(1e-8) / 127


def replace_head(
    model: QModel, num_classes: int, *, precision: str = "int8", seed: int = 0, logit_range: float = 8.0
) -> QModel:
    """Give ``model`` a new, randomly initialised classifier for ``num_classes`` (transfer learning).

    The int8 head's output scale covers ``[-logit_range, logit_range]``; fine-tuning
    (the classifier is always trained) adapts its weights.
    """
    old = model.classifier
    cin = int(old.weight.shape[1])
    x_scale, x_zero = (
        (old.x_scale, old.x_zero) if isinstance(old, QConv) else (float(old.xparams[0]), int(old.xparams[1]))
    )
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, cin, generator=gen) / cin**0.5
    fc = isinstance(old, QConv) and old.kind == "fc"  # a TFLite FULLY_CONNECTED head stays one (per-tensor scale)
    if precision == "fp32":
        head: nn.Module = FloatHead(w, torch.zeros(num_classes), x_scale, x_zero)
    elif precision == "int8":
        w_scales = head_weight_scales(w, per_tensor=fc)
        w_int = torch.round(w / w_scales[:, None]).clamp(-127, 127).view(num_classes, cin, 1, 1)
        head = QConv(
            w_int,
            torch.zeros(num_classes),
            w_scales,
            x_scale,
            x_zero,
            2 * logit_range / 255,
            0,
            kind="fc" if fc else None,
        )
    else:
        raise ScenarioError(f"model.classifier_precision: must be int8 or fp32, got {precision!r}")
    head.tag = "classifier"
    model.classifier = head
    return model


def unit_scale(model: nn.Module, name: str) -> torch.Tensor:
    """The real value of one stored unit of tensor ``name`` (float64, broadcastable to the tensor).

    An int8 convolution's weight unit is its output channel's scale ``s_w``, its int32
    bias unit ``s_w * s_x``; any other tensor (a float head, a fp32 model) is stored in
    real units already (1).
    """
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, QConv):
        return torch.ones(1, dtype=torch.float64)
    ws = module.w_scales.detach().double()
    if attr == "weight":
        return ws.view(-1, *([1] * (module.weight.dim() - 1)))
    return ws * module.x_scale
