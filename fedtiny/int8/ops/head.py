"""A float classifier on dequantized int8 features (``model.classifier_precision = fp32``)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8.ledger import GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, tensor_bytes
from fedtiny.int8.ops.base import Wiring, check_grads, grads, numel
from fedtiny.int8.ops.registry import OpKind, register


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
        check_grads(led, events, held)
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

    def events(
        self,
        in_shape: tuple[int, ...],
        wiring: Wiring,
        *,
        need_x: bool = False,
        need_w: bool | None = None,
        need_b: bool | None = None,
    ) -> OpEvents:
        """The buffers of the float head in a training step, for pooled ``N x C x 1 x 1`` features (fp32 logits)."""
        need_w = self.weight.requires_grad if need_w is None else need_w
        need_b = self.bias.requires_grad if need_b is None else need_b
        classes = self.weight.shape[0]
        out = 4 * in_shape[0] * classes
        return OpEvents(
            self.tag,
            out,
            wiring.frees(),
            saved=4 * numel(in_shape) if need_w else 0,
            in_backward=need_x or need_w or need_b,
            grad_bytes=GRAD_BYTES * in_shape[0] * classes,
            param_grads=((f"pgrad:{self.tag}:b", GRAD_BYTES * classes, 1),) * need_b
            + ((f"pgrad:{self.tag}:w", GRAD_BYTES * self.weight.numel(), classes),) * need_w,
            input_grads=((wiring.grad_tags[0], GRAD_BYTES * numel(in_shape)),) * need_x,
        )

    def schedule(self, ins, wiring: Wiring, need, *, inplace_depthwise: bool = True):
        """Output shape (per sample) and buffers of the op in a training step, from its inputs' shapes
        (``ins``, batch first) and whether a gradient must reach each input (``need``)."""
        return (int(self.weight.shape[0]),), self.events(ins[0], wiring, need_x=need[0])

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        (x,) = inputs
        led = NULL if quiet else active()
        need_x, need_w, need_b = grads(x.requires_grad, self.weight.requires_grad, self.bias.requires_grad)
        events = self.events(tuple(x.shape), wiring or Wiring.single(), need_x=need_x, need_w=need_w, need_b=need_b)
        y = _HeadFn.apply(x, self.weight, self.bias, self, events, led)
        events.forward(led)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run([x])


# ---------------------------------------------------------------- the kind


def _write(wr, m: FloatHead, name: str, ins):
    raise ModelFileError(
        "export: an fp32 classifier cannot run in TFLM's int8 graph; use model.classifier_precision = int8"
    )


KIND = register(
    OpKind(
        "float-head",
        FloatHead,
        write=_write,
        describe=lambda m: {"in": int(m.weight.shape[1]), "out": int(m.weight.shape[0])},
        build=lambda d, where: FloatHead(torch.zeros(int(d["out"]), int(d["in"])), torch.zeros(int(d["out"])), 1.0, 0),
    )
)
