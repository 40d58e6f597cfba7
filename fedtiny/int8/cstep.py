"""The device's exact training step in C (``device/c/fedtiny_step.c``), driven from Python through ctypes.

:class:`CStep` lays a :class:`~fedtiny.int8.graph.QModel` out as the C step's model description
(int8 weights, int32 biases, TFLM multipliers, the scheme's trained tensors and channels), runs
steps on int8 inputs in one arena, and writes the parameters back. Its results equal the PyTorch
exact step's (:mod:`fedtiny.int8.exact`) bit for bit; the tests check that on every supported op.
"""

from __future__ import annotations

import ctypes
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8 import kernels
from fedtiny.int8.graph import QConv, QModel
from fedtiny.int8.ops.base import CKind
from fedtiny.int8.optimizers import optimizer_kind, optimizer_names
from fedtiny.int8.resolver import kind_of

__all__ = ["CStep", "CKind", "available", "library_path", "MAX_BATCH"]


ABI = 5
MAX_BATCH = 64
_f, _i, _p = ctypes.c_float, ctypes.c_int32, ctypes.c_void_p


class _Op(ctypes.Structure):
    _fields_ = (
        [
            (n, _i)
            for n in (
                "kind",
                "in0",
                "in1",
                "c",
                "h",
                "w",
                "oc",
                "oh",
                "ow",
                "kh",
                "kw",
                "stride",
                "groups",
                "pad_t",
                "pad_l",
                "x_zero",
                "y_zero",
                "act_lo",
                "act_hi",
            )
        ]
        + [(n, _p) for n in ("weight", "bias", "mult", "shift", "eff_scale", "qas_w", "qas_b", "train_channels")]
        + [("slot_of", _p)]
        + [(n, _i) for n in ("train_w", "train_b", "slot", "inplace", "fuse_next", "workspace")]
        + [("mom_w", _p), ("mom_b", _p)]
        + [(n, _i) for n in ("z1", "z2", "z_out", "left_shift", "m1", "s1", "m2", "s2", "mo", "so")]
        + [("ratio_a", _f), ("ratio_b", _f), ("n_in", _i), ("in_more", _p)]
        + [(n, _i) for n in ("begin_c", "begin_h", "begin_w", "step_c", "step_h", "step_w")]
        + [("table", _p), ("slope", _p)]
    )


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_ops", _i),
        ("ops", ctypes.POINTER(_Op)),
        ("in_c", _i),
        ("in_h", _i),
        ("in_w", _i),
        ("classes", _i),
        ("logit_scale", _f),
        ("sm_mult", _i),
        ("sm_shift", _i),
        ("sm_diff_min", _i),
        ("lr", _f),
        ("momentum", _f),
        ("stochastic", _i),
        ("plan", _p),
        ("plan_len", _i),
        ("plan_batch", _i),
    ]


class _Report(ctypes.Structure):
    _fields_ = [
        ("arena_high_water", ctypes.c_size_t),
        ("loss", _f),
        ("sum_exp", ctypes.c_int64 * MAX_BATCH),
        ("exp_y", ctypes.c_int64 * MAX_BATCH),
    ]


def library_path() -> Path:
    """``device/c/libfedtiny_step.so``, or the build ``FEDTINY_STEP_LIB`` names (the op-check build of
    scripts/firmware_opcheck.py: the same step, printing every tensor's hash)."""
    return Path(
        os.environ.get("FEDTINY_STEP_LIB")
        or Path(__file__).resolve().parents[2] / "device" / "c" / "libfedtiny_step.so"
    )


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    path = library_path()
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.ft_step_abi() != ABI:
            return None
    except OSError:
        return None
    lib.ft_step_arena_bytes.restype = ctypes.c_size_t
    lib.ft_step_arena_bytes.argtypes = [ctypes.POINTER(_Model), _i]
    lib.ft_train_step.restype = ctypes.c_int
    lib.ft_train_step.argtypes = [
        ctypes.POINTER(_Model),
        _p,
        _p,
        _i,
        ctypes.c_uint32,
        ctypes.c_uint32,
        _p,
        ctypes.c_size_t,
        ctypes.POINTER(_Report),
    ]
    lib.ft_step_record.restype = _i
    lib.ft_step_record.argtypes = [ctypes.POINTER(_Model), _p, _p, _i, _p, ctypes.c_size_t, _p, _i]
    lib.ft_forward.restype = ctypes.c_int
    lib.ft_forward.argtypes = [ctypes.POINTER(_Model), _p, _i, _p, ctypes.c_size_t, _p]
    return lib


def available() -> bool:
    """Whether ``device/c/libfedtiny_step.so`` is built (``make install``) and loads."""
    return _lib() is not None


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


