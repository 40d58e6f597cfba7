"""fedtiny's wire format for sparse updates: versioned, compact, validated on decode.

Layout (all integers unsigned LEB128 varints unless noted)::

    magic "FTU" | version u8 | n_tensors
    per tensor:
      tensor_id | ndim u8 | dims... | nnz | flags u8 | value_type u8 | [scale f32]
      position coding u8 (0 dense, 1 delta-varint, 2 Golomb-Rice) | [rice k u8] | position bytes | positions
      values

Positions are flat indices into the tensor, strictly increasing. Gaps (``idx[0]``,
then ``idx[i] - idx[i-1] - 1``) are coded as varints or Golomb-Rice codes, whichever
is smaller for that tensor; a tensor sent whole (``nnz == numel``) has no positions.
Value types: int8, int16, int32 (times ``scale``), fp16, fp32, ternary (one sign bit
per value, magnitude ``scale``). ``flags`` bit 0 says the values replace the
receiver's values instead of being added to them.

:func:`decode` checks everything (magic, version, lengths, tensor ids and shapes
against a spec, index ranges and order, finite values, size limits) and raises
:class:`CodecError` with a reason; no other exception escapes it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from fedtiny.compress.values import quantize_values, value_type, value_type_names, value_type_of_code
from fedtiny.errors import CodecError

__all__ = [
    "CodecError",
    "SparseTensor",
    "SparseUpdate",
    "encode",
    "decode",
    "MAGIC",
    "VERSION",
    "quantize_values",
    "value_type_names",
    "gap_bits",
]

MAGIC = b"FTU"
VERSION = 1
POS_DENSE, POS_VARINT, POS_RICE = 0, 1, 2
FLAG_SET = 1

MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_NUMEL = 1 << 28
MAX_BYTES = 1 << 26


@dataclass
class SparseTensor:
    """One tensor's nonzeros: flat positions and values (already dequantized floats).

    Attributes
    ----------
    tensor_id
        Index of the tensor in the spec both sides share.
    shape
        The full tensor's shape.
    indices
        Sorted, unique flat positions (int64).
    values
        Dequantized values (float64), one per position.
    value_type
        How the values travel (a registered value type, :mod:`fedtiny.compress.values`).
    scale
        Scale of int/ternary values.
    replace
        Values replace the receiver's (True) or are added to them (False).
    """

    tensor_id: int
    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray
    value_type: str = "fp32"
    scale: float = 1.0
    replace: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SparseUpdate:
    """A set of sparse tensors (an uplink update or a downlink change)."""

    tensors: list[SparseTensor] = field(default_factory=list)

    @property
    def nnz(self) -> int:
        return sum(len(t.indices) for t in self.tensors)


# --- bit-level helpers ----------------------------------------------------------------------------------------


def _varints(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers, vectorized."""
    v = np.asarray(values, np.uint64)
    if len(v) == 0:
        return b""
    nbytes = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1).astype(np.float64))).astype(np.int64) // 7) + 1)
    nbytes = np.where(v == 0, 1, nbytes)
    # float log2 can be off by one near powers of two: fix exactly
    nbytes = np.where((nbytes < 10) & (v >= (np.uint64(1) << (7 * nbytes).astype(np.uint64))), nbytes + 1, nbytes)
    total = int(nbytes.sum())
    out = np.zeros(total, np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for b in range(int(nbytes.max())):
        sel = nbytes > b
        chunk = ((v[sel] >> np.uint64(7 * b)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] > b + 1).astype(np.uint8) << 7
        out[starts[sel] + b] = chunk | more
    return out.tobytes()


def _rice_k(gaps: np.ndarray) -> int:
    mean = float(gaps.mean()) if len(gaps) else 0.0
    return max(0, int(math.floor(math.log2(mean * math.log(2)))) if mean > 1 else 0)


def gap_bits(gaps: np.ndarray, k: int) -> int:
    """Bits of the Golomb-Rice code of ``gaps`` with parameter ``k``."""
    return int((np.asarray(gaps, np.int64) >> k).sum()) + len(gaps) * (k + 1)


def _rice_encode(gaps: np.ndarray, k: int) -> bytes:
    g = np.asarray(gaps, np.int64)
    q = g >> k
    lengths = q + 1 + k
    total = int(lengths.sum())
    bits = np.zeros(total, np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # unary part: q ones then a zero
    ones_idx = np.repeat(starts, q) + (np.arange(int(q.sum())) - np.repeat(np.concatenate([[0], np.cumsum(q)[:-1]]), q))
    bits[ones_idx] = 1
    for b in range(k):  # remainder, most significant bit first
        bits[starts + q + 1 + b] = ((g >> (k - 1 - b)) & 1).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _rice_decode(data: bytes, count: int, k: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    n = len(bits)
    zeros = np.flatnonzero(bits == 0).tolist()
    nz = len(zeros)
    z = np.empty(count, np.int64)
    pos = zi = 0
    for i in range(count):  # each code ends its unary part at the first zero at or after pos
        while zi < nz and zeros[zi] < pos:
            zi += 1
        if zi >= nz:
            raise CodecError("Golomb-Rice positions truncated")
        z[i] = zeros[zi]
        pos = zeros[zi] + 1 + k
    if pos > n:
        raise CodecError("Golomb-Rice positions truncated")
    if (n - pos) >= 8 or bits[pos:].any():
        raise CodecError("Golomb-Rice positions have trailing bits")
    starts = np.concatenate([[0], z[:-1] + 1 + k]) if count else z
    q = z - starts
    if k == 0:
        return q
    ridx = z[:, None] + 1 + np.arange(k)
    r = bits[ridx].astype(np.int64) @ (np.int64(1) << np.arange(k - 1, -1, -1, dtype=np.int64))
    return (q << k) | r


# --- encode ---------------------------------------------------------------------------------------------------


def encode(update: SparseUpdate) -> bytes:
    """Encode a sparse update (values are sent in each tensor's ``value_type``)."""
    out = bytearray(MAGIC)
    out.append(VERSION)
    out += _varints(np.array([len(update.tensors)]))
    for t in update.tensors:
        idx = np.asarray(t.indices, np.int64)
        vt = value_type(t.value_type)
        if len(idx) and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= t.numel):
            raise CodecError(f"tensor {t.tensor_id}: indices must be sorted, unique and within {t.numel}")
        out += _varints(np.array([t.tensor_id]))
        out.append(len(t.shape))
        out += _varints(np.array(t.shape, np.int64))
        out += _varints(np.array([len(idx)]))
        out.append(FLAG_SET if t.replace else 0)
        out.append(vt.code)
        scale = float(t.scale) if vt.scaled else 1.0
        if vt.levels and scale <= 0:  # an integer type without a scale sends integers (scale 1), as it packs them
            scale = 1.0
        if vt.scaled:
            out += struct.pack("<f", scale)
        if len(idx) == t.numel:
            out.append(POS_DENSE)
        else:
            gaps = np.diff(idx, prepend=-1) - 1
            as_varint = _varints(gaps)
            k = _rice_k(gaps)
            if (gap_bits(gaps, k) + 7) // 8 < len(as_varint):
                out.append(POS_RICE)
                out.append(k)
                coded = _rice_encode(gaps, k)
            else:
                out.append(POS_VARINT)
                coded = as_varint
            out += _varints(np.array([len(coded)]))
            out += coded
        out += vt.pack(np.asarray(t.values, np.float64), scale)
    return bytes(out)


# --- decode ---------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, {len(self.data) - self.pos} left"
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        value = shift = 0
        for i in range(10):
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if i and byte == 0:
                    raise CodecError(f"{what}: over-long varint")
                return value
            shift += 7
        raise CodecError(f"{what}: varint longer than 10 bytes")

    def varints(self, data: bytes, count: int, what: str) -> np.ndarray:
        sub = _Reader(data)
        out = np.fromiter((sub.varint(what) for _ in range(count)), np.int64, count)
        if sub.pos != len(data):
            raise CodecError(f"{what}: {len(data) - sub.pos} bytes left over")
        return out


def decode(
    data: bytes, spec: list[tuple[str, tuple[int, ...], str]] | None = None, *, max_bytes: int = MAX_BYTES
) -> SparseUpdate:
    """Decode and validate an update; ``spec`` (names, shapes, dtypes by tensor id) checks ids and shapes.

    Raises
    ------
    CodecError
        On any violation; nothing else escapes.
    """
    try:
        return _decode(data, spec, max_bytes)
    except CodecError:
        raise
    except Exception as exc:  # a malformed input must never surface as anything but CodecError
        raise CodecError(f"malformed update ({type(exc).__name__}: {exc})") from None


def _decode(data: bytes, spec, max_bytes: int) -> SparseUpdate:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise CodecError(f"update of {len(data)} bytes exceeds the limit of {max_bytes}")
    r = _Reader(data)
    if r.take(3, "magic") != MAGIC:
        raise CodecError("bad magic: not a fedtiny update")
    version = r.u8("version")
    if version != VERSION:
        raise CodecError(f"unsupported version {version} (this decoder reads {VERSION})")
    n = r.varint("tensor count")
    if n > (len(spec) if spec is not None else MAX_TENSORS):
        raise CodecError(f"{n} tensors exceed the limit of {len(spec) if spec is not None else MAX_TENSORS}")
    tensors, seen = [], set()
    for _ in range(n):
        tid = r.varint("tensor id")
        if tid in seen:
            raise CodecError(f"tensor {tid} appears twice")
        seen.add(tid)
        ndim = r.u8("ndim")
        if ndim > MAX_NDIM:
            raise CodecError(f"tensor {tid}: {ndim} dimensions exceed {MAX_NDIM}")
        shape = tuple(r.varint("dim") for _ in range(ndim))
        numel = math.prod(shape)
        if numel > MAX_NUMEL:
            raise CodecError(f"tensor {tid}: {numel} elements exceed {MAX_NUMEL}")
        if spec is not None:
            if tid >= len(spec):
                raise CodecError(f"tensor id {tid} not in the model's {len(spec)} trainable tensors")
            if tuple(spec[tid][1]) != shape:
                raise CodecError(f"tensor {tid} ({spec[tid][0]}): shape {shape} != expected {tuple(spec[tid][1])}")
        nnz = r.varint("nnz")
        if nnz > numel:
            raise CodecError(f"tensor {tid}: {nnz} nonzeros in {numel} elements")
        flags = r.u8("flags")
        if flags & ~FLAG_SET:
            raise CodecError(f"tensor {tid}: unknown flags {flags:#x}")
        vcode = r.u8("value type")
        vt = value_type_of_code(vcode)
        if vt is None:
            raise CodecError(f"tensor {tid}: unknown value type {vcode}")
        scale = 1.0
        if vt.scaled:
            (scale,) = struct.unpack("<f", r.take(4, "scale"))
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"tensor {tid}: bad scale {scale}")
        coding = r.u8("position coding")
        if coding == POS_DENSE:
            if nnz != numel:
                raise CodecError(f"tensor {tid}: dense positions but {nnz} of {numel} values")
            idx = np.arange(numel, dtype=np.int64)
        elif coding in (POS_VARINT, POS_RICE):
            k = r.u8("rice parameter") if coding == POS_RICE else 0
            if k > 40:
                raise CodecError(f"tensor {tid}: Golomb-Rice parameter {k} too large")
            length = r.varint("position bytes")
            raw = r.take(length, "positions")
            gaps = _rice_decode(raw, nnz, k) if coding == POS_RICE else r.varints(raw, nnz, "positions")
            if np.any(gaps > numel):
                raise CodecError(f"tensor {tid}: position out of range")
            idx = np.cumsum(gaps + 1) - 1
            if nnz and idx[-1] >= numel:
                raise CodecError(f"tensor {tid}: position {int(idx[-1])} out of range {numel}")
        else:
            raise CodecError(f"tensor {tid}: unknown position coding {coding}")
        values = vt.unpack(r.take(vt.nbytes(nnz), "values"), nnz, scale)
        if not np.isfinite(values).all():
            raise CodecError(f"tensor {tid}: non-finite values")
        tensors.append(SparseTensor(tid, shape, idx, values, vt.name, scale, bool(flags & FLAG_SET)))
    if r.pos != len(data):
        raise CodecError(f"{len(data) - r.pos} trailing bytes after the last tensor")
    return SparseUpdate(tensors)
