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
import torch.nn.functional as F
from torch import nn

from fedtiny.budget.ledger import (GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, fused_workspace_bytes,
                                   tensor_bytes, workspace_bytes)
from fedtiny.errors import ModelFileError, ScenarioError, SchemeError
from fedtiny.int8 import exact, kernels, native

__all__ = ["round_ste", "QConv", "QAdd", "QAvgPool", "QReshape", "QSoftmax", "FloatHead", "QModel", "Node", "Wiring",
           "from_blocks", "replace_head", "head_weight_scales", "to_nchw_shape", "unit_scale", "INT8_MIN", "INT8_MAX", "ACTIVATIONS"]

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ACTIVATIONS = ("NONE", "RELU", "RELU6", "RELU_N1_TO_1")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as torch.round), identity gradient."""
    return x + (torch.round(x) - x).detach()


def _qparams(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> torch.Tensor:
    return torch.tensor([x_scale, x_zero, y_scale, y_zero], dtype=torch.float64)


class _QParamsMixin:
    """Quantization parameters as a float64 buffer ``[x_scale, x_zero, y_scale, y_zero]`` (saved in state)."""

    qparams: torch.Tensor

    @property
    def x_scale(self) -> float:
        return float(self.qparams[0])

    @property
    def x_zero(self) -> int:
        return int(self.qparams[1])

    @property
    def y_scale(self) -> float:
        return float(self.qparams[2])

    @property
    def y_zero(self) -> int:
        return int(self.qparams[3])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _grads(*flags: bool) -> tuple[bool, ...]:
    """Which of an op's inputs get a gradient: none outside autograd (evaluation, ``no_grad``)."""
    on = torch.is_grad_enabled()
    return tuple(on and f for f in flags)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.int64)


@dataclass(frozen=True)
class Wiring:
    """How one op's inputs are connected, as far as its buffers are concerned.

    Attributes
    ----------
    in_tags
        Buffer of each input (``input`` or the tag of the op that wrote it; a reshape writes no buffer).
    last_reader
        This op is the last one to read that input in the forward, so it releases it.
    grad_tags
        Where each input's gradient goes: ``grad:<tag>`` for the input's first reader,
        ``grad:skip:<op>`` (pending until the first reader merges it) for any later one.
    skips
        The pending gradients of later readers of this op's input, which it merges into its own.
    """

    in_tags: tuple[str, ...] = ("",)
    last_reader: tuple[bool, ...] = (True,)
    grad_tags: tuple[str, ...] = ("grad:",)
    skips: tuple[str, ...] = ()

    def frees(self) -> tuple[str, ...]:
        return tuple(f"act:{t}" for t, last in zip(self.in_tags, self.last_reader) if last)

    @staticmethod
    def single(n: int = 1) -> "Wiring":
        """An op run on its own (no graph around it)."""
        return Wiring(("",) * n, (True,) * n, ("grad:",) + tuple(f"grad:skip:{i}" for i in range(1, n)))


def _check_grads(led: Ledger | NullLedger, events: OpEvents, held: list[int]) -> None:
    """The gradients an op's backward really produced against those its events planned."""
    planned = [n for _, n, _ in events.param_grads] + [n for _, n in events.input_grads]
    for i, (p, a) in enumerate(zip(planned, held, strict=False)):
        led.check(f"gradient {i} of {events.tag}", p, a)
    led.check(f"gradient count of {events.tag}", len(planned), len(held))


# ---------------------------------------------------------------- convolution

