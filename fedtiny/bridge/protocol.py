"""Bridge protocol v1: length-prefixed frames with CRC32 over a byte stream (TCP or serial).

Frame::

    magic "FTB" | version u8 | type u8 | flags u8 (0) | length u32 LE | payload | crc32 u32 LE

The CRC (zlib's CRC-32) covers header and payload. Payloads:

- HELLO (device -> bridge): JSON ``{"protocol": 1, "profile": ..., "model_hash": ..., "partition_id": ...}``;
  on a serial line the bridge opens each exchange with its own HELLO ``{"protocol": 1}``
- TRAIN (bridge -> device): ``u32 LE json length | JSON {"round", "scenario", "scheme", "downlink", "seed"} |
  downlink bytes``
- UPDATE (device -> bridge): ``u32 LE json length | JSON {"num_examples", "metrics", "info"} | update bytes``
  (the update in fedtiny's wire format; the bridge treats it as untrusted, the server decodes it)
- METRICS (device -> bridge): JSON of scalar metrics (optional, informational)
- ERROR (either way): JSON ``{"code": ..., "message": ...}``
- BUSY (device -> bridge): JSON ``{"round": r, "step": k, "steps": n}``, a keep-alive while it trains
- ACK (bridge -> device): JSON ``{"round": r}``, the bridge took round r's UPDATE: the device commits
  the state of that round (its error-feedback residual, the model it received) only now

Reads run on a :class:`~fedtiny.bridge.transport.Stream` (a bare socket is wrapped) with an idle
timeout (seconds without a byte) and an optional deadline; a bad magic, version, CRC, type, flags,
oversized length, a timeout or a closed stream raises :class:`ProtocolError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from fedtiny.bridge.transport import Stream, as_stream
from fedtiny.errors import ProtocolError

__all__ = [
    "ProtocolError",
    "Frame",
    "HELLO",
    "TRAIN",
    "UPDATE",
    "METRICS",
    "ERROR",
    "BUSY",
    "ACK",
    "VERSION",
    "MAGIC",
    "NAMES",
    "HEADER_SIZE",
    "encode_frame",
    "decode_frame",
    "read_frame",
    "sync_frame",
    "send_frame",
    "send_json",
    "pack_blob",
    "unpack_blob",
    "MAX_PAYLOAD",
    "model_hash",
]

MAGIC = b"FTB"
VERSION = 1
HELLO, TRAIN, UPDATE, METRICS, ERROR, BUSY, ACK = 1, 2, 3, 4, 5, 6, 7
NAMES = {HELLO: "HELLO", TRAIN: "TRAIN", UPDATE: "UPDATE", METRICS: "METRICS", ERROR: "ERROR", BUSY: "BUSY", ACK: "ACK"}
_HEADER = struct.Struct("<3sBBBI")
HEADER_SIZE = _HEADER.size
MAX_PAYLOAD = 16 << 20


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{self.name} payload is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.name} payload must be a JSON object")
        return obj


def encode_frame(ftype: int, payload: bytes) -> bytes:
    if ftype not in NAMES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = _HEADER.pack(MAGIC, VERSION, ftype, 0, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def _check_header(head: bytes) -> tuple[int, int]:
    magic, version, ftype, flags, length = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a fedtiny bridge frame")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} != {VERSION}: update the device or the bridge")
    if ftype not in NAMES or flags:
        raise ProtocolError(f"unknown frame type {ftype} or flags {flags}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}")
    return ftype, length


def decode_frame(data: bytes) -> Frame:
    """Decode one complete frame from bytes (exactly one frame, nothing after it)."""
    if len(data) < _HEADER.size + 4:
        raise ProtocolError(f"truncated frame: {len(data)} bytes")
    ftype, length = _check_header(data[: _HEADER.size])
    if len(data) != _HEADER.size + length + 4:
        raise ProtocolError(f"truncated frame: {len(data)} bytes for a payload of {length}")
    body = data[: _HEADER.size + length]
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise ProtocolError("CRC mismatch: the frame was corrupted")
    return Frame(ftype, data[_HEADER.size : _HEADER.size + length])


def _wait(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds the next read may wait: the idle timeout, cut at the deadline (``0``: the deadline passed)."""
    if deadline is None:
        return timeout
    left = max(0.0, deadline - time.monotonic())
    return left if timeout is None else min(timeout, left)


def _timed_out(timeout: float | None, deadline: float | None, what: str) -> ProtocolError:
    if deadline is not None and time.monotonic() >= deadline:
        return ProtocolError(f"time limit of the exchange reached {what}")
    return ProtocolError(f"timed out: no byte in {timeout:g} s {what}")


