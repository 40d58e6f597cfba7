"""The int8 graph an MCU runs, emulated in PyTorch so that it can be trained.

Tensors hold integer values in float32 storage: weights are int8 (symmetric, one
scale per output channel), biases int32 (scale ``s_w * s_x``), activations int8
with a scale and a zero point. Each convolution does what the MCU does: subtract
the input zero point, accumulate in int32, add the bias, requantize with the
effective scale ``s_x * s_w / s_y``, add the output zero point, round, clamp
(a folded ReLU6 is the clamp). Rounding is straight-through for gradients, the
clamp passes gradient only inside its range, so backward is what on-device
training computes.

The classifier is a 1x1 convolution on the pooled features; in ``fp32`` precision
it is a float linear layer on the dequantized features instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.budget.ledger import (GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, fused_workspace_bytes,
                                   tensor_bytes, workspace_bytes)
from fedtiny.errors import ScenarioError, SchemeError

__all__ = ["round_ste", "QConv", "QAdd", "QAvgPool", "QBlock", "FloatHead", "QModel", "INT8_MIN", "INT8_MAX",
           "unit_scale"]

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


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


def _conv_out_hw(hw: tuple[int, int], kernel: int, stride: int) -> tuple[int, int]:
    pad = kernel // 2
    return ((hw[0] + 2 * pad - kernel) // stride + 1, (hw[1] + 2 * pad - kernel) // stride + 1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _grads(*flags: bool) -> tuple[bool, ...]:
    """Which of an op's inputs get a gradient: none outside autograd (evaluation, ``no_grad``)."""
    on = torch.is_grad_enabled()
    return tuple(on and f for f in flags)


_EXACT_F32 = float(1 << 24)  # float32 holds every integer below this exactly


def _int_conv(xc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: "QConv") -> torch.Tensor:
    """The int32 accumulation of an int8 convolution, the same integers on every CPU.

    float32 sums of integers are exact, in any order and with or without FMA, while every
    partial sum stays below 2^24: then the vector kernels of any CPU (AVX-512, AVX2, none)
    give the same integers. When the bound ``K * max|x - z| * max|w| + max|b|`` could pass
    2^24 (wide layers, large biases), the sum runs in float64 (exact below 2^53), slower but
    still exact; the cast back rounds deterministically.
    """
    k = weight[0].numel()
    bound = k * float(xc.abs().max()) * float(weight.abs().max()) + (float(bias.abs().max()) if bias is not None else 0.0)
    if bound < _EXACT_F32:
        return F.conv2d(xc, weight, bias, conv.stride, conv.padding, 1, conv.groups)
    return F.conv2d(xc.double(), weight.double(), None if bias is None else bias.double(),
                    conv.stride, conv.padding, 1, conv.groups).float()