def _input_tap_l1(w: torch.Tensor, groups: int) -> float:
    """The largest L1 norm of the weights one input channel meets (within its group: a depthwise
    channel meets only its own taps), which bounds each sum of its input gradient."""
    o, c, kh, kw = w.shape
    return float(w.abs().reshape(groups, o // groups, c, kh * kw).sum(dim=(1, 3)).max())


def _per_sample_weight_grads(x: torch.Tensor, shape: tuple[int, ...], g: torch.Tensor, stride, padding,
                             groups: int) -> torch.Tensor:
    """Each sample's weight gradient of a convolution (``N x shape``) in one call: the batch becomes
    groups (sample ``n``'s channels are group block ``n``)."""
    n = x.shape[0]
    xs = x.reshape(1, n * x.shape[1], *x.shape[2:])
    gs = g.reshape(1, n * g.shape[1], *g.shape[2:])
    per = torch.nn.grad.conv2d_weight(xs, (n * shape[0], *shape[1:]), gs, stride, padding, groups=n * groups)
    return per.reshape(n, *shape)


class _QConvFn(torch.autograd.Function):
    """int8 convolution whose backward keeps only what the device keeps.

    Saved for backward: the clamp's 1-bit mask (when a gradient flows through
    this op), the int8 input of the trained channels only (when the weight is
    trained), and a reference to the weight (when the input gradient is needed;
    frozen weights stay in flash). Nothing else.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: "QConv", events: OpEvents, led: Ledger | NullLedger):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        y, mask = conv.requantize_clamp(x, weight, bias, want_mask=need_x or need_w or need_b)
        ctx.conv, ctx.in_shape, ctx.events, ctx.ledger = conv, x.shape, events, led
        ctx.key = exact.current()
        xsel = w = None
        if need_w:
            sel = conv.train_channels
            xsel = (x if sel is None else x[:, sel]).to(torch.int8)
        if need_x:
            w = weight
        ctx.save_for_backward(mask, xsel, w)
        led.check(f"saved:{conv.tag}", events.saved,
                  0 if mask is None else tensor_bytes(mask, "bit") + (xsel.numel() if xsel is not None else 0))
        return y

    @staticmethod
    def backward(ctx, g):
        mask, xsel, w = ctx.saved_tensors
        conv, led, events = ctx.conv, ctx.ledger, ctx.events
        led.check(f"grad:{conv.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        ga = g * mask * conv.multiplier().view(1, -1, 1, 1)
        # The exact step: ga as int8 times one scale, every sum below a sum of integers (fedtiny.int8.exact)
        scale = None
        if ctx.key is not None:
            ga, scale = exact.quantize_grad(ga, ctx.key, exact.grad_slot(conv.slot))
        q_max = float(ga.abs().max()) if scale is not None and ga.numel() else 0.0
        n_samples = ga.shape[0]

        def scaled(int_sum: torch.Tensor) -> torch.Tensor:  # per-sample integer sums (N x ...) times s[n]
            return int_sum if scale is None else int_sum.float() * scale.view(-1, *([1] * (int_sum.dim() - 1)))

        def weight_grad(xs: torch.Tensor, shape: tuple[int, ...], gq: torch.Tensor, groups: int) -> torch.Tensor:
            if scale is None:
                return torch.nn.grad.conv2d_weight(xs, shape, gq, conv.stride, pad, groups=groups)
            # each sample's integer gradient (one grouped call for the batch: integer sums are exact in
            # any order), then scaled and accumulated sample by sample as the device does
            per = _per_sample_weight_grads(xs, shape, gq, conv.stride, pad, groups)
            return exact.sum_in_order(per[i].float() * scale[i] for i in range(n_samples))

        grad_x = grad_w = grad_b = None
        held = []  # bytes of the gradients this op produces, in the order its events list them
        pad, sym = conv.torch_padding()
        if ctx.needs_input_grad[2]:
            if scale is None:
                grad_b = ga.sum(dim=(0, 2, 3))
            else:
                grad_b = exact.sum_in_order(scaled(ga.double().sum(dim=(2, 3))))
            held.append(GRAD_BYTES * grad_b.numel())
        if ctx.needs_input_grad[1]:
            sel = conv.train_channels
            xs = xsel.float() - conv.x_zero
            if not sym:
                xs = F.pad(xs, conv.pad_lrtb())
            kh, kw = conv.kernel_hw
            gq = ga
            if scale is not None:  # each sum is over one input channel's positions: bounded by its L1 norm
                dt = exact.int_sum_dtype(q_max * float(xs.abs().sum(dim=(0, 2, 3)).max()) * 1.001)
                xs, gq = xs.to(dt), ga.to(dt)
            if conv.is_depthwise:
                ch = sel if sel is not None else list(range(conv.out_channels))
                gw = weight_grad(xs, (len(ch), 1, kh, kw), gq[:, ch], len(ch))
                grad_w = torch.zeros_like(conv.weight)
                grad_w[ch] = gw
            elif conv.groups > 1:  # grouped (a depth multiplier): trained whole (set_train_channels)
                gw = weight_grad(xs, tuple(conv.weight.shape), gq, conv.groups)
                grad_w = gw
            else:
                ch = sel if sel is not None else list(range(conv.in_channels))
                gw = weight_grad(xs, (conv.out_channels, len(ch), kh, kw), gq, 1)
                grad_w = torch.zeros_like(conv.weight)
                grad_w[:, ch] = gw
            held.append(GRAD_BYTES * gw.numel())
        if ctx.needs_input_grad[0]:
            wq, gq = w, ga
            if scale is not None:  # each sum is over one input channel's taps: bounded by their weights' L1 norm
                dt = exact.int_sum_dtype(q_max * _input_tap_l1(w, conv.groups) * 1.001)
                wq, gq = w.to(dt), ga.to(dt)
            if sym:
                grad_x = scaled(torch.nn.grad.conv2d_input(ctx.in_shape, wq, gq, conv.stride, pad, groups=conv.groups))
            else:
                n, c, h, wd = ctx.in_shape
                pt, pb, pl, pr = conv.padding
                gp = torch.nn.grad.conv2d_input((n, c, h + pt + pb, wd + pl + pr), wq, gq, conv.stride, 0,
                                                groups=conv.groups)
                grad_x = scaled(gp[:, :, pt:pt + h, pl:pl + wd].contiguous())
            held.append(tensor_bytes(grad_x, "fp32"))
        _check_grads(led, events, held)
        events.backward(led)
        return grad_x, grad_w, grad_b, None, None, None


class QConv(_QParamsMixin, nn.Module):
    """An int8 convolution (regular, depthwise, pointwise, or fully connected) with int32 bias.

    Parameters
    ----------
    weight
        int8 values, ``O x I/groups x kh x kw`` (``O x I x 1 x 1`` for a fully connected op).
    bias
        int32 values, ``O`` (scale ``w_scales * x_scale``).
    w_scales
        ``O`` float scales of the weight's output channels (all equal for a per-tensor FC).
    x_scale, x_zero, y_scale, y_zero
        Input and output activation quantization.
    stride, groups
        As in ``nn.Conv2d``.
    padding
        ``(top, bottom, left, right)`` zero-point padding; default ``k // 2`` on every side.
    activation
        The fused activation (``NONE``, ``RELU``, ``RELU6``): TFLite's clamp of the output.
    kind
        ``conv``, ``depthwise`` or ``fc`` (a TFLite FULLY_CONNECTED: per-tensor multiplier
        computed as TFLM does); default from ``groups``.

    Notes
    -----
    A folded ReLU6 needs no clamp of its own when its output range [0, 6] is the
    int8 range (``y_zero = -128``): clamping to int8 is the activation; ``relu``
    records that one is there (the paper's accounting counts its mask).
    ``train_channels`` (set by a sparse-update scheme) restricts the weight
    gradient to some input channels (channels, for a depthwise conv).
    """

    # On the device: int8 weights, int32 biases (fedtiny.models.state reads this).
    WIRE_DTYPES = {"weight": "int8", "bias": "int32"}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, w_scales: torch.Tensor, x_scale: float, x_zero: int,
                 y_scale: float, y_zero: int, stride: int = 1, groups: int = 1, *,
                 padding: tuple[int, int, int, int] | None = None, activation: str = "NONE",
                 kind: str | None = None) -> None:
        super().__init__()
        # Contiguous copies: a transposed import must not reach the wire or a file with its strides.
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).contiguous().clone())
        # float64: every int32 bias exactly (float32 rounds those beyond 2^24, which pretrained
        # models have on near-dead channels: VWW has 973), and the int32 range TFLM saturates to
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float64).clamp(-2**31, 2**31 - 1)
                                 .contiguous().clone())
        self.register_buffer("w_scales", torch.as_tensor(w_scales, dtype=torch.float32).contiguous().clone())
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.stride, self.groups = int(stride), int(groups)
        kh, kw = (int(v) for v in self.weight.shape[-2:])
        self.padding = tuple(int(p) for p in padding) if padding is not None else (kh // 2, kh // 2, kw // 2, kw // 2)
        if activation not in ACTIVATIONS:
            raise ModelFileError(f"activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.kind = kind or ("depthwise" if self.is_depthwise else "conv")
        self.tag = "conv"
        self.relu = activation != "NONE"  # a ReLU follows (folded or fused): its mask counts in the paper's accounting
        self.train_channels: list[int] | None = None
        self._mult_key: tuple | None = None
        self._mult: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slot = 0  # the op's index among the graph's convolutions (its exact step's random streams)
        self._mult_i32_of: torch.Tensor | None = None
        self._mult_i32_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # Shapes read through _parameters: the planner asks them millions of times in a search, and
    # nn.Module's attribute fallback is the slow path.
    @property
    def kernel_hw(self) -> tuple[int, int]:
        shape = self._parameters["weight"].shape
        return int(shape[-2]), int(shape[-1])

    @property
    def kernel_size(self) -> int:
        """The kernel's width (its side, for the square kernels of MCUNet-style models)."""
        return int(self._parameters["weight"].shape[-1])

    @property
    def in_channels(self) -> int:
        return int(self._parameters["weight"].shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        return int(self._parameters["weight"].shape[0])

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.out_channels

    @property
    def depth_multiplier(self) -> int:
        """Output channels per input channel of a convolution with one input channel per group (TFLite's
        DEPTHWISE_CONV_2D ``depth_multiplier``: output ``c * m + j`` reads input ``c``); 0 for other groupings."""
        one_each = self.groups > 1 and self.groups == self.in_channels and self.out_channels % self.groups == 0
        return self.out_channels // self.groups if one_each else 0

    def torch_padding(self) -> tuple[int | tuple[int, int], bool]:
        """``(padding for torch's conv, symmetric?)``: asymmetric padding is applied with ``F.pad`` first."""
        pt, pb, pl, pr = self.padding
        if pt == pb and pl == pr:
            return (pt, pl), True
        return 0, False

    def pad_lrtb(self) -> tuple[int, int, int, int]:
        pt, pb, pl, pr = self.padding
        return pl, pr, pt, pb

    def set_train_channels(self, channels: list[int] | None) -> None:
        """Restrict weight training to these input channels (None: all channels of a trained weight)."""
        n = self.out_channels if self.is_depthwise else self.in_channels
        if channels is not None and len(channels) == n:
            channels = None
        if channels is not None and self.groups > 1 and not self.is_depthwise:
            raise SchemeError(f"{self.tag}: channel selection is not supported for grouped convolutions")
        self.train_channels = None if channels is None else [int(c) for c in channels]

    def trained_weight_elements(self) -> int:
        """Weight elements a scheme trains (0 when the weight is frozen)."""
        if not self.weight.requires_grad:
            return 0
        if self.train_channels is None:
            return self.weight.numel()
        per = self.weight[0].numel() if self.is_depthwise else self.weight[:, 0].numel()
        return per * len(self.train_channels)

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        (kh, kw), (pt, pb, pl, pr), s = self.kernel_hw, self.padding, self.stride
        return (hw[0] + pt + pb - kh) // s + 1, (hw[1] + pl + pr - kw) // s + 1

    def multiplier(self) -> torch.Tensor:
        """Per-channel effective scale ``s_x * s_w / s_y`` (float, for the backward)."""
        return (self.x_scale * self.w_scales.double() / self.y_scale).float()

    def quantized_multiplier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """TFLM's fixed-point ``(multiplier, shift)`` per output channel (int64), cached on the scales."""
        key = (tuple(self.qparams.tolist()), self.w_scales.numpy().tobytes(), self.kind)
        if key != self._mult_key:
            if self.kind == "fc":
                m, s = kernels.fc_multiplier(float(self.qparams[0]), float(self.w_scales[0]), float(self.qparams[2]))
                n = self.out_channels
                self._mult = (torch.full((n,), int(m), dtype=torch.int64), torch.full((n,), int(s), dtype=torch.int64))
            else:
                m, s = kernels.conv_multipliers(float(self.qparams[0]), self.w_scales.numpy(), float(self.qparams[2]))
                self._mult = (torch.as_tensor(m, dtype=torch.int64), torch.as_tensor(s, dtype=torch.int64))
            self._mult_key = key
        return self._mult

    def act_range(self) -> tuple[int, int]:
        """The output clamp: the fused activation's quantized range within int8."""
        return kernels.activation_range(self.activation, self.y_scale, self.y_zero)

    def requantize_clamp(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         want_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The int8 output (float storage) and, if wanted, the clamp's mask (values it kept).

        int32 accumulation, TFLM's requantization, zero point, the activation's clamp: in the
        host kernels when built (:mod:`fedtiny.int8.native`), else in PyTorch; same integers.
        """
        acc = kernels.conv_acc(x - self.x_zero, weight, bias, self.stride, self.padding, self.groups)
        lo, hi = self.act_range()
        fast = native.requantize_clamp(acc, *self._mult_i32(), self.y_zero, lo, hi, want_mask)
        if fast is not None:
            return fast
        mult, shift = self.quantized_multiplier()
        y = kernels.requantize_channels(acc, mult, shift).add_(self.y_zero).to(torch.float32)
        return y.clamp(lo, hi), ((y >= lo) & (y <= hi)) if want_mask else None

    def _mult_i32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`quantized_multiplier` as int32 (the host kernels' types), cached with it."""
        mult, shift = self.quantized_multiplier()
        if self._mult_i32_of is not mult:
            self._mult_i32_cache = (mult.to(torch.int32).contiguous(), shift.to(torch.int32).contiguous())
            self._mult_i32_of = mult
        return self._mult_i32_cache

    def trained_input_elements(self, in_shape: tuple[int, ...]) -> int:
        """Input elements saved for the weight gradient: the trained channels of an ``N x C x H x W`` input."""
        if not self.weight.requires_grad:
            return 0
        n, _, h, w = in_shape
        if self.train_channels is None:
            return n * (self.out_channels if self.is_depthwise else self.in_channels) * h * w
        return n * len(self.train_channels) * h * w

    def events(self, in_shape: tuple[int, ...], wiring: Wiring, *, need_x: bool = False,
               need_w: bool | None = None, need_b: bool | None = None, inplace_depthwise: bool = True) -> OpEvents:
        """The buffers this convolution holds in a training step, for an ``N x C x H x W`` input.

        ``need_x``: a gradient must reach the input (something upstream is trained);
        ``need_w``/``need_b`` default to whether the weight/bias are trained.
        """
        need_w = self.weight.requires_grad if need_w is None else need_w
        need_b = self.bias.requires_grad if need_b is None else need_b
        n, _, h, w = in_shape
        oh, ow = self.out_hw((h, w))
        out = n * self.out_channels * oh * ow
        keep_input = not wiring.last_reader[0]
        inplace = inplace_depthwise and self.is_depthwise and not keep_input
        grads = need_x or need_w or need_b
        n_sel = self.out_channels if self.train_channels is None else len(self.train_channels)
        w_rows = n_sel if self.is_depthwise else self.out_channels
        return OpEvents(
            self.tag, out, wiring.frees(),
            workspace=workspace_bytes(self.kernel_hw, self.in_channels, self.is_depthwise, (h, w), (oh, ow), inplace,
                                      self.padding),
            saved=(out + 7) // 8 + (self.trained_input_elements(in_shape) if need_w else 0) if grads else 0,
            inplace=inplace, in_backward=grads, grad_bytes=GRAD_BYTES * out,
            param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * self.out_channels, 1),) * need_b
            + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.trained_weight_elements(), w_rows),) * need_w,
            input_grads=((wiring.grad_tags[0], GRAD_BYTES * _numel(in_shape)),) * need_x,
            # The input's first reader sums the later readers' pending gradients into its input gradient.
            releases=wiring.skips * need_x)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        """Forward, reporting buffers to a recording ledger (unless ``quiet``)."""
        (x,) = inputs
        led = NULL if quiet else active()
        need_x, need_w, need_b = _grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(tuple(x.shape), wiring or Wiring.single(), need_x=need_x, need_w=need_w,
                             need_b=need_b, inplace_depthwise=led.inplace_depthwise)
        y = _QConvFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- add

class _QAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, add: "QAdd", events: OpEvents, led: Ledger | NullLedger):
        lo, hi = add.act_range()
        want_mask = any(ctx.needs_input_grad[:2])
        fast = native.add_clamp(x, b, add.add_params(), lo, hi, want_mask)
        if fast is not None:
            y, mask = fast
        else:
            y = kernels.add_int8(_as_int(x), _as_int(b), add.add_params(), INT32_MIN, INT32_MAX).to(torch.float32)
            mask = ((y >= lo) & (y <= hi)) if want_mask else None
            y = y.clamp(lo, hi)
        ra, rb = add.x_scale / add.y_scale, float(add.bparams[0]) / add.y_scale
        ctx.ratios, ctx.events, ctx.ledger = (ra, rb), events, led
        led.check(f"saved:{add.tag}", events.saved, 0 if mask is None else tensor_bytes(mask, "bit"))
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        led, events = ctx.ledger, ctx.events
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        gm = g * mask
        gx = gb = None
        held = []
        if ctx.needs_input_grad[0]:
            gx = gm * ctx.ratios[0]
            held.append(tensor_bytes(gx, "fp32"))
        if ctx.needs_input_grad[1]:
            gb = gm * ctx.ratios[1]
            held.append(tensor_bytes(gb, "fp32"))
        _check_grads(led, events, held)
        events.backward(led)
        return gx, gb, None, None, None