class CStep:
    """One model in the C step's layout. ``optimizer`` ``sgd`` or ``sgd+qas``; ``rounding`` as the scenario's.

    ``layout`` maps an op's tag to the memory planner's decisions for it, ``(inplace, fuse_next,
    workspace_bytes)`` (:func:`fedtiny.budget.memory.c_layout`), so that the C step's arena holds the
    buffers the planner counts; without it every op writes a new buffer and nothing is fused (the same
    numbers, more memory).
    """

    def __init__(
        self,
        model: QModel,
        *,
        lr: float,
        momentum: float = 0.0,
        optimizer: str = "sgd+qas",
        rounding: str = "stochastic",
        layout: dict[str, tuple[int, int, int]] | None = None,
    ) -> None:
        lib = _lib()
        if lib is None:
            raise RuntimeError(f"{library_path()} is not built: run make install (needs a C compiler)")
        if optimizer not in optimizer_names() or not optimizer_kind(optimizer).exact:
            raise ValueError(f"the C step trains with sgd or sgd+qas, not {optimizer!r}")
        self.lib, self.model = lib, model
        self.keep: list[np.ndarray] = []  # every array the C side points into
        model.number_convs()
        shapes = self._shapes(model)
        nodes, ids = [], {"input": 0}
        for node in model.nodes[: model._head + 1]:
            if kind_of(model.op(node.op)).view:
                if shapes[node.op][1:] != shapes[node.inputs[0]][1:]:  # only a flatten of N x C x 1 x 1 is a no-op
                    raise ModelFileError(f"the C step does not run op {node.op!r} (a RESHAPE that moves elements)")
                ids[node.op] = ids[node.inputs[0]]
                continue
            nodes.append(node)
            ids[node.op] = len(nodes)
        # each tensor id's shape (per sample), for the fills of ops of more than one input
        self.tensor_shapes = {ids[name]: tuple(int(v) for v in shapes[name][1:]) for name in ids}
        names = [n.op for n in nodes]
        ops = (_Op * len(nodes))()
        self.params: list[tuple[QConv, np.ndarray, np.ndarray]] = []
        self.optimizer, self.momentum, self.layout = optimizer, momentum, layout or {}
        for i, node in enumerate(nodes):
            module, op = model.op(node.op), ops[i]
            (_, c, h, w), (_, oc, oh, ow) = shapes[node.inputs[0]], shapes[node.op]
            op.in0, op.c, op.h, op.w, op.oc, op.oh, op.ow = ids[node.inputs[0]], c, h, w, oc, oh, ow
            kind = kind_of(module)
            if kind.c_fill is None:
                raise ModelFileError(f"the C step does not run op {node.op!r} ({kind.name})")
            kind.c_fill(self, op, module, [ids[t] for t in node.inputs], shapes[node.inputs[0]])
        head = model.classifier
        if kind_of(head).c_kind != CKind.CONV or names[-1] != "classifier":
            raise ModelFileError("the C step needs an int8 classifier as the last op")
        sm = kernels.softmax_params(float(head.y_scale))
        c, h, w = shapes["input"][1:]
        self.m = _Model(
            len(names),
            ops,
            c,
            h,
            w,
            head.out_channels,
            float(head.y_scale),
            sm.input_multiplier,
            sm.input_left_shift,
            sm.diff_min,
            lr,
            momentum,
            int(rounding == "stochastic"),
        )
        self.ops = ops
        self.names = names
        self.arena: np.ndarray | None = None
        self.high_water = 0
        self.plan: np.ndarray | None = None

    def op_geometry(self) -> list[dict]:
        """The C step's ops as plain values: kind (a :class:`CKind` name in lower case: conv, add, pool, maxpool,
        mean, mul, concat, lookup, slice, resize), inputs (``in0``, ``in1`` of two-input kinds, ``inputs`` all of them),
        shapes, kernel, which parameters train and how many channels (input channels; a depthwise
        convolution's channels) train."""
        out = []
        for name, op in zip(self.names, self.ops):
            kind = CKind(op.kind).name.lower()
            inputs = [int(op.in0)] + ([int(op.in1)] if kind in ("add", "mul", "concat") else [])
            if kind == "concat" and op.n_in > 2:
                inputs += ctypes.cast(op.in_more, ctypes.POINTER(ctypes.c_int32))[: op.n_in - 2]
            g = {
                "name": name,
                "kind": kind,
                "in0": op.in0,
                "in1": inputs[1] if len(inputs) > 1 else 0,
                "inputs": inputs,
                **{k: int(getattr(op, k)) for k in ("c", "h", "w", "oc", "oh", "ow")},
            }
            if kind == "conv":
                n = op.oc if op.groups == op.c == op.oc else op.c
                trained = ctypes.cast(op.slot_of, ctypes.POINTER(ctypes.c_int32))[n] if op.slot_of else n
                g.update(
                    {k: int(getattr(op, k)) for k in ("kh", "kw", "stride", "groups", "train_w", "train_b")},
                    trained_channels=int(trained),
                )
            out.append(g)
        return out

    @staticmethod
    def _shapes(model: QModel) -> dict[str, tuple[int, ...]]:
        c, h, w = model.input_shape or (model.input_channels, 8, 8)
        env = model._run(torch.zeros(1, c, h, w), model._head, record=False)
        return {name: tuple(t.shape) for name, t in env.items()}

    def array(self, a) -> np.ndarray:
        """``a`` as a contiguous array kept alive as long as the C side points into it."""
        a = np.ascontiguousarray(a)
        self.keep.append(a)
        return a

    ptr = staticmethod(_ptr)

    def arena_bytes(self, batch: int) -> int:
        """Bytes of arena a step of ``batch`` samples needs (an upper bound without a plan)."""
        if self.plan is not None and (self.m.plan_batch > 1) == (batch > 1):
            return int(self.plan_bytes)
        return int(self.lib.ft_step_arena_bytes(ctypes.byref(self.m), int(batch)))

    def _state(self) -> list[np.ndarray]:
        """Every array the C side points into (a step writes weights, biases and momentum)."""
        return list(self.keep)

    def record(self, batch: int) -> list[int]:
        """The step's buffers in the order it takes them (``ft_step_record``'s log), for ``batch`` samples.

        It runs one real step on zeros and restores every array the step wrote.
        """
        c, h, w = self.m.in_c, self.m.in_h, self.m.in_w
        x = np.zeros((batch, c, h, w), np.int8)
        y = np.zeros(batch, np.int32)
        saved = [a.copy() for a in self._state()]
        arena = np.zeros(int(self.lib.ft_step_arena_bytes(ctypes.byref(self.m), int(batch))), np.uint8)
        plan = self.m.plan
        self.m.plan = None
        try:
            cap = 1 << 16
            while True:
                log = np.zeros(cap, np.int32)
                n = self.lib.ft_step_record(
                    ctypes.byref(self.m), _ptr(x), _ptr(y), batch, _ptr(arena), arena.nbytes, _ptr(log), cap
                )
                if n != -3:
                    break
                cap *= 4
        finally:
            self.m.plan = plan
            for a, b in zip(self._state(), saved):
                a[...] = b
        if n < 0:
            raise RuntimeError(f"ft_step_record failed ({n})")
        return log[:n].tolist()

    def use_plan(self, offsets: list[int] | tuple[int, ...], batch: int, arena_bytes: int) -> None:
        """Follow a layout (:func:`fedtiny.budget.arena.lay_out`) in steps of ``batch`` samples (1, or more)."""
        self.plan = self.array(np.asarray(offsets, np.uint32))
        self.plan_bytes = int(arena_bytes)
        self.m.plan, self.m.plan_len, self.m.plan_batch = _ptr(self.plan), len(self.plan), int(batch)
        self.arena = None

    def step(self, xq: np.ndarray, y: np.ndarray, seed: int, step: int) -> list[float]:
        """One exact step on int8 inputs ``xq`` (``N x C x H x W``) and labels; returns the per-sample losses."""
        xq = np.ascontiguousarray(xq, dtype=np.int8)
        y = np.ascontiguousarray(y, dtype=np.int32)
        n = len(y)
        if not 0 < n <= MAX_BATCH or xq.shape[0] != n:
            raise ValueError(f"batch of {n}: the C step takes 1..{MAX_BATCH} samples with one label each")
        need = self.arena_bytes(n)
        if self.arena is None or self.arena.nbytes != need:
            self.arena = np.zeros(need, np.uint8)
        rep = _Report()
        rc = self.lib.ft_train_step(
            ctypes.byref(self.m),
            _ptr(xq),
            _ptr(y),
            n,
            seed & 0xFFFFFFFF,
            step & 0xFFFFFFFF,
            _ptr(self.arena),
            self.arena.nbytes,
            ctypes.byref(rep),
        )
        if rc != 0:
            raise RuntimeError(f"ft_train_step failed ({rc})")
        self.high_water = max(self.high_water, int(rep.arena_high_water))
        return [math.log(rep.sum_exp[i]) - math.log(rep.exp_y[i] if rep.exp_y[i] > 0 else 0.5) for i in range(n)]

    def forward(self, xq: np.ndarray) -> np.ndarray:
        """The int8 logits of int8 inputs (``N x classes``)."""
        xq = np.ascontiguousarray(xq, dtype=np.int8)
        n = len(xq)
        arena = np.zeros(self.arena_bytes(1), np.uint8)
        out = np.zeros((n, self.m.classes), np.int8)
        for i in range(0, n, MAX_BATCH):
            part = np.ascontiguousarray(xq[i : i + MAX_BATCH])
            rc = self.lib.ft_forward(
                ctypes.byref(self.m), _ptr(part), len(part), _ptr(arena), arena.nbytes, _ptr(out[i : i + MAX_BATCH])
            )
            if rc != 0:
                raise RuntimeError(f"ft_forward failed ({rc})")
        return out

    def write_back(self) -> None:
        """Copy the C step's weights and biases into the model's parameters."""
        with torch.no_grad():
            for conv, weight, bias in self.params:
                conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
                conv.bias.copy_(torch.from_numpy(bias.astype(np.float64)))
