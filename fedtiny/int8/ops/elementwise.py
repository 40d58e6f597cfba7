"""What the ops without parameters share: one autograd function, their step events, run and schedule.

An op without parameters (max pool, mean, concatenation, mul, a lookup activation, a requantize, a
slice) says only what is its own: ``compute(xs, need) -> (y, saved)`` (the int8 forward, exactly as
TFLM's reference kernel, and what its backward keeps), ``gradients(g, saved, need)`` (the exact
step's rule, float32 elementwise or summed in a stated order), ``out_shape(in_shapes)`` and
``saved_bytes(in_shapes, need)`` (what the device keeps for the backward). :class:`ParameterFreeOp`
turns those into the graph's ``run`` and the planner's ``schedule``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fedtiny.int8.ledger import GRAD_BYTES, NULL, Ledger, NullLedger, OpEvents, active, tensor_bytes
from fedtiny.int8.ops.base import Wiring, check_grads, grads, numel

__all__ = ["ParameterFreeOp", "op_events"]


def op_events(
    tag: str, out: int, in_shapes: Sequence[tuple[int, ...]], wiring: Wiring, need: Sequence[bool], saved: int = 0
) -> OpEvents:
    """The buffers of an op without parameters: its output (``out`` elements), what it keeps for the
    backward (``saved`` bytes, when a gradient flows) and one float gradient per input that needs one."""
    flows = any(need)
    return OpEvents(
        tag,
        out,
        wiring.frees(),
        saved=saved if flows else 0,
        in_backward=flows,
        grad_bytes=GRAD_BYTES * out,
        input_grads=tuple((wiring.grad_tags[i], GRAD_BYTES * numel(s)) for i, s in enumerate(in_shapes) if need[i]),
    )


class _OpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: "ParameterFreeOp", events: OpEvents, led: Ledger | NullLedger, *xs):
        need = ctx.needs_input_grad[3:]
        y, saved = op.compute(xs, need)
        ctx.op, ctx.events, ctx.ledger, ctx.saved = op, events, led, saved
        ctx.shapes = [tuple(x.shape) for x in xs]
        led.check(f"saved:{op.tag}", events.saved, op.saved_bytes(ctx.shapes, need) if any(need) else 0)
        return y

    @staticmethod
    def backward(ctx, g):
        led, events = ctx.ledger, ctx.events
        led.check(f"grad:{events.tag}", events.grad_bytes, tensor_bytes(g, "fp32"))
        need = ctx.needs_input_grad[3:]
        gxs = ctx.op.gradients(g.contiguous(), ctx.saved, need, ctx.shapes)
        check_grads(led, events, [tensor_bytes(gx, "fp32") for gx in gxs if gx is not None])
        events.backward(led)
        return (None, None, None, *gxs)


class ParameterFreeOp(nn.Module):
    """An op without parameters of the int8 graph (subclasses say what is their own; see the module).

    Its quantization (scales and zero points) is the float64 buffer ``qparams``, so that it travels with
    the model's state (the cloud model's, a checkpoint's); what TFLM derives from it (multipliers,
    tables) is recomputed whenever it changes (:meth:`derived`).
    """

    tag = "op"

    def __init__(self, qparams: Sequence[float]) -> None:
        super().__init__()
        if len(qparams):  # an op that copies its input's quantization (a slice) has none
            self.register_buffer("qparams", torch.tensor([float(v) for v in qparams], dtype=torch.float64))
        self._derived_key: tuple | None = None
        self._derived: Any = None

    def q(self, i: int) -> tuple[float, int]:
        """The ``i``-th (scale, zero point) pair of ``qparams``."""
        return float(self.qparams[2 * i]), int(self.qparams[2 * i + 1])

    def derived(self) -> Any:
        """What :meth:`derive` computes from the quantization, recomputed when ``qparams`` changes."""
        key = tuple(self.qparams.tolist())
        if key != self._derived_key:
            self._derived, self._derived_key = self.derive(), key
        return self._derived

    def derive(self) -> Any:
        return None

    def compute(self, xs: Sequence[torch.Tensor], need: Sequence[bool]) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def gradients(
        self, g: torch.Tensor, saved: Any, need: Sequence[bool], shapes: Sequence[tuple[int, ...]]
    ) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def out_shape(self, in_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """Per-sample output shape (C, H, W) for inputs of ``in_shapes`` (batch first)."""
        raise NotImplementedError

    def saved_bytes(self, in_shapes: Sequence[tuple[int, ...]], need: Sequence[bool]) -> int:
        """Bytes kept for the backward when a gradient flows (default: none)."""
        return 0

    def events(self, in_shapes: Sequence[tuple[int, ...]], wiring: Wiring, need: Sequence[bool]) -> OpEvents:
        out = in_shapes[0][0] * numel(self.out_shape(in_shapes))
        return op_events(self.tag, out, in_shapes, wiring, need, self.saved_bytes(in_shapes, need))

    def schedule(self, ins, wiring: Wiring, need, *, inplace_depthwise: bool = True):
        """Output shape (per sample) and buffers of the op in a training step."""
        return self.out_shape(ins), self.events(ins, wiring, need)

    def run(self, inputs: Sequence[torch.Tensor], wiring: Wiring | None = None, quiet: bool = False) -> torch.Tensor:
        led = NULL if quiet else active()
        need = grads(*(x.requires_grad for x in inputs))
        events = self.events([tuple(x.shape) for x in inputs], wiring or Wiring.single(len(inputs)), need)
        y = _OpFn.apply(self, events, led, *inputs)
        events.forward(led)
        return y

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.run(list(xs))