class QAdd(_QParamsMixin, nn.Module):
    """Elementwise add of two int8 tensors (a residual), as TFLM's ADD computes it.

    ``x`` is the first input (``x_scale``, ``x_zero``); the other input carries its own
    ``b_scale``, ``b_zero`` (``bparams``).
    """

    def __init__(self, x_scale: float, x_zero: int, b_scale: float, b_zero: int, y_scale: float, y_zero: int,
                 *, activation: str = "NONE") -> None:
        super().__init__()
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.register_buffer("bparams", torch.tensor([b_scale, b_zero], dtype=torch.float64))
        self.activation = activation
        self.tag = "add"
        self._key: tuple | None = None
        self._params = None

    def add_params(self):
        key = (tuple(self.qparams.tolist()), tuple(self.bparams.tolist()))
        if key != self._key:
            self._params = kernels.add_params(self.x_scale, self.x_zero, float(self.bparams[0]), int(self.bparams[1]),
                                              self.y_scale, self.y_zero)
            self._key = key
        return self._params

    def act_range(self) -> tuple[int, int]:
        return kernels.activation_range(self.activation, self.y_scale, self.y_zero)

    def events(self, shape: tuple[int, ...], wiring: Wiring, *, need_x: bool, need_b: bool) -> OpEvents:
        """The buffers of the add in a training step (both inputs ``shape``)."""
        out = _numel(shape)
        grads = need_x or need_b
        return OpEvents(self.tag, out, wiring.frees(), saved=(out + 7) // 8 if grads else 0,
                        in_backward=grads, grad_bytes=GRAD_BYTES * out,
                        input_grads=((wiring.grad_tags[0], GRAD_BYTES * out),) * need_x
                        + ((wiring.grad_tags[1], GRAD_BYTES * out),) * need_b,
                        releases=wiring.skips * (need_x or need_b))

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        x, b = inputs
        led = NULL if quiet else active()
        need_x, need_b = _grads(x.requires_grad, b.requires_grad)
        events = self.events(tuple(b.shape), wiring or Wiring.single(2), need_x=need_x, need_b=need_b)
        y = _QAddFn.apply(x, b, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.run([x, b])


# ---------------------------------------------------------------- average pool

class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pool: "QAvgPool", events: OpEvents, led: Ledger | NullLedger):
        ctx.in_shape, ctx.pool, ctx.events, ctx.ledger = x.shape, pool, events, led
        kernel, pad = pool.window(tuple(x.shape))
        return kernels.avg_pool_int8(_as_int(x), kernel, pool.stride_for(tuple(x.shape)), pad,
                                     INT8_MIN, INT8_MAX).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        led, events, pool = ctx.ledger, ctx.events, ctx.pool
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        n, c, h, w = ctx.in_shape
        if pool.is_global(tuple(ctx.in_shape)):
            gx = (g / (h * w)).expand(n, c, h, w).contiguous()
        else:
            gx = pool.window_grad(tuple(ctx.in_shape), g)
        _check_grads(led, events, [tensor_bytes(gx, "fp32")])
        events.backward(led)
        return gx, None, None, None


