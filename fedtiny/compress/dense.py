"""Dense payloads: named tensors in their on-device dtypes as raw little-endian bytes, validated.

The layout is the concatenation of the tensors of a known spec (names, shapes and
dtypes, in order), so the payload carries no header and its byte count is exactly
what a device would send. Anything that does not match raises :class:`PayloadError`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedtiny.errors import PayloadError

__all__ = ["PayloadError", "Spec", "as_dtype", "pack_dense", "unpack_dense", "dense_nbytes"]

Spec = list[tuple[str, tuple[int, ...], str]]
"""The tensors on the wire, in order: ``(name, shape, dtype)`` each."""
_ALLOWED = {"int8", "int32", "float16", "float32", "float64"}


@functools.lru_cache(maxsize=None)  # asked per tensor of every payload the server reads
def _dtype(name: str) -> np.dtype:
    if name not in _ALLOWED:
        raise PayloadError(f"unsupported dtype {name!r}")
    return np.dtype(name).newbyteorder("<")


def as_dtype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` in ``dtype``; integer targets are rounded and saturated (float32 cannot hold every int32)."""
    a = np.asarray(a)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.ascontiguousarray(np.clip(np.rint(a.astype(np.float64)), info.min, info.max).astype(dtype))
    return np.ascontiguousarray(a.astype(dtype, copy=True))


def dense_nbytes(spec: Spec) -> int:
    """Bytes of a dense payload of ``spec``."""
    return sum(math.prod(shape) * _dtype(dt).itemsize for _, shape, dt in spec)


def pack_dense(arrays: dict[str, np.ndarray], spec: Spec) -> bytes:
    """Concatenate ``arrays`` in ``spec`` order as little-endian bytes of each tensor's dtype."""
    parts = []
    for name, shape, dt in spec:
        a = np.asarray(arrays[name])
        if a.shape != tuple(shape) or a.dtype != np.dtype(dt):
            raise PayloadError(f"tensor {name!r}: {a.dtype}{list(a.shape)} != spec {dt}{list(shape)}")
        parts.append(a.astype(_dtype(dt), copy=False).tobytes())
    return b"".join(parts)


def unpack_dense(data: bytes, spec: Spec) -> dict[str, np.ndarray]:
    """Split bytes back into named arrays; raise :class:`PayloadError` on any mismatch."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    expected = dense_nbytes(spec)
    if len(data) != expected:
        raise PayloadError(f"payload has {len(data)} bytes, expected {expected}")
    out, pos = {}, 0
    for name, shape, dt in spec:
        dtype = _dtype(dt)
        n = math.prod(shape)
        a = np.frombuffer(data, dtype=dtype, count=n, offset=pos).reshape(shape).astype(np.dtype(dt))
        if dtype.kind == "f" and not np.isfinite(a).all():
            raise PayloadError(f"tensor {name!r}: {int((~np.isfinite(a)).sum())} non-finite values")
        out[name] = a
        pos += n * dtype.itemsize
    return out