class _QConvFn(torch.autograd.Function):
    """int8 convolution whose backward keeps only what the device keeps.

    Saved for backward: the clamp's 1-bit mask (when a gradient flows through
    this op), the int8 input of the trained channels only (when the weight is
    trained), and a reference to the weight (when the input gradient is needed;
    frozen weights stay in flash). Nothing else.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: "QConv", events: OpEvents, led: Ledger | NullLedger):
        acc = _int_conv(x - conv.x_zero, weight, bias, conv)
        y = torch.round(acc * conv.multiplier().view(1, -1, 1, 1) + conv.y_zero)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.conv, ctx.in_shape, ctx.events, ctx.ledger = conv, x.shape, events, led
        mask = xsel = w = None
        if need_x or need_w or need_b:
            mask = (y >= INT8_MIN) & (y <= INT8_MAX)
        if need_w:
            sel = conv.train_channels
            xsel = (x if sel is None else x[:, sel]).to(torch.int8)
        if need_x:
            w = weight
        ctx.save_for_backward(mask, xsel, w)
        led.check(f"saved:{conv.tag}", events.saved,
                  0 if mask is None else tensor_bytes(mask, "bit") + (xsel.numel() if xsel is not None else 0))
        return y.clamp(INT8_MIN, INT8_MAX)

    @staticmethod
    def backward(ctx, g):
        mask, xsel, w = ctx.saved_tensors
        conv, led, events = ctx.conv, ctx.ledger, ctx.events
        led.check(f"grad:{conv.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        ga = g * mask * conv.multiplier().view(1, -1, 1, 1)
        grad_x = grad_w = grad_b = None
        held = []  # bytes of the gradients this op produces, in the order its events list them
        if ctx.needs_input_grad[2]:
            grad_b = ga.sum(dim=(0, 2, 3))
            held.append(GRAD_BYTES * grad_b.numel())
        if ctx.needs_input_grad[1]:
            sel = conv.train_channels
            xs = xsel.float() - conv.x_zero
            k = conv.kernel_size
            if conv.is_depthwise:
                ch = sel if sel is not None else list(range(conv.out_channels))
                gw = torch.nn.grad.conv2d_weight(xs, (len(ch), 1, k, k), ga[:, ch], conv.stride, conv.padding,
                                                 groups=len(ch))
                grad_w = torch.zeros_like(conv.weight)
                grad_w[ch] = gw
            else:
                ch = sel if sel is not None else list(range(conv.in_channels))
                gw = torch.nn.grad.conv2d_weight(xs, (conv.out_channels, len(ch), k, k), ga, conv.stride, conv.padding,
                                                 groups=1)
                grad_w = torch.zeros_like(conv.weight)
                grad_w[:, ch] = gw
            held.append(GRAD_BYTES * gw.numel())
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.in_shape, w, ga, conv.stride, conv.padding, groups=conv.groups)
            held.append(tensor_bytes(grad_x, "fp32"))
        _check_grads(led, events, held)
        events.backward(led)
        return grad_x, grad_w, grad_b, None, None, None


def _check_grads(led: Ledger | NullLedger, events: OpEvents, held: list[int]) -> None:
    """The gradients an op's backward really produced against those its events planned."""
    planned = [n for _, n, _ in events.param_grads] + [n for _, n in events.input_grads]
    for i, (p, a) in enumerate(zip(planned, held, strict=False)):
        led.check(f"gradient {i} of {events.tag}", p, a)
    led.check(f"gradient count of {events.tag}", len(planned), len(held))


