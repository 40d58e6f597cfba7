"""Convolution (regular, depthwise, grouped, pointwise) and fully connected, int8 with int32 bias."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.errors import ModelFileError, SchemeError
from fedtiny.int8 import exact, kernels, native
from fedtiny.int8.ledger import GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, tensor_bytes, workspace_bytes
from fedtiny.int8.ops.base import (
    ACTIVATIONS,
    CKind,
    QParamsMixin,
    Wiring,
    check_grads,
    grads,
    layout_ints,
    numel,
    qparams,
)
from fedtiny.int8.ops.registry import OpKind, register
from fedtiny.int8.optimizers import optimizer_kind


def _input_tap_l1(w: torch.Tensor, groups: int) -> float:
    """The largest L1 norm of the weights one input channel meets (within its group: a depthwise
    channel meets only its own taps), which bounds each sum of its input gradient."""
    o, c, kh, kw = w.shape
    return float(w.abs().reshape(groups, o // groups, c, kh * kw).sum(dim=(1, 3)).max())


def _per_sample_weightgrads(
    x: torch.Tensor, shape: tuple[int, ...], g: torch.Tensor, stride, padding, groups: int
) -> torch.Tensor:
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
        led.check(
            f"saved:{conv.tag}",
            events.saved,
            0 if mask is None else tensor_bytes(mask, "bit") + (xsel.numel() if xsel is not None else 0),
        )
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
            per = _per_sample_weightgrads(xs, shape, gq, conv.stride, pad, groups)
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
                gp = torch.nn.grad.conv2d_input(
                    (n, c, h + pt + pb, wd + pl + pr), wq, gq, conv.stride, 0, groups=conv.groups
                )
                grad_x = scaled(gp[:, :, pt : pt + h, pl : pl + wd].contiguous())
            held.append(tensor_bytes(grad_x, "fp32"))
        check_grads(led, events, held)
        events.backward(led)
        return grad_x, grad_w, grad_b, None, None, None


class QConv(QParamsMixin, nn.Module):
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

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        w_scales: torch.Tensor,
        x_scale: float,
        x_zero: int,
        y_scale: float,
        y_zero: int,
        stride: int = 1,
        groups: int = 1,
        *,
        padding: tuple[int, int, int, int] | None = None,
        activation: str = "NONE",
        kind: str | None = None,
    ) -> None:
        super().__init__()
        # Contiguous copies: a transposed import must not reach the wire or a file with its strides.
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).contiguous().clone())
        # float64: every int32 bias exactly (float32 rounds those beyond 2^24, which pretrained
        # models have on near-dead channels: VWW has 973), and the int32 range TFLM saturates to
        self.bias = nn.Parameter(
            torch.as_tensor(bias, dtype=torch.float64).clamp(-(2**31), 2**31 - 1).contiguous().clone()
        )
        self.register_buffer("w_scales", torch.as_tensor(w_scales, dtype=torch.float32).contiguous().clone())
        self.register_buffer("qparams", qparams(x_scale, x_zero, y_scale, y_zero))
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

    def requantize_clamp(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, want_mask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def events(
        self,
        in_shape: tuple[int, ...],
        wiring: Wiring,
        *,
        need_x: bool = False,
        need_w: bool | None = None,
        need_b: bool | None = None,
        inplace_depthwise: bool = True,
    ) -> OpEvents:
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
            self.tag,
            out,
            wiring.frees(),
            workspace=workspace_bytes(
                self.kernel_hw, self.in_channels, self.is_depthwise, (h, w), (oh, ow), inplace, self.padding
            ),
            saved=(out + 7) // 8 + (self.trained_input_elements(in_shape) if need_w else 0) if grads else 0,
            inplace=inplace,
            in_backward=grads,
            grad_bytes=GRAD_BYTES * out,
            param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * self.out_channels, 1),) * need_b
            + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.trained_weight_elements(), w_rows),) * need_w,
            input_grads=((wiring.grad_tags[0], GRAD_BYTES * numel(in_shape)),) * need_x,
        )

    def schedule(self, ins, wiring: Wiring, need, *, inplace_depthwise: bool = True):
        """Output shape (per sample) and buffers of the op in a training step, from its inputs' shapes
        (``ins``, batch first) and whether a gradient must reach each input (``need``)."""
        return (
            (self.out_channels, *self.out_hw(ins[0][2:])),
            self.events(ins[0], wiring, need_x=need[0], inplace_depthwise=inplace_depthwise),
        )

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        """Forward, reporting buffers to a recording ledger (unless ``quiet``)."""
        (x,) = inputs
        led = NULL if quiet else active()
        need_x, need_w, need_b = grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(
            tuple(x.shape),
            wiring or Wiring.single(),
            need_x=need_x,
            need_w=need_w,
            need_b=need_b,
            inplace_depthwise=led.inplace_depthwise,
        )
        y = _QConvFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- the kind: .tflite, model file, C step

_DEPTHWISE, _CONV, _FC = "DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED"


def _read(rd, k: int, op) -> tuple[QConv, tuple[str, ...]]:
    """CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED (the last weighted operator is the head)."""
    label = rd.label(k, op)
    x = rd.tensor(op.inputs[0])
    inputs = (rd.names[op.inputs[0]],)
    wt = rd.tensor(op.inputs[1])
    w = np.asarray(wt.data, np.int8)
    if op.op == _FC:
        if op.options.get("keep_num_dims"):
            raise ModelFileError(f"{label}: keep_num_dims is not supported")
        o = w.shape[0]
        if len(x.shape) == 4 and rd.hw(x) != (1, 1):
            inputs = (rd.flatten(inputs[0], int(np.prod(x.shape[1:]))),)
        weight, kind, stride, padding, groups = w.reshape(o, -1, 1, 1), "fc", 1, (0, 0, 0, 0), 1
    elif op.op == _CONV:
        o = w.shape[0]
        weight, kind, groups = w.transpose(0, 3, 1, 2), "conv", 1
        stride = rd.stride(op, label)
        padding = rd.padding(op, x, w.shape[1:3])
    else:
        o, c_in = w.shape[3], x.shape[3]
        if c_in < 1 or o % c_in:
            raise ModelFileError(f"{label}: {o} output channels are not a multiple of the {c_in} input channels")
        # a depth multiplier m above 1 is a convolution of c_in groups of m outputs each (output
        # c * m + j reads input c, as TFLite orders them); kind from the groups
        weight, groups = w.transpose(3, 0, 1, 2), c_in
        kind = "depthwise" if o == c_in else None
        stride = rd.stride(op, label)
        padding = rd.padding(op, x, w.shape[1:3])
    bias = op.inputs[2] if len(op.inputs) > 2 else -1
    bias_values = np.zeros(o, np.int32) if bias < 0 else np.asarray(rd.tensor(bias).data, np.int32).reshape(o)
    scales = np.asarray(wt.scales, np.float32)
    scales = np.full(o, scales[0], np.float32) if scales.size == 1 else scales.reshape(o)
    module = QConv(
        torch.from_numpy(weight.astype(np.float32)),
        torch.from_numpy(bias_values.astype(np.float64)),
        torch.from_numpy(scales),
        *rd.q(op.inputs[0]),
        *rd.q(op.outputs[0]),
        stride,
        groups,
        padding=padding,
        activation=op.options.get("fused_activation", "NONE"),
        kind=kind,
    )
    module.tag = "classifier" if k == rd.head_k else rd.name("conv")
    return module, inputs


def _write(wr, m: QConv, name: str, ins):
    """A QConv as CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED, with a PAD first when it needs one."""
    xi, xshape, xrank, _ = ins[0]
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
        wr.op(_FC, (xi, wi, bi), (out,), fused_activation=m.activation, weights_format="DEFAULT", keep_num_dims=False)
        return out, oshape, 2, (m.y_scale, m.y_zero)
    kh, kw = m.kernel_hw
    if xrank == 2:  # a convolution reads NHWC: a [N, C] input (a MEAN without kept dims) is reshaped first
        shp = wr.tensor(f"{name}/input_shape", (4,), "int32", data=np.asarray((1, 1, 1, xshape[1]), np.int32))
        xi4 = wr.tensor(f"{name}/input4", (1, 1, 1, xshape[1]), scale=m.x_scale, zero=m.x_zero)
        wr.op("RESHAPE", (xi, shp), (xi4,), new_shape=(1, 1, 1, xshape[1]))
        xi = xi4
    mode = wr.pad_mode(m.padding, xshape[2:], (kh, kw), m.stride)
    if mode is None:  # e.g. PyTorch's symmetric padding of a stride-2 conv on an even input
        pt, pb, pl, pr = m.padding
        pshape = (xshape[0], xshape[1], xshape[2] + pt + pb, xshape[3] + pl + pr)
        pads = np.asarray([[0, 0], [pt, pb], [pl, pr], [0, 0]], np.int32)
        pi = wr.tensor(f"{name}/paddings", (4, 2), "int32", data=pads)
        po = wr.tensor(f"{name}/padded", wr.shape(pshape, 4), scale=m.x_scale, zero=m.x_zero)
        wr.op("PAD", (xi, pi), (po,))
        xi, mode = po, "VALID"
    bscale = (ws.astype(np.float32) * xs).astype(np.float32)
    out = wr.tensor(name, wr.shape(oshape, 4), scale=m.y_scale, zero=m.y_zero)
    if m.depth_multiplier:  # one input channel per group: output c * m + j reads input c, TFLite's order too
        wi = wr.tensor(
            f"{name}/weight",
            (1, kh, kw, m.out_channels),
            scale=ws,
            qdim=3,
            data=np.ascontiguousarray(w.transpose(1, 2, 3, 0)),
        )
        bi = wr.tensor(f"{name}/bias", b.shape, "int32", scale=bscale, data=b)
        wr.op(
            _DEPTHWISE,
            (xi, wi, bi),
            (out,),
            padding=mode,
            stride_h=m.stride,
            stride_w=m.stride,
            depth_multiplier=m.depth_multiplier,
            fused_activation=m.activation,
            dilation_h=1,
            dilation_w=1,
        )
        return out, oshape, 4, (m.y_scale, m.y_zero)
    if m.groups != 1:
        raise ModelFileError(f"export: {name}: grouped convolutions have no TFLM form")
    wi = wr.tensor(
        f"{name}/weight",
        (m.out_channels, kh, kw, m.in_channels),
        scale=ws,
        qdim=0,
        data=np.ascontiguousarray(w.transpose(0, 2, 3, 1)),
    )
    bi = wr.tensor(f"{name}/bias", b.shape, "int32", scale=bscale, data=b)
    wr.op(
        _CONV,
        (xi, wi, bi),
        (out,),
        padding=mode,
        stride_h=m.stride,
        stride_w=m.stride,
        fused_activation=m.activation,
        dilation_h=1,
        dilation_w=1,
    )
    return out, oshape, 4, (m.y_scale, m.y_zero)


def _describe(m: QConv) -> dict:
    return {
        "kind": m.kind,
        "in": m.in_channels,
        "out": m.out_channels,
        "kernel": list(m.kernel_hw),
        "stride": m.stride,
        "groups": m.groups,
        "padding": list(m.padding),
        "activation": m.activation,
        "relu": m.relu,
    }


def build(d: dict, where: str) -> QConv:
    """A convolution of the model file's layout ``d`` (placeholder values)."""
    try:
        cin, cout, stride, groups = (int(d[key]) for key in ("in", "out", "stride", "groups"))
        k = d["kernel"]
        kh, kw = (int(k), int(k)) if isinstance(k, int) else layout_ints(d, "kernel", 2, where)
        padding = layout_ints(d, "padding", 4, where) if "padding" in d else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where}: bad convolution layout {d!r} ({exc})") from None
    if (
        min(cin, cout, kh, kw, stride, groups) < 1
        or cin % groups
        or cout % groups
        or max(kh, kw) > 15
        or (padding is not None and (min(padding) < 0 or max(padding) >= max(kh, kw)))
    ):
        raise ModelFileError(f"{where}: impossible convolution {d!r}")
    conv = QConv(
        torch.zeros(cout, cin // groups, kh, kw),
        torch.zeros(cout),
        torch.ones(cout),
        1.0,
        0,
        1.0,
        0,
        stride,
        groups,
        padding=padding,
        activation=str(d.get("activation", "NONE")),
        kind=d.get("kind") if d.get("kind") in ("conv", "depthwise", "fc") else None,
    )
    conv.relu = bool(d.get("relu", conv.relu))
    return conv


def _c_fill(cs, op, conv: QConv, in_ids, in_shape) -> None:
    """The convolution's fields of an ``ft_op``: geometry, TFLM's multipliers, trained channels, QAS, momentum."""
    op.kind = CKind.CONV
    op.kh, op.kw = conv.kernel_hw
    op.stride, op.groups = conv.stride, conv.groups
    op.pad_t, op.pad_l = conv.padding[0], conv.padding[2]
    op.x_zero, op.y_zero = conv.x_zero, conv.y_zero
    op.act_lo, op.act_hi = conv.act_range()
    op.inplace, op.fuse_next, op.workspace = cs.layout.get(conv.tag, (0, 0, 0))
    weight = cs.array(conv.weight.detach().numpy().astype(np.int8))
    bias = cs.array(conv.bias.detach().numpy().astype(np.int32))
    mult, shift = conv.quantized_multiplier()
    op.weight, op.bias = cs.ptr(weight), cs.ptr(bias)
    op.mult = cs.ptr(cs.array(mult.numpy().astype(np.int32)))
    op.shift = cs.ptr(cs.array(shift.numpy().astype(np.int32)))
    op.eff_scale = cs.ptr(cs.array(conv.multiplier().numpy().astype(np.float32)))
    ws = conv.w_scales.double()
    if optimizer_kind(cs.optimizer).qas:
        op.qas_w = cs.ptr(cs.array((ws**-2).float().numpy()))
        op.qas_b = cs.ptr(cs.array(((ws * conv.x_scale) ** -2).float().numpy()))
    if conv.train_channels is not None:
        n = conv.out_channels if conv.is_depthwise else conv.in_channels
        flags = np.zeros(n, np.uint8)
        flags[conv.train_channels] = 1
        op.train_channels = cs.ptr(cs.array(flags))
        slots = np.full(n + 1, -1, np.int32)  # each trained channel's rank; the count last
        slots[np.flatnonzero(flags)] = np.arange(int(flags.sum()), dtype=np.int32)
        slots[n] = int(flags.sum())
        op.slot_of = cs.ptr(cs.array(slots))
    op.train_w, op.train_b, op.slot = int(conv.weight.requires_grad), int(conv.bias.requires_grad), conv.slot
    if cs.momentum > 0 and conv.weight.requires_grad:  # state of trained tensors only
        op.mom_w = cs.ptr(cs.array(np.zeros(conv.weight.numel(), np.float32)))
    if cs.momentum > 0 and conv.bias.requires_grad:
        op.mom_b = cs.ptr(cs.array(np.zeros(conv.out_channels, np.float32)))
    cs.params.append((conv, weight, bias))


KIND = register(
    OpKind(
        "conv",
        QConv,
        (_CONV, _DEPTHWISE, _FC),
        read=_read,
        write=_write,
        describe=_describe,
        build=build,
        c_kind=CKind.CONV,
        c_fill=_c_fill,
    )
)
