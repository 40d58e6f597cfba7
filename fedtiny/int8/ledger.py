"""The ledger: SRAM buffers allocated and released over one training step.

Each op of the int8 graph describes the buffers it holds as :class:`OpEvents`
(forward activation, workspace, what it saves for backward, the gradients it
produces), computed by the op itself from its input shape. The same events feed two
walks of the step:

- while a :class:`Ledger` is recording, the int8 graph replays each op's events as
  a real training step runs (autograd decides the backward order), and checks the
  sizes against the tensors it actually saves and produces;
- the planner (:mod:`fedtiny.budget.memory`) replays them from the model's shapes
  alone, in schedule order.

The tests hold the two peaks (and their event lists) equal. Persistent state (trained
parameters copied to SRAM, optimizer state) is allocated by the caller. When nothing
is recording, :func:`active` returns :data:`NULL`, whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = [
    "Ledger",
    "NullLedger",
    "NULL",
    "OpEvents",
    "recording",
    "active",
    "tensor_bytes",
    "GRAD_BYTES",
    "workspace_bytes",
    "fused_workspace_bytes",
]

GRAD_BYTES = 4  # activation and parameter gradients are fp32/int32 on the device


def tensor_bytes(t: torch.Tensor | tuple[int, ...], kind: str = "int8") -> int:
    """Bytes of a tensor (or shape) held as ``int8``, ``bit`` (packed mask), ``fp32``/``int32``."""
    n = math.prod(t.shape) if isinstance(t, torch.Tensor) else math.prod(t)
    return {"int8": n, "bit": (n + 7) // 8, "fp32": 4 * n, "int32": 4 * n}[kind]


SMALL_PLANE_BYTES = 256  # the C step pads planes up to this size byte by byte (fedtiny_step_forward.c: pad_plane)


def workspace_bytes(
    kernel: tuple[int, int],
    cin: int,
    depthwise: bool,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    inplace: bool,
    padding: tuple[int, int, int, int],
) -> int:
    """Scratch memory of one int8 convolution (TinyEngine-style kernels).

    Regular/pointwise: an im2col buffer of two output columns in q15 (2 bytes).
    Depthwise: one zero-padded input channel (int8), plus one output plane when it
    writes back in place. A regular convolution of one input channel over a small map
    (its padded plane at most ``SMALL_PLANE_BYTES``) pads that plane once and reads
    each output channel from it as a depthwise window: the larger of the two.
    """
    kh, kw = kernel
    pt, pb, pl, pr = padding
    plane = (in_hw[0] + pt + pb) * (in_hw[1] + pl + pr)
    if depthwise:
        return plane + (out_hw[0] * out_hw[1] if inplace else 0)
    cols = 2 * kh * kw * cin * 2
    if cin == 1 and plane <= SMALL_PLANE_BYTES:
        return max(cols, plane)
    return cols


def fused_workspace_bytes(
    cin: int,
    kernel: tuple[int, int],
    mid_hw: tuple[int, int],
    out_hw: tuple[int, int],
    padding: tuple[int, int, int, int],
) -> int:
    """Scratch of a fused expansion + depthwise: pointwise columns (q15), one zero-padded expanded
    channel plane (int8), and one output plane."""
    pt, pb, pl, pr = padding
    return 2 * cin * 2 + (mid_hw[0] + pt + pb) * (mid_hw[1] + pl + pr) + out_hw[0] * out_hw[1]


@dataclass
class Ledger:
    """Live buffers over one training step, and the peak.

    Parameters
    ----------
    reorder
        Apply each weight gradient as soon as it is computed (its buffer is
        transient); otherwise all parameter gradients live until the optimizer step.
    inplace_depthwise
        Depthwise convolutions write their output over their input (TinyEngine).
    fuse_frozen
        A block's pointwise expansion and depthwise convolution run fused, one
        expanded channel at a time, where no gradient will pass (the expanded
        activation is never materialized).
    accumulate
        The step trains more samples than one micro-batch: each parameter
        gradient is added to an fp32 accumulator held over the whole step
        (allocated by the caller), so no per-op parameter-gradient buffer exists.
    """

    reorder: bool = True
    inplace_depthwise: bool = True
    fuse_frozen: bool = True
    accumulate: bool = False
    live: dict[str, int] = field(default_factory=dict)
    current: int = 0
    peak: int = 0
    peak_at: str = ""
    events: list[tuple[str, str, int, int]] = field(default_factory=list)  # (op, tag, +/-bytes, total)

    def alloc(self, tag: str, nbytes: int, where: str = "") -> None:
        if nbytes <= 0:
            return
        if tag in self.live:
            raise RuntimeError(f"ledger: buffer {tag!r} allocated twice")
        self.live[tag] = nbytes
        self.current += nbytes
        self.events.append((where, tag, nbytes, self.current))
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, where or tag

    def free(self, tag: str, where: str = "") -> None:
        nbytes = self.live.pop(tag, 0)
        if nbytes:
            self.current -= nbytes
            self.events.append((where, tag, -nbytes, self.current))

    def transient(self, tag: str, nbytes: int, where: str = "") -> None:
        """A buffer that exists only during one op (workspace, an immediately applied gradient)."""
        self.alloc(tag, nbytes, where)
        self.free(tag, where)

    def ensure(self, tag: str, nbytes: int, where: str = "") -> None:
        """Allocate ``tag`` unless it is live (the loss gradient arrives without an op of ours)."""
        if tag not in self.live:
            self.alloc(tag, nbytes, where)

    def param_grad(self, tag: str, nbytes: int, rows: int, where: str = "") -> None:
        """A weight or bias gradient of ``rows`` output channels.

        With reordering it is computed and applied one output channel at a time
        (a transient row); otherwise the whole gradient is kept until the step.
        Accumulated gradients go straight into their accumulator.
        """
        if self.accumulate:
            return
        if self.reorder:
            self.transient(tag, nbytes // max(rows, 1), where)
        else:
            self.alloc(tag, nbytes, where)

    def peak_without(self, *prefixes: str) -> int:
        """The peak of the live bytes, not counting buffers whose tag starts with one of ``prefixes``."""
        current = peak = 0
        for _, tag, nbytes, _ in self.events:
            if not tag.startswith(prefixes):
                current += nbytes
                peak = max(peak, current)
        return peak

    def step_done(self) -> None:
        """The optimizer step: kept parameter gradients are released."""
        for tag in [t for t in self.live if t.startswith("pgrad:")]:
            self.free(tag, "step")

    def check(self, what: str, planned: int, actual: int) -> None:
        """A size an op planned from shapes against the bytes of the tensor it really holds."""
        if planned != actual:
            raise RuntimeError(f"ledger: {what}: planned {planned} bytes, the step holds {actual}")


class NullLedger:
    """The ledger when nothing records: every event is a no-op, so ops need no ``None`` checks."""

    reorder = inplace_depthwise = fuse_frozen = accumulate = False

    def alloc(self, tag: str, nbytes: int, where: str = "") -> None:
        pass

    def free(self, tag: str, where: str = "") -> None:
        pass

    def transient(self, tag: str, nbytes: int, where: str = "") -> None:
        pass

    def ensure(self, tag: str, nbytes: int, where: str = "") -> None:
        pass

    def param_grad(self, tag: str, nbytes: int, rows: int, where: str = "") -> None:
        pass

    def check(self, what: str, planned: int, actual: int) -> None:
        pass


NULL = NullLedger()
_ACTIVE: Ledger | NullLedger = NULL


@dataclass(frozen=True)
class OpEvents:
    """The buffers one op of a training step allocates and releases, in bytes.

    Attributes
    ----------
    tag
        The op's name; its output activation is ``act:<tag>``, its output gradient ``grad:<tag>``.
    out_bytes
        Output activation.
    frees
        Buffers the forward releases once it has run (inputs no later op reads).
    workspace
        Scratch held only while the op runs.
    saved
        What the op keeps for its backward (``saved:<tag>``).
    inplace
        The output overwrites the input (allocated after the input is released).
    in_backward
        A gradient reaches the op (it runs in the backward pass).
    grad_bytes
        Output gradient.
    param_grads
        ``(tag, bytes, rows)`` of each parameter gradient, in the order computed.
    input_grads
        ``(tag, bytes)`` of each gradient the op passes upstream.
    """

    tag: str
    out_bytes: int
    frees: tuple[str, ...] = ()
    workspace: int = 0
    saved: int = 0
    inplace: bool = False
    in_backward: bool = False
    grad_bytes: int = 0
    param_grads: tuple[tuple[str, int, int], ...] = ()
    input_grads: tuple[tuple[str, int], ...] = ()

    def forward(self, led: Ledger | NullLedger) -> None:
        """Replay the forward's buffers."""
        t, where = self.tag, f"fw:{self.tag}"
        if not self.inplace:
            led.alloc(f"act:{t}", self.out_bytes, where)
        led.transient(f"ws:{t}", self.workspace, where)
        led.alloc(f"saved:{t}", self.saved, where)
        for tag in self.frees:
            led.free(tag, where)
        if self.inplace:
            led.alloc(f"act:{t}", self.out_bytes, where)

    def backward(self, led: Ledger | NullLedger) -> None:
        """Replay the backward's buffers (the loss gradient of the last op arrives on its own)."""
        t, where = self.tag, f"bw:{self.tag}"
        led.free(f"act:{t}", where)
        led.ensure(f"grad:{t}", self.grad_bytes, where)
        # the input gradient first: it needs the old weights, which a reordered update then overwrites;
        # a later reader of the same input has taken it already (this op adds into it)
        for tag, nbytes in self.input_grads:
            led.ensure(tag, nbytes, where)
        for tag, nbytes, rows in self.param_grads:
            led.param_grad(tag, nbytes, rows, where)
        led.free(f"grad:{t}", where)
        led.free(f"saved:{t}", where)


def active() -> Ledger | NullLedger:
    """The ledger recording now (:data:`NULL` when none is)."""
    return _ACTIVE


@contextlib.contextmanager
def recording(ledger: Ledger) -> Iterator[Ledger]:
    """Record the int8 graph's buffers into ``ledger`` inside the block."""
    global _ACTIVE
    if _ACTIVE is not NULL:
        raise RuntimeError("a ledger is already recording")
    _ACTIVE = ledger
    try:
        yield ledger
    finally:
        _ACTIVE = NULL
