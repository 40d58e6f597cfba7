"""The host kernels of ``device/c`` (``libfedtiny_host.so``), when built, through ctypes.

TFLM's requantization fused with the clamp and its gradient mask, one pass over a tensor in
integer arithmetic: the same integers as :mod:`fedtiny.int8.kernels` (the tests compare
them), several times faster than PyTorch's 64-bit paths, which AVX2 runs scalar or in
float64. ``make install`` builds the library; without it (no C compiler, or
``FEDTINY_NATIVE=0``) every caller falls back to the PyTorch kernels, with the same results.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

from .kernels import AddParams

__all__ = ["available", "library_path", "requantize_clamp", "add_clamp", "uniform"]

ABI = 2  # FT_HOST_ABI in device/c/fedtiny_host.h
_P = ctypes.c_void_p
_I32, _I64 = ctypes.c_int32, ctypes.c_int64


def library_path() -> Path:
    """Where ``make -C device/c`` writes the library (beside the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "device" / "c" / "libfedtiny_host.so"


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("FEDTINY_NATIVE", "1") == "0":
        return None
    path = library_path()
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if lib.ft_host_abi() != ABI:  # a stale build: the PyTorch kernels are right, only slower
            return None
    except OSError:
        return None
    lib.ft_requantize_clamp.restype = ctypes.c_int
    lib.ft_requantize_clamp.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _I32, _I32, _I32, _P, _P]
    lib.ft_add_clamp.restype = ctypes.c_int
    lib.ft_add_clamp.argtypes = [
        _P,
        _P,
        _I64,
        _I32,
        _I32,
        ctypes.c_int,
        _I32,
        ctypes.c_int,
        _I32,
        ctypes.c_int,
        _I32,
        ctypes.c_int,
        _I32,
        _I32,
        _I32,
        _P,
        _P,
    ]
    lib.ft_uniform.restype = ctypes.c_int
    lib.ft_uniform.argtypes = [ctypes.c_uint32, _I64, _P]
    return lib


def available() -> bool:
    """Whether the host kernels are loaded (built, right ABI, not disabled)."""
    return _lib() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def requantize_clamp(
    acc: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, y_zero: int, lo: int, hi: int, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``clamp(MultiplyByQuantizedMultiplier(acc, mult[c], shift[c]) + y_zero, lo, hi)`` per channel (dim 1).

    ``acc`` holds int32 values as float32 or float64 (as :func:`~fedtiny.int8.kernels.conv_acc`
    returns them); ``mult``/``shift`` are int32 per channel. Returns ``(y float32, mask bool
    or None)``, the mask marking values the clamp kept, or None when the library is absent or
    the arguments are outside its contract (the caller then runs the PyTorch kernels).
    """
    lib = _lib()
    if lib is None or acc.dtype not in (torch.float32, torch.float64) or acc.dim() < 2:
        return None
    acc = acc.contiguous()
    n, c = acc.shape[0], acc.shape[1]
    hw = acc[0, 0].numel() if acc.numel() else 0
    y = torch.empty(acc.shape, dtype=torch.float32)
    mask = torch.empty(acc.shape, dtype=torch.bool) if want_mask else None
    f32 = acc.dtype == torch.float32
    rc = lib.ft_requantize_clamp(
        _ptr(acc) if f32 else None,
        None if f32 else _ptr(acc),
        n,
        c,
        hw,
        _ptr(mult),
        _ptr(shift),
        int(y_zero),
        int(lo),
        int(hi),
        _ptr(y),
        _ptr(mask),
    )
    return None if rc != 0 else (y, mask)


def add_clamp(
    a: torch.Tensor, b: torch.Tensor, p: AddParams, lo: int, hi: int, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """TFLM's int8 ADD of two equal-shape float32 tensors of int8 values, clamped; as :func:`requantize_clamp`."""
    lib = _lib()
    if lib is None or a.shape != b.shape or a.dtype != torch.float32 or b.dtype != torch.float32:
        return None
    a, b = a.detach().contiguous(), b.detach().contiguous()
    y = torch.empty(a.shape, dtype=torch.float32)
    mask = torch.empty(a.shape, dtype=torch.bool) if want_mask else None
    rc = lib.ft_add_clamp(
        _ptr(a),
        _ptr(b),
        a.numel(),
        -p.z1,
        -p.z2,
        p.left_shift,
        p.mult1,
        p.shift1,
        p.mult2,
        p.shift2,
        p.mult_out,
        p.shift_out,
        p.z_out,
        int(lo),
        int(hi),
        _ptr(y),
        _ptr(mask),
    )
    return None if rc != 0 else (y, mask)


def uniform(base: int, count: int) -> torch.Tensor | None:
    """The exact step's counter-based uniform numbers for stream ``base`` (see :func:`fedtiny.int8.exact.uniform`)."""
    lib = _lib()
    if lib is None:
        return None
    out = torch.empty(count, dtype=torch.float32)
    return out if lib.ft_uniform(base & 0xFFFFFFFF, count, _ptr(out)) == 0 else None