class QAvgPool(nn.Module):
    """Average pool in the int8 domain (scale and zero point unchanged), as TFLM rounds it.

    ``kernel=None`` is the global pool; otherwise a ``(kh, kw)`` window with ``stride``
    and ``(top, bottom, left, right)`` padding (only valid elements are averaged).
    """

    def __init__(self, kernel: tuple[int, int] | None = None, stride: int = 1,
                 padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        super().__init__()
        self.kernel = None if kernel is None else (int(kernel[0]), int(kernel[1]))
        self.stride = int(stride)
        self.padding = tuple(int(p) for p in padding)
        self.tag = "pool"

    def is_global(self, in_shape: tuple[int, ...]) -> bool:
        return self.kernel is None or (self.kernel == tuple(in_shape[2:]) and not any(self.padding))

    def window(self, in_shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        if self.kernel is None:
            return (int(in_shape[2]), int(in_shape[3])), (0, 0, 0, 0)
        return self.kernel, self.padding

    def stride_for(self, in_shape: tuple[int, ...]) -> int:
        return 1 if self.kernel is None else self.stride

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.kernel is None:
            return 1, 1
        (kh, kw), (pt, pb, pl, pr), s = self.kernel, self.padding, self.stride
        return (hw[0] + pt + pb - kh) // s + 1, (hw[1] + pl + pr - kw) // s + 1

    def window_grad(self, in_shape: tuple[int, ...], g: torch.Tensor) -> torch.Tensor:
        """Gradient of a windowed mean over the valid elements of each window."""
        pt, pb, pl, pr = self.padding
        with torch.enable_grad():
            x = torch.zeros(in_shape, requires_grad=True)
            ones = torch.ones(in_shape)
            pad = (pl, pr, pt, pb)
            count = F.avg_pool2d(F.pad(ones, pad), self.kernel, self.stride, divisor_override=1)
            y = F.avg_pool2d(F.pad(x, pad), self.kernel, self.stride, divisor_override=1) / count
            (gx,) = torch.autograd.grad(y, x, g)
        return gx

    def events(self, in_shape: tuple[int, ...], wiring: Wiring, *, need_x: bool) -> OpEvents:
        """The buffers of the pool in a training step, for an ``N x C x H x W`` input."""
        out = in_shape[0] * in_shape[1] * _numel(self.out_hw(in_shape[2:]))
        return OpEvents(self.tag, out, wiring.frees(), in_backward=need_x, grad_bytes=GRAD_BYTES * out,
                        input_grads=((wiring.grad_tags[0], GRAD_BYTES * _numel(in_shape)),) * need_x,
                        releases=wiring.skips * need_x)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        (x,) = inputs
        led = NULL if quiet else active()
        events = self.events(tuple(x.shape), wiring or Wiring.single(), need_x=_grads(x.requires_grad)[0])
        y = _PoolFn.apply(x, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- reshape, softmax

def to_nchw_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """fedtiny's NCHW form of a TFLite tensor shape (``[N, C]`` -> ``N x C x 1 x 1``; NHWC -> NCHW)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 4:
        return shape[0], shape[3], shape[1], shape[2]
    if len(shape) == 2:
        return shape[0], shape[1], 1, 1
    raise ModelFileError(f"tensor shape {list(shape)}: only 2-D [N, C] and 4-D NHWC tensors are supported")


class QReshape(nn.Module):
    """RESHAPE in TFLite's (NHWC, row-major) element order; ``shape`` excludes the batch.

    It writes no buffer of its own (a view of its input on the device).
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(v) for v in shape)
        self.tag = "reshape"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        nhwc = x.permute(0, 2, 3, 1).reshape(n, -1)
        per = _numel(self.shape)
        shape = self.shape if per == nhwc.shape[1] else (nhwc.shape[1],)  # a replaced head changed the width
        c, h, w = to_nchw_shape((n, *shape))[1:]
        return nhwc.reshape(n, h, w, c).permute(0, 3, 1, 2)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        return self(inputs[0])


class QSoftmax(nn.Module):
    """int8 SOFTMAX over channels as TFLM's reference kernel computes it (output scale 1/256, zero -128)."""

    def __init__(self, x_scale: float, beta: float = 1.0, y_scale: float = 1 / 256, y_zero: int = -128) -> None:
        super().__init__()
        self.x_scale, self.beta, self.y_scale, self.y_zero = float(x_scale), float(beta), float(y_scale), int(y_zero)
        self.tag = "softmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = _as_int(x).permute(0, 2, 3, 1).reshape(-1, c)
        y = kernels.softmax_int8(flat, kernels.softmax_params(self.x_scale, self.beta), self.y_zero)
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2).to(torch.float32)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        return self(inputs[0])


# ---------------------------------------------------------------- float head

class _HeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, head: "FloatHead", events: OpEvents, led: Ledger | NullLedger):
        s, z = float(head.xparams[0]), float(head.xparams[1])
        feats = (x.flatten(1) - z) * s
        ctx.in_shape, ctx.events, ctx.ledger, ctx.s = x.shape, events, led, s
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(feats if need_w else None, weight if need_x else None)
        led.check(f"saved:{head.tag}", events.saved, tensor_bytes(feats, "fp32") if need_w else 0)
        return F.linear(feats, weight, bias)

    @staticmethod
    def backward(ctx, g):
        feats, w = ctx.saved_tensors
        led, events = ctx.ledger, ctx.events
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        gx = gw = gb = None
        held = []
        if ctx.needs_input_grad[2]:
            gb = g.sum(0)
            held.append(GRAD_BYTES * gb.numel())
        if ctx.needs_input_grad[1]:
            gw = g.t() @ feats
            held.append(GRAD_BYTES * gw.numel())
        if ctx.needs_input_grad[0]:
            gx = (g @ w * ctx.s).view(ctx.in_shape)
            held.append(tensor_bytes(gx, "fp32"))
        _check_grads(led, events, held)
        events.backward(led)
        return gx, gw, gb, None, None, None


