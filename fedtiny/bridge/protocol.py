"""Bridge protocol v1: length-prefixed frames with CRC32 over a byte stream (TCP or serial).

Frame::

    magic "FTB" | version u8 | type u8 | flags u8 (0) | length u32 LE | payload | crc32 u32 LE

The CRC (zlib's CRC-32) covers header and payload. Payloads:

- HELLO (device -> bridge): JSON ``{"protocol": 1, "profile": ..., "model_hash": ..., "partition_id": ...}``
- TRAIN (bridge -> device): ``u32 LE json length | JSON {"round", "scenario", "scheme", "downlink"} | downlink bytes``
- UPDATE (device -> bridge): ``u32 LE json length | JSON {"num_examples", "metrics", "info"} | update bytes``
  (the update in fedtiny's wire format; the bridge treats it as untrusted, the server decodes it)
- METRICS (device -> bridge): JSON of scalar metrics (optional, informational)
- ERROR (either way): JSON ``{"code": ..., "message": ...}``

Every read has a timeout; a bad magic, version, CRC, type, oversized length or a closed
stream raises :class:`ProtocolError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from fedtiny.errors import ProtocolError

__all__ = ["ProtocolError", "Frame", "HELLO", "TRAIN", "UPDATE", "METRICS", "ERROR", "VERSION", "encode_frame",
           "decode_frame", "read_frame", "send_frame", "pack_blob", "unpack_blob", "MAX_PAYLOAD",
           "model_hash"]

MAGIC = b"FTB"
VERSION = 1
HELLO, TRAIN, UPDATE, METRICS, ERROR = 1, 2, 3, 4, 5
NAMES = {HELLO: "HELLO", TRAIN: "TRAIN", UPDATE: "UPDATE", METRICS: "METRICS", ERROR: "ERROR"}
_HEADER = struct.Struct("<3sBBBI")
MAX_PAYLOAD = 16 << 20


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{NAMES.get(self.type, self.type)} payload is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{NAMES.get(self.type, self.type)} payload must be a JSON object")
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
    ftype, length = _check_header(data[:_HEADER.size])
    if len(data) != _HEADER.size + length + 4:
        raise ProtocolError(f"truncated frame: {len(data)} bytes for a payload of {length}")
    body = data[:_HEADER.size + length]
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise ProtocolError("CRC mismatch: the frame was corrupted")
    return Frame(ftype, data[_HEADER.size:_HEADER.size + length])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        try:
            chunk = sock.recv(min(n - got, 1 << 16))
        except socket.timeout:
            raise ProtocolError(f"timed out waiting for {n - got} more bytes") from None
        except OSError as exc:
            raise ProtocolError(f"connection failed: {exc}") from None
        if not chunk:
            raise ProtocolError(f"connection closed with {n - got} bytes of a frame missing")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, timeout: float | None = None) -> Frame:
    """Read one frame from a socket (``timeout`` seconds per read)."""
    if timeout is not None:
        sock.settimeout(timeout)
    head = _recv_exact(sock, _HEADER.size)
    _, length = _check_header(head)
    rest = _recv_exact(sock, length + 4)
    return decode_frame(head + rest)


def send_frame(sock: socket.socket, ftype: int, payload: bytes) -> None:
    try:
        sock.sendall(encode_frame(ftype, payload))
    except OSError as exc:
        raise ProtocolError(f"connection failed while sending {NAMES[ftype]}: {exc}") from None


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
        meta = json.loads(payload[4:4 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad JSON header: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("JSON header must be an object")
    return meta, payload[4 + n:]
