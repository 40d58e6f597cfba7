"""The bridge side: relay one round to a device over the protocol and bring back its update."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from fedtiny.bridge.protocol import (ERROR, HELLO, METRICS, TRAIN, UPDATE, VERSION, ProtocolError, pack_blob,
                                     read_frame, send_frame, unpack_blob)

__all__ = ["DeviceReply", "relay_round", "parse_address", "is_serial"]


@dataclass(frozen=True)
class DeviceReply:
    """What a device sent back (bytes untrusted: the server's codec validates them)."""

    update: bytes
    num_examples: int
    metrics: dict[str, float]
    info: dict[str, str]


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix("serial:").rpartition(":")
    if not sep or not port.isdigit():
        raise ProtocolError(f"device address {address!r}: expected HOST:PORT or serial:HOST:PORT")
    return host or "127.0.0.1", int(port)


def is_serial(address: str) -> bool:
    """``serial:HOST:PORT``: a serial line behind a TCP port (an emulator's UART, a serial server). A
    serial line has no connections, so the bridge opens each exchange with a HELLO of its own."""
    return address.startswith("serial:")


def _read_synced(sock: socket.socket, timeout: float):
    """The first frame of a serial exchange: bytes before the magic (a line's leftovers) are skipped."""
    from fedtiny.bridge.protocol import MAGIC, _recv_exact, decode_frame, _check_header, _HEADER

    sock.settimeout(timeout)
    window = b""
    for _ in range(1 << 20):
        window = (window + _recv_exact(sock, 1))[-len(MAGIC):]
        if window == MAGIC:
            rest = _recv_exact(sock, _HEADER.size - len(MAGIC))
            _, length = _check_header(MAGIC + rest)
            return decode_frame(MAGIC + rest + _recv_exact(sock, length + 4))
    raise ProtocolError("no frame in 1 MiB of serial input")


def relay_round(address: str, expected_hash: str, meta: dict[str, Any], downlink: bytes, *,
                timeout: float = 120.0) -> DeviceReply:
    """Connect, check the device's HELLO (protocol, model hash), send TRAIN, wait for UPDATE.

    Raises
    ------
    ProtocolError
        On a wrong version or model hash, a device ERROR, a broken frame, a timeout or a
        closed connection.
    """
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ProtocolError(f"cannot reach the device at {address}: {exc}") from None
    with sock:
        if is_serial(address):
            send_frame(sock, HELLO, json.dumps({"protocol": VERSION}).encode())
            hello = _read_synced(sock, timeout)
        else:
            hello = read_frame(sock, timeout)
        if hello.type != HELLO:
            raise ProtocolError(f"expected HELLO from the device, got frame type {hello.type}")
        h = hello.json()
        if h.get("protocol") != VERSION:
            send_frame(sock, ERROR, json.dumps({"code": "version", "message": f"bridge speaks {VERSION}"}).encode())
            raise ProtocolError(f"device speaks protocol {h.get('protocol')!r}, the bridge {VERSION}")
        if h.get("model_hash") != expected_hash:
            send_frame(sock, ERROR, json.dumps({"code": "model", "message": "model hash mismatch"}).encode())
            raise ProtocolError(f"model hash mismatch: device runs {h.get('model_hash')!r}, the federation "
                                f"{expected_hash!r} (flash the device with this scenario's model)")
        send_frame(sock, TRAIN, pack_blob(meta, downlink))
        metrics: dict[str, float] = {}
        while True:
            frame = read_frame(sock, timeout)
            if frame.type == METRICS:
                metrics = {k: float(v) for k, v in frame.json().items() if isinstance(v, (int, float))}
            elif frame.type == ERROR:
                raise ProtocolError(f"device error: {frame.json().get('message', '')[:300]}")
            elif frame.type == UPDATE:
                head, update = unpack_blob(frame.payload)
                n = head.get("num_examples")
                if not isinstance(n, int):
                    raise ProtocolError(f"UPDATE without an integer num_examples: {n!r}")
                m = {k: float(v) for k, v in (head.get("metrics") or metrics).items() if isinstance(v, (int, float))}
                info = {k: str(v)[:300] for k, v in (head.get("info") or {}).items()}
                return DeviceReply(update, n, m, info)
            else:
                raise ProtocolError(f"unexpected frame type {frame.type} from the device")