class QConv(_QParamsMixin, nn.Module):
    """An int8 convolution (regular, depthwise or pointwise) with int32 bias and per-channel weight scales.

    Parameters
    ----------
    weight
        int8 values, ``O x I/groups x k x k``.
    bias
        int32 values, ``O`` (scale ``w_scales * x_scale``).
    w_scales
        ``O`` float scales of the weight's output channels.
    x_scale, x_zero, y_scale, y_zero
        Input and output activation quantization.
    stride, groups
        As in ``nn.Conv2d``; padding is ``k // 2``.

    Notes
    -----
    A folded ReLU6 needs no clamp of its own: its output range [0, 6] is the
    int8 range (``y_zero = -128``), so clamping to int8 is the activation.
    ``train_channels`` (set by a sparse-update scheme) restricts the weight
    gradient to some input channels (channels, for a depthwise conv).
    """

    # On the device: int8 weights, int32 biases (fedtiny.models.state reads this).
    WIRE_DTYPES = {"weight": "int8", "bias": "int32"}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, w_scales: torch.Tensor, x_scale: float, x_zero: int,
                 y_scale: float, y_zero: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).clone())
        self.register_buffer("w_scales", torch.as_tensor(w_scales, dtype=torch.float32).clone())
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.stride, self.groups = int(stride), int(groups)
        self.padding = self.weight.shape[-1] // 2
        self.tag = "conv"
        self.relu = False  # a folded ReLU6 follows (set by the model from the layer's role)
        self.skip_tag = ""  # the first conv of a residual block merges the skip gradient
        self.train_channels: list[int] | None = None

    @property
    def kernel_size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.out_channels

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
        return _conv_out_hw(hw, self.kernel_size, self.stride)

    def multiplier(self) -> torch.Tensor:
        """Per-channel effective scale ``s_x * s_w / s_y`` of the requantization."""
        return (self.x_scale * self.w_scales.double() / self.y_scale).float()

    def trained_input_elements(self, in_shape: tuple[int, ...]) -> int:
        """Input elements saved for the weight gradient: the trained channels of an ``N x C x H x W`` input."""
        if not self.weight.requires_grad:
            return 0
        n, _, h, w = in_shape
        if self.train_channels is None:
            return n * (self.out_channels if self.is_depthwise else self.in_channels) * h * w
        return n * len(self.train_channels) * h * w

    def events(self, in_shape: tuple[int, ...], in_tag: str, *, keep_input: bool = False, need_x: bool = False,
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
        inplace = inplace_depthwise and self.is_depthwise and not keep_input
        grads = need_x or need_w or need_b
        n_sel = self.out_channels if self.train_channels is None else len(self.train_channels)
        w_rows = n_sel if self.is_depthwise else self.out_channels
        return OpEvents(
            self.tag, out, () if keep_input else (f"act:{in_tag}",),
            workspace=workspace_bytes(self.kernel_size, self.in_channels, self.is_depthwise, (h, w), (oh, ow), inplace),
            saved=(out + 7) // 8 + (self.trained_input_elements(in_shape) if need_w else 0) if grads else 0,
            inplace=inplace, in_backward=grads, grad_bytes=GRAD_BYTES * out,
            param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * self.out_channels, 1),) * need_b
            + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.trained_weight_elements(), w_rows),) * need_w,
            input_grads=((f"grad:{in_tag}", GRAD_BYTES * _numel(in_shape)),) * need_x,
            # The first conv of a residual block sums the skip's pending gradient into its input gradient.
            releases=(self.skip_tag,) * (need_x and bool(self.skip_tag)))

    def run(self, x: torch.Tensor, in_tag: str = "", keep_input: bool = False,
            quiet: bool = False) -> tuple[torch.Tensor, str]:
        """Forward, reporting buffers to a recording ledger (unless ``quiet``); returns the output and its tag."""
        led = NULL if quiet else active()
        need_x, need_w, need_b = _grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(tuple(x.shape), in_tag, keep_input=keep_input, need_x=need_x, need_w=need_w,
                             need_b=need_b, inplace_depthwise=led.inplace_depthwise)
        y = _QConvFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y, self.tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class _QAddFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, add: "QAdd", events: OpEvents, led: Ledger | NullLedger):
        ra, rb = add.x_scale / add.y_scale, float(add.bparams[0]) / add.y_scale
        y = torch.round((x - add.x_zero) * ra + (b - float(add.bparams[1])) * rb + add.y_zero)
        ctx.ratios, ctx.events, ctx.ledger = (ra, rb), events, led
        mask = None
        if any(ctx.needs_input_grad[:2]):
            mask = (y >= INT8_MIN) & (y <= INT8_MAX)
        led.check(f"saved:{add.tag}", events.saved, 0 if mask is None else tensor_bytes(mask, "bit"))
        ctx.save_for_backward(mask)
        return y.clamp(INT8_MIN, INT8_MAX)

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
    """Residual add: requantize both int8 inputs to the output scale, add, round, clamp.

    ``x`` is the block input (``x_scale``, ``x_zero``); the other input carries
    its own ``b_scale``, ``b_zero`` (the block's last convolution output).
    """

    def __init__(self, x_scale: float, x_zero: int, b_scale: float, b_zero: int, y_scale: float, y_zero: int) -> None:
        super().__init__()
        self.register_buffer("qparams", _qparams(x_scale, x_zero, y_scale, y_zero))
        self.register_buffer("bparams", torch.tensor([b_scale, b_zero], dtype=torch.float64))
        self.tag = "add"

    def events(self, shape: tuple[int, ...], x_tag: str, b_tag: str, *, need_x: bool, need_b: bool) -> OpEvents:
        """The buffers of the add in a training step: ``x`` is the block input, ``b`` the branch (both ``shape``)."""
        out = _numel(shape)
        grads = need_x or need_b
        return OpEvents(self.tag, out, (f"act:{x_tag}", f"act:{b_tag}"), saved=(out + 7) // 8 if grads else 0,
                        in_backward=grads, grad_bytes=GRAD_BYTES * out,
                        input_grads=((f"grad:skip:{self.tag}", GRAD_BYTES * out),) * need_x
                        + ((f"grad:{b_tag}", GRAD_BYTES * out),) * need_b)

    def run(self, x: torch.Tensor, x_tag: str, b: torch.Tensor, b_tag: str) -> tuple[torch.Tensor, str]:
        led = active()
        need_x, need_b = _grads(x.requires_grad, b.requires_grad)
        events = self.events(tuple(b.shape), x_tag, b_tag, need_x=need_x, need_b=need_b)
        y = _QAddFn.apply(x, b, self, events, led)
        events.forward(led)
        return y, self.tag

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.run(x, "", b, "")[0]


