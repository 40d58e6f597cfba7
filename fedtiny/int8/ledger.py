"""The ledger: SRAM buffers allocated and released while a real training step runs.

While a :class:`Ledger` is recording, the int8 graph's ops report every buffer a
device would hold: forward activations (int8), tensors saved for backward (int8
inputs of trained channels, 1-bit clamp masks), activation gradients (fp32),
weight/bias gradients, per-op workspaces, and the step's persistent state
(trained parameters copied to SRAM, optimizer state). Its peak is what the memory
planner (:mod:`fedtiny.budget.memory`) predicts from the model's shapes alone; the tests
hold them equal.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["Ledger", "recording", "active", "tensor_bytes", "GRAD_BYTES", "workspace_bytes", "fused_workspace_bytes"]

GRAD_BYTES = 4  # activation and parameter gradients are fp32/int32 on the device
_ACTIVE: "Ledger | None" = None


def tensor_bytes(t: torch.Tensor | tuple[int, ...], kind: str = "int8") -> int:
    """Bytes of a tensor (or shape) held as ``int8``, ``bit`` (packed mask), ``fp32``/``int32``."""
    n = math.prod(t.shape) if isinstance(t, torch.Tensor) else math.prod(t)
    return {"int8": n, "bit": (n + 7) // 8, "fp32": 4 * n, "int32": 4 * n}[kind]


def workspace_bytes(kernel: int, cin: int, depthwise: bool, in_hw: tuple[int, int], out_hw: tuple[int, int],
                    inplace: bool) -> int:
    """Scratch memory of one int8 convolution (TinyEngine-style kernels).

    Regular/pointwise: an im2col buffer of two output columns in q15 (2 bytes).
    Depthwise: one zero-padded input channel (int8), plus one output plane when it
    writes back in place.
    """
    if depthwise:
        pad = kernel // 2
        ws = (in_hw[0] + 2 * pad) * (in_hw[1] + 2 * pad)
        return ws + (out_hw[0] * out_hw[1] if inplace else 0)
    return 2 * kernel * kernel * cin * 2


def fused_workspace_bytes(cin: int, kernel: int, mid_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Scratch of a fused expansion + depthwise: pointwise columns (q15), one zero-padded expanded
    channel plane (int8), and one output plane."""
    pad = kernel // 2
    return 2 * cin * 2 + (mid_hw[0] + 2 * pad) * (mid_hw[1] + 2 * pad) + out_hw[0] * out_hw[1]


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
    """

    reorder: bool = True
    inplace_depthwise: bool = True
    fuse_frozen: bool = True
    live: dict[str, int] = field(default_factory=dict)
    current: int = 0
    peak: int = 0
    peak_at: str = ""
    events: list[tuple[str, str, int, int]] = field(default_factory=list)  # (op, tag, +/-bytes, total)
    at_peak: dict[str, int] = field(default_factory=dict)  # the live buffers when the peak was reached

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
            self.at_peak = dict(self.live)

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
        """
        if self.reorder:
            self.transient(tag, nbytes // max(rows, 1), where)
        else:
            self.alloc(tag, nbytes, where)

    def step_done(self) -> None:
        """The optimizer step: kept parameter gradients are released."""
        for tag in [t for t in self.live if t.startswith("pgrad:")]:
            self.free(tag, "step")


def active() -> Ledger | None:
    """The ledger recording now, if any."""
    return _ACTIVE


@contextlib.contextmanager
def recording(ledger: Ledger) -> Iterator[Ledger]:
    """Record the int8 graph's buffers into ``ledger`` inside the block."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a ledger is already recording")
    _ACTIVE = ledger
    try:
        yield ledger
    finally:
        _ACTIVE = None
