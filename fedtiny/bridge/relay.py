"""The bridge side: relay one round to a device over the protocol and bring back its update."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from fedtiny.bridge.protocol import (ERROR, HELLO, METRICS, TRAIN, UPDATE, VERSION, ProtocolError, pack_blob,
                                     read_frame, send_frame, unpack_blob)

__all__ = ["DeviceReply", "relay_round", "parse_address"]


@dataclass(frozen=True)
class DeviceReply:
    """What a device sent back (bytes untrusted: the server's codec validates them)."""

    update: bytes
    num_examples: int
    metrics: dict[str, float]
    info: dict[str, str]


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ProtocolError(f"device address {address!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


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