def _recv_exact(
    stream: Stream, n: int, timeout: float | None, deadline: float | None, what: Callable[[int], str]
) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got, _wait(timeout, deadline))
        if not chunk:
            raise _timed_out(timeout, deadline, what(n - got))
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(stream: Stream | socket.socket, timeout: float | None = None, *, deadline: float | None = None) -> Frame:
    """Read one frame; every byte must belong to it (no resynchronisation).

    Parameters
    ----------
    stream
        The byte stream (a bare socket is wrapped).
    timeout
        The idle timeout: seconds without a byte before giving up (``None``: wait forever).
    deadline
        A :func:`time.monotonic` instant after which no read waits (the exchange's time limit).

    Raises
    ------
    ProtocolError
        A malformed frame, a timeout (saying whether the device stopped mid-frame), a closed stream.
    """
    stream = as_stream(stream)
    first = _recv_exact(stream, 1, timeout, deadline, lambda _: "while waiting for a frame")

    def mid(total: int, kind: str) -> Callable[[int], str]:
        return lambda missing: (
            f"in the middle of {kind}: {missing} of its {total} bytes missing (the device stopped mid-frame)"
        )

    head = first + _recv_exact(stream, _HEADER.size - 1, timeout, deadline, mid(_HEADER.size, "a frame header"))
    ftype, length = _check_header(head)
    name = NAMES[ftype]
    rest = _recv_exact(
        stream,
        length + 4,
        timeout,
        deadline,
        mid(_HEADER.size + length + 4, f"{'an' if name[0] in 'AEIOU' else 'a'} {name} frame"),
    )
    return decode_frame(head + rest)


def sync_frame(
    stream: Stream | socket.socket,
    accept: Callable[[Frame], bool],
    timeout: float | None = None,
    *,
    deadline: float | None = None,
    skipped: list[str] | None = None,
) -> Frame:
    """The first intact frame ``accept`` takes, skipping everything before it (a serial line's leftovers).

    Bytes that are not a frame, corrupted or truncated frames and intact frames ``accept`` refuses
    (a BUSY, ERROR or UPDATE of an aborted exchange) are skipped; a description of each skipped
    frame goes to ``skipped``. A frame is recognised by its magic, a valid header and its CRC; the
    earliest position where a complete intact frame starts wins, so a truncated stale frame whose
    length field promises more bytes cannot hide a good frame after it. Bytes after the frame stay
    in the stream. Gives up like :func:`read_frame`: after ``timeout`` seconds without a byte or
    at ``deadline``.
    """
    stream = as_stream(stream)
    buf = bytearray()
    pos = 0  # the next offset to look for a magic at
    candidates: list[tuple[int, int]] = []  # (start, end) of headers that are valid so far
    limit = 2 * (_HEADER.size + MAX_PAYLOAD + 4)
    while True:
        while True:
            i = buf.find(MAGIC, pos)
            if i < 0:
                pos = max(pos, len(buf) - len(MAGIC) + 1)
                break
            if len(buf) - i < _HEADER.size:
                pos = i
                break
            try:
                _, length = _check_header(bytes(buf[i : i + _HEADER.size]))
                candidates.append((i, i + _HEADER.size + length + 4))
            except ProtocolError:
                pass
            pos = i + 1
        for start, end in list(candidates):
            if end > len(buf):
                continue
            candidates.remove((start, end))
            try:
                frame = decode_frame(bytes(buf[start:end]))
            except ProtocolError:
                continue
            if accept(frame):
                stream.unread(bytes(buf[end:]))
                return frame
            if skipped is not None:
                skipped.append(f"{frame.name} frame of {len(frame.payload)} bytes")
            # nothing before the end of an intact frame can start another one
            candidates = [(s, e) for s, e in candidates if s >= end]
            del buf[:end]
            pos = max(0, pos - end)
            candidates = [(s - end, e - end) for s, e in candidates]
            break
        else:
            if len(buf) > limit:  # no frame can start this far back: forget the oldest bytes
                cut = len(buf) - limit
                del buf[:cut]
                pos = max(0, pos - cut)
                candidates = [(s - cut, e - cut) for s, e in candidates if s >= cut]
            chunk = stream.read(1 << 16, _wait(timeout, deadline))
            if not chunk:
                raise _timed_out(
                    timeout,
                    deadline,
                    "while waiting for a frame (after skipping "
                    f"{len(buf)} bytes{' and ' + ', '.join(skipped) if skipped else ''})",
                )
            buf += chunk


def send_frame(stream: Stream | socket.socket, ftype: int, payload: bytes) -> None:
    """Write one frame (a failure raises :class:`ProtocolError` naming the frame)."""
    stream = as_stream(stream)
    data = encode_frame(ftype, payload)
    try:
        stream.write(data)
    except ProtocolError as exc:
        raise type(exc)(f"{exc} (sending {NAMES[ftype]})") from None


def send_json(stream: Stream | socket.socket, ftype: int, obj: dict[str, Any]) -> None:
    """Write a frame whose payload is the JSON of ``obj``."""
    send_frame(stream, ftype, json.dumps(obj, sort_keys=True).encode())


def model_hash(spec: list[tuple[str, tuple[int, ...], str]]) -> str:
    """Identity of the model a device runs: a hash of its tensors' names, shapes and dtypes (wire order).

    The first 16 hex digits of SHA-256 over the JSON list ``[[name, shape, dtype], ...]``;
    the bridge and the device compute it independently and compare at HELLO.
    """
    return hashlib.sha256(json.dumps([[n, list(s), d] for n, s, d in spec]).encode()).hexdigest()[:16]


def pack_blob(meta: dict[str, Any], blob: bytes) -> bytes:
    """A JSON header and a binary blob in one payload."""
    head = json.dumps(meta, sort_keys=True).encode()
    return struct.pack("<I", len(head)) + head + blob


def unpack_blob(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < 4:
        raise ProtocolError("payload too short for its JSON header")
    (n,) = struct.unpack("<I", payload[:4])
    if n > len(payload) - 4:
        raise ProtocolError(f"JSON header of {n} bytes exceeds the payload")
    try:
        meta = json.loads(payload[4 : 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad JSON header: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("JSON header must be an object")
    return meta, payload[4 + n :]