class FloatHead(nn.Module):
    """A float classifier on dequantized int8 features (``model.classifier_precision = fp32``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, x_scale: float, x_zero: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.register_buffer("xparams", torch.tensor([x_scale, x_zero], dtype=torch.float64))
        self.tag = "classifier"

    def events(self, in_shape: tuple[int, ...], wiring: Wiring, *, need_x: bool = False, need_w: bool | None = None,
               need_b: bool | None = None) -> OpEvents:
        """The buffers of the float head in a training step, for pooled ``N x C x 1 x 1`` features (fp32 logits)."""
        need_w = self.weight.requires_grad if need_w is None else need_w
        need_b = self.bias.requires_grad if need_b is None else need_b
        classes = self.weight.shape[0]
        out = 4 * in_shape[0] * classes
        return OpEvents(self.tag, out, wiring.frees(), saved=4 * _numel(in_shape) if need_w else 0,
                        in_backward=need_x or need_w or need_b, grad_bytes=GRAD_BYTES * in_shape[0] * classes,
                        param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * classes, 1),) * need_b
                        + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.weight.numel(), classes),) * need_w,
                        input_grads=((wiring.grad_tags[0], GRAD_BYTES * _numel(in_shape)),) * need_x,
                        releases=wiring.skips * need_x)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        (x,) = inputs
        led = NULL if quiet else active()
        need_x, need_w, need_b = _grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(tuple(x.shape), wiring or Wiring.single(), need_x=need_x, need_w=need_w, need_b=need_b)
        y = _HeadFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- the graph

@dataclass(frozen=True)
class Node:
    """One op of the graph: the module's name (also its output tensor and buffer tag) and what it reads."""

    op: str
    inputs: tuple[str, ...]


