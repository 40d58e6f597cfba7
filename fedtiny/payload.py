"""Dense float32 payloads: named tensors as raw little-endian bytes, validated on the way in.

The layout is the concatenation of the tensors of a known spec (names and shapes,
in order), so the payload carries no header and its byte count is exactly what a
device would send. Anything that does not match the spec raises :class:`PayloadError`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PayloadError", "pack_dense", "unpack_dense", "dense_nbytes"]

_DTYPE = np.dtype("<f4")


class PayloadError(ValueError):
    """A payload does not match the expected spec (length, values)."""


def dense_nbytes(spec: list[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of a dense float32 payload of ``spec``."""
    return sum(int(np.prod(shape)) for _, shape in spec) * _DTYPE.itemsize


def pack_dense(arrays: dict[str, np.ndarray], spec: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """Concatenate ``arrays`` in ``spec`` order as float32 little-endian bytes."""
    parts = []
    for name, shape in spec:
        a = np.asarray(arrays[name], dtype=_DTYPE)
        if a.shape != tuple(shape):
            raise PayloadError(f"tensor {name!r}: shape {a.shape} != spec {tuple(shape)}")
        parts.append(a.tobytes())
    return b"".join(parts)


def unpack_dense(data: bytes, spec: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Split bytes back into named arrays; raise :class:`PayloadError` on any mismatch."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    expected = dense_nbytes(spec)
    if len(data) != expected:
        raise PayloadError(f"payload has {len(data)} bytes, expected {expected}")
    flat = np.frombuffer(bytes(data), dtype=_DTYPE)
    if not np.isfinite(flat).all():
        raise PayloadError(f"payload holds {int((~np.isfinite(flat)).sum())} non-finite values")
    out, pos = {}, 0
    for name, shape in spec:
        n = int(np.prod(shape))
        out[name] = flat[pos:pos + n].reshape(shape).astype(np.float32)
        pos += n
    return out
