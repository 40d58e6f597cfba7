"""What every op of fedtiny's int8 graph shares: quantization parameters, which inputs need a
gradient, how an op's buffers are wired to its readers (:class:`Wiring`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.ledger import Ledger, NullLedger, OpEvents

__all__ = [
    "round_ste",
    "qparams",
    "QParamsMixin",
    "numel",
    "grads",
    "as_int",
    "Wiring",
    "check_grads",
    "to_nchw_shape",
    "layout_ints",
    "CKind",
    "c_op_kinds_header",
    "INT8_MIN",
    "INT8_MAX",
    "INT32_MIN",
    "INT32_MAX",
    "ACTIVATIONS",
]

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ACTIVATIONS = ("NONE", "RELU", "RELU6", "RELU_N1_TO_1")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as torch.round), identity gradient."""
    return x + (torch.round(x) - x).detach()


def qparams(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> torch.Tensor:
    return torch.tensor([x_scale, x_zero, y_scale, y_zero], dtype=torch.float64)


class QParamsMixin:
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


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def grads(*flags: bool) -> tuple[bool, ...]:
    """Which of an op's inputs get a gradient: none outside autograd (evaluation, ``no_grad``)."""
    on = torch.is_grad_enabled()
    return tuple(on and f for f in flags)


def as_int(t: torch.Tensor) -> torch.Tensor:
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
        Where each input's gradient goes: ``grad:<tag>``, one buffer per tensor however many ops read
        it (the first to write it in the backward takes it, the others add into it).
    """

    in_tags: tuple[str, ...] = ("",)
    last_reader: tuple[bool, ...] = (True,)
    grad_tags: tuple[str, ...] = ("grad:",)

    def frees(self) -> tuple[str, ...]:
        return tuple(f"act:{t}" for t, last in zip(self.in_tags, self.last_reader) if last)

    @staticmethod
    def single(n: int = 1) -> "Wiring":
        """An op run on its own (no graph around it)."""
        return Wiring(("",) * n, (True,) * n, tuple(f"grad:{i}" for i in range(n)))


def check_grads(led: Ledger | NullLedger, events: OpEvents, held: list[int]) -> None:
    """The gradients an op's backward really produced against those its events planned."""
    planned = [n for _, n, _ in events.param_grads] + [n for _, n in events.input_grads]
    for i, (p, a) in enumerate(zip(planned, held, strict=False)):
        led.check(f"gradient {i} of {events.tag}", p, a)
    led.check(f"gradient count of {events.tag}", len(planned), len(held))


def to_nchw_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """fedtiny's NCHW form of a TFLite tensor shape (``[N, C]`` -> ``N x C x 1 x 1``; NHWC -> NCHW)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 4:
        return shape[0], shape[3], shape[1], shape[2]
    if len(shape) == 2:
        return shape[0], shape[1], 1, 1
    raise ModelFileError(f"tensor shape {list(shape)}: only 2-D [N, C] and 4-D NHWC tensors are supported")


class CKind(IntEnum):
    """The C step's op kinds, named here once: device/c/fedtiny_op_kinds.h (``enum ft_op_kind``) is written
    from this class by ``make op-kinds`` (:func:`c_op_kinds_header`), and a test holds the file equal to it."""

    CONV = 0
    ADD = 1
    POOL = 2
    MAXPOOL = 3
    MEAN = 4
    MUL = 5
    CONCAT = 6
    LOOKUP = 7
    SLICE = 8
    RESIZE = 9


def c_op_kinds_header() -> str:
    """device/c/fedtiny_op_kinds.h: :class:`CKind` as the C step's ``enum ft_op_kind``."""
    kinds = ",\n".join(f"    FT_OP_{k.name} = {k.value}" for k in CKind)
    return (
        "/* The C step's op kinds, written from fedtiny/int8/ops/base.py's CKind by `make op-kinds`: edit them\n"
        "   there (tests/test_c_step.py holds this file equal to it). */\n"
        "#ifndef FEDTINY_OP_KINDS_H\n#define FEDTINY_OP_KINDS_H\n\n"
        f"enum ft_op_kind {{\n{kinds}\n}};\n\n#endif\n"
    )


def layout_ints(d: dict, key: str, n: int, where: str) -> tuple[int, ...]:
    """``d[key]`` of a model file's layout as ``n`` integers, or a ModelFileError naming it."""
    v = d.get(key)
    if not isinstance(v, list) or len(v) != n or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ModelFileError(f"{where}: {key} must be a list of {n} integers, got {v!r}")
    return tuple(v)