def fusable(pw: nn.Module, dw: nn.Module) -> bool:
    """A pointwise convolution whose output only a depthwise convolution reads can run fused with it."""
    return (isinstance(pw, QConv) and isinstance(dw, QConv) and pw.kind == "conv" and pw.kernel_hw == (1, 1)
            and pw.groups == 1 and dw.is_depthwise)


def fused_events(pw: QConv, dw: QConv, in_shape: tuple[int, ...], wiring: Wiring) -> OpEvents:
    """The buffers of a pointwise expansion + depthwise run fused (one expanded channel at a time, no gradient)."""
    hw = (in_shape[2], in_shape[3])
    mid_hw = pw.out_hw(hw)
    out_hw = dw.out_hw(mid_hw)
    return OpEvents(dw.tag, in_shape[0] * dw.out_channels * out_hw[0] * out_hw[1], wiring.frees(),
                    workspace=fused_workspace_bytes(pw.in_channels, dw.kernel_hw, mid_hw, out_hw, dw.padding))


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

    def __init__(self, ops: Sequence[tuple[nn.Module, Sequence[str]]], input_scale: float, input_zero: int,
                 input_mean: float = 0.0, input_std: float = 1.0,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        self.register_buffer("input_params", torch.tensor([input_scale, input_zero, input_mean, input_std],
                                                          dtype=torch.float64))
        known = {"input"}
        nodes = []
        for module, inputs in ops:
            name = module.tag
            if name in known or not name.isidentifier() or hasattr(nn.Module, name):
                raise ModelFileError(f"graph: op name {name!r} is repeated or not a valid name")
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
        return [m for m in (self.op(n.op) for n in self.nodes[:self._head]) if isinstance(m, QConv)]

    def buffer_of(self, tensor: str) -> str:
        """The buffer holding ``tensor``: a reshape's output is its input's buffer."""
        while tensor != "input" and isinstance(self.op(tensor), QReshape):
            tensor = self.nodes[[n.op for n in self.nodes].index(tensor)].inputs[0]
        return tensor

    def wiring(self, upto: int | None = None) -> list[Wiring | None]:
        """Each op's :class:`Wiring` (``None`` for reshapes) for the graph run up to op ``upto`` (the head)."""
        upto = self._head if upto is None else upto
        nodes = self.nodes[:upto + 1]
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            if isinstance(self.op(node.op), QReshape):
                continue
            for t in node.inputs:
                readers.setdefault(self.buffer_of(t), []).append(i)
        out: list[Wiring | None] = []
        for i, node in enumerate(nodes):
            if isinstance(self.op(node.op), QReshape):
                out.append(None)
                continue
            tags = tuple(self.buffer_of(t) for t in node.inputs)
            last = tuple(readers[t][-1] == i for t in tags)
            grad_tags = tuple(f"grad:{t}" if readers[t][0] == i else f"grad:skip:{node.op}" for t in tags)
            skips = tuple(f"grad:skip:{self.nodes[j].op}" for t in tags if readers[t][0] == i for j in readers[t][1:])
            out.append(Wiring(tags, last, grad_tags, skips))
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
        return torch.clamp(round_ste((x - mean) / std / scale) + zero, INT8_MIN, INT8_MAX)

    def _run(self, xq: torch.Tensor | None, upto: int, *, record: bool = True, start: int = 0,
             env: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
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
            w = wiring[i] or (None if isinstance(module, QReshape) else Wiring.single(len(xs)))
            if (led.fuse_frozen and nxt is not None and fusable(module, self.op(nxt.op))
                    and nxt.inputs == (node.op,) and self._only_reader(i) and not xs[0].requires_grad
                    and not any(p.requires_grad for m in (module, self.op(nxt.op)) for p in m.parameters())):
                dw = self.op(nxt.op)
                mid = module.run(xs, quiet=True)
                env[node.op] = mid
                env[nxt.op] = dw.run([mid], quiet=True)
                fused_events(module, dw, tuple(xs[0].shape), w).forward(led)
                i += 2
                continue
            if isinstance(module, QSoftmax):
                # TFLM derives a softmax's parameters from its input tensor's scale, which a new or
                # refitted head (transfer learning, a checkpoint) sets: the softmax follows it
                module.x_scale = self._output_scale(node.inputs[0], module.x_scale)
            env[node.op] = module.run(xs, w, quiet=not record) if not isinstance(module, QReshape) else module(xs[0])
            i += 1
        return env

    def _output_scale(self, tensor: str, default: float) -> float:
        """The int8 scale of ``tensor`` as its producer writes it (through reshapes); ``default`` if unknown."""
        while tensor != "input":
            op = self.op(tensor)
            if not isinstance(op, QReshape):
                return float(op.y_scale) if isinstance(op, QConv) else default
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
        for i, node in enumerate(self.nodes[:self._head + 1]):
            if any(p.requires_grad for p in self.op(node.op).parameters()):
                return i
        return self._head

    def boundary(self, start: int) -> tuple[str, ...]:
        """The tensors that ops ``0..start-1`` (or the input) write and ops ``start..head`` read, skips included."""
        written = {"input"} | {n.op for n in self.nodes[:start]}
        out: list[str] = []
        for node in self.nodes[start:self._head + 1]:
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


def from_blocks(first_conv: QConv, blocks: Sequence[tuple[QConv | None, QConv, QConv, QAdd | None]],
                feature_mix: QConv | None, classifier: QConv | FloatHead, input_scale: float, input_zero: int,
                input_mean: float = 0.0, input_std: float = 1.0,
                input_shape: tuple[int, int, int] | None = None, pool: QAvgPool | None = None) -> QModel:
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


def replace_head(model: QModel, num_classes: int, *, precision: str = "int8", seed: int = 0,
                 logit_range: float = 8.0) -> QModel:
    """Give ``model`` a new, randomly initialised classifier for ``num_classes`` (transfer learning).

    The int8 head's output scale covers ``[-logit_range, logit_range]``; fine-tuning
    (the classifier is always trained) adapts its weights.
    """
    old = model.classifier
    cin = int(old.weight.shape[1])
    x_scale, x_zero = (old.x_scale, old.x_zero) if isinstance(old, QConv) else (float(old.xparams[0]),
                                                                                 int(old.xparams[1]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, cin, generator=gen) / cin ** 0.5
    fc = isinstance(old, QConv) and old.kind == "fc"  # a TFLite FULLY_CONNECTED head stays one (per-tensor scale)
    if precision == "fp32":
        head: nn.Module = FloatHead(w, torch.zeros(num_classes), x_scale, x_zero)
    elif precision == "int8":
        w_scales = head_weight_scales(w, per_tensor=fc)
        w_int = torch.round(w / w_scales[:, None]).clamp(-127, 127).view(num_classes, cin, 1, 1)
        head = QConv(w_int, torch.zeros(num_classes), w_scales, x_scale, x_zero, 2 * logit_range / 255, 0,
                     kind="fc" if fc else None)
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