class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, events: OpEvents, led: Ledger | NullLedger):
        ctx.in_shape, ctx.events, ctx.ledger = x.shape, events, led
        return torch.round(x.mean(dim=(2, 3), keepdim=True)).clamp(INT8_MIN, INT8_MAX)

    @staticmethod
    def backward(ctx, g):
        led, events = ctx.ledger, ctx.events
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        n, c, h, w = ctx.in_shape
        gx = (g / (h * w)).expand(n, c, h, w).contiguous()
        _check_grads(led, events, [tensor_bytes(gx, "fp32")])
        events.backward(led)
        return gx, None, None


class QAvgPool(nn.Module):
    """Global average pool in the int8 domain: scale and zero point are unchanged, so
    ``mean(x - z) + z = mean(x)``; the MCU sums in int32 and divides with rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.tag = "pool"

    def events(self, in_shape: tuple[int, ...], in_tag: str, *, need_x: bool) -> OpEvents:
        """The buffers of the pool in a training step, for an ``N x C x H x W`` input."""
        out = in_shape[0] * in_shape[1]
        return OpEvents(self.tag, out, (f"act:{in_tag}",), in_backward=need_x, grad_bytes=GRAD_BYTES * out,
                        input_grads=((f"grad:{in_tag}", GRAD_BYTES * _numel(in_shape)),) * need_x)

    def run(self, x: torch.Tensor, in_tag: str = "") -> tuple[torch.Tensor, str]:
        led = active()
        events = self.events(tuple(x.shape), in_tag, need_x=_grads(x.requires_grad)[0])
        y = _PoolFn.apply(x, events, led)
        events.forward(led)
        return y, self.tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class QBlock(nn.Module):
    """Inverted-residual block: optional pointwise expand, depthwise, pointwise project, optional add."""

    def __init__(self, pointwise1: QConv | None, depthwise: QConv, pointwise2: QConv, residual: QAdd | None) -> None:
        super().__init__()
        self.pointwise1, self.depthwise, self.pointwise2, self.residual = pointwise1, depthwise, pointwise2, residual
        depthwise.relu = True
        if pointwise1 is not None:
            pointwise1.relu = True

    def convs(self) -> list[QConv]:
        return [c for c in (self.pointwise1, self.depthwise, self.pointwise2) if c is not None]

    def fusable(self, x: torch.Tensor) -> bool:
        """Expansion and depthwise can run fused: no gradient passes through them."""
        convs = [self.pointwise1, self.depthwise] if self.pointwise1 is not None else []
        return bool(convs) and not x.requires_grad and not any(p.requires_grad for c in convs for p in c.parameters())

    def fused_events(self, in_shape: tuple[int, ...], in_tag: str) -> OpEvents:
        """The buffers of expansion + depthwise run fused (one expanded channel at a time, no gradient)."""
        pw1, dw = self.pointwise1, self.depthwise
        hw = (in_shape[2], in_shape[3])
        mid_hw = pw1.out_hw(hw)
        out_hw = dw.out_hw(mid_hw)
        return OpEvents(dw.tag, in_shape[0] * dw.out_channels * out_hw[0] * out_hw[1],
                        () if self.residual is not None else (f"act:{in_tag}",),
                        workspace=fused_workspace_bytes(pw1.in_channels, dw.kernel_size, mid_hw, out_hw))

    def run(self, x: torch.Tensor, in_tag: str = "") -> tuple[torch.Tensor, str]:
        y, tag = x, in_tag
        convs = self.convs()
        led = active()
        if led.fuse_frozen and self.fusable(x):
            y, _ = self.pointwise1.run(y, tag, quiet=True)
            y, tag = self.depthwise.run(y, "", quiet=True)
            self.fused_events(tuple(x.shape), in_tag).forward(led)
            convs = convs[2:]
        for i, conv in enumerate(convs):
            y, tag = conv.run(y, tag, keep_input=(conv is self.convs()[0] and self.residual is not None))
        if self.residual is not None:
            y, tag = self.residual.run(x, in_tag, y, tag)
        return y, tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


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

    def events(self, in_shape: tuple[int, ...], in_tag: str, *, need_x: bool = False, need_w: bool | None = None,
               need_b: bool | None = None) -> OpEvents:
        """The buffers of the float head in a training step, for pooled ``N x C x 1 x 1`` features (fp32 logits)."""
        need_w = self.weight.requires_grad if need_w is None else need_w
        need_b = self.bias.requires_grad if need_b is None else need_b
        classes = self.weight.shape[0]
        out = 4 * in_shape[0] * classes
        return OpEvents(self.tag, out, (f"act:{in_tag}",), saved=4 * _numel(in_shape) if need_w else 0,
                        in_backward=need_x or need_w or need_b, grad_bytes=GRAD_BYTES * in_shape[0] * classes,
                        param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * classes, 1),) * need_b
                        + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.weight.numel(), classes),) * need_w,
                        input_grads=((f"grad:{in_tag}", GRAD_BYTES * _numel(in_shape)),) * need_x)

    def run(self, x: torch.Tensor, in_tag: str = "") -> tuple[torch.Tensor, str]:
        led = active()
        need_x, need_w, need_b = _grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(tuple(x.shape), in_tag, need_x=need_x, need_w=need_w, need_b=need_b)
        y = _HeadFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y, self.tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class QModel(nn.Module):
    """An int8 MCU network: input quantization, first conv, blocks, optional feature mix, pool, classifier.

    Parameters
    ----------
    input_scale, input_zero
        Quantization of the (normalized) input image.
    input_mean, input_std
        Normalization applied to images in ``[0, 1]`` before quantization.
    input_shape
        ``(C, H, W)`` the network was built and quantized for, when known (a published model's 3x128x128).
    """

    def __init__(self, first_conv: QConv, blocks: list[QBlock], feature_mix: QConv | None, classifier: QConv | FloatHead,
                 input_scale: float, input_zero: int, input_mean: float = 0.0, input_std: float = 1.0,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        self.first_conv = first_conv
        self.blocks = nn.ModuleList(blocks)
        self.feature_mix = feature_mix
        self.pool = QAvgPool()
        self.classifier = classifier
        self.register_buffer("input_params", torch.tensor([input_scale, input_zero, input_mean, input_std],
                                                          dtype=torch.float64))
        first_conv.relu = True
        if feature_mix is not None:
            feature_mix.relu = True
        for i, conv in enumerate(self.convs()):
            conv.tag = f"conv{i}"
        for j, block in enumerate(blocks):
            if block.residual is not None:
                block.residual.tag = f"add{j}"
                block.convs()[0].skip_tag = f"grad:skip:add{j}"
        self.classifier.tag = "classifier"

    def convs(self) -> list[QConv]:
        """Every int8 convolution in forward order (the classifier excluded): the paper's layer indices."""
        out = [self.first_conv]
        for b in self.blocks:
            out += b.convs()
        if self.feature_mix is not None:
            out.append(self.feature_mix)
        return out

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> int8 input (straight-through, so inputs can be attacked by gradient)."""
        scale, zero, mean, std = (float(v) for v in self.input_params)
        return torch.clamp(round_ste((x - mean) / std / scale) + zero, INT8_MIN, INT8_MAX)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        xq = self.quantize_input(x)
        OpEvents("input", xq.numel()).forward(active())
        y, tag = self.first_conv.run(xq, "input")
        for block in self.blocks:
            y, tag = block.run(y, tag)
        if self.feature_mix is not None:
            y, tag = self.feature_mix.run(y, tag)
        return self.pool.run(y, tag)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """int8 pooled features (N x C x 1 x 1) of images in [0, 1]."""
        return self._features(x)[0]

    def int8_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's int8 output (only for an int8 classifier)."""
        if not isinstance(self.classifier, QConv):
            raise TypeError("the classifier is fp32; use forward() for float logits")
        return self.classifier.run(*self._features(x))[0].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: dequantized int8 logits, or the fp32 head's output."""
        y, _ = self.classifier.run(*self._features(x))
        if isinstance(self.classifier, QConv):
            return (y.flatten(1) - self.classifier.y_zero) * self.classifier.y_scale
        return y


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
    if precision == "fp32":
        head: nn.Module = FloatHead(w, torch.zeros(num_classes), x_scale, x_zero)
    elif precision == "int8":
        w_scales = w.abs().max(dim=1).values.clamp_min(1e-8) / 127
        w_int = torch.round(w / w_scales[:, None]).clamp(-127, 127).view(num_classes, cin, 1, 1)
        head = QConv(w_int, torch.zeros(num_classes), w_scales, x_scale, x_zero, 2 * logit_range / 255, 0)
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
