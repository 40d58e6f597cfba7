"""The bridge side: relay one round to a device over the protocol and bring back its update.

One exchange (docs/protocol.md): open the device's stream (TCP connection or serial port); on a
serial line send a HELLO and skip the line's leftovers until the device's HELLO; check protocol and
model hash; send TRAIN; read BUSY (keep-alives), METRICS and finally UPDATE; acknowledge it with
ACK. Every read has the idle timeout (seconds without a byte from the device) and the whole
exchange a time limit. Anything else the device does (ERROR, a HELLO of a board that reset, a
broken frame, silence) raises :class:`ProtocolError`, which fails this client's round only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fedtiny.bridge.address import Address, parse_address
from fedtiny.bridge.protocol import (
    ACK,
    BUSY,
    ERROR,
    HELLO,
    METRICS,
    TRAIN,
    UPDATE,
    VERSION,
    Frame,
    ProtocolError,
    pack_blob,
    read_frame,
    send_frame,
    send_json,
    sync_frame,
    unpack_blob,
)
from fedtiny.bridge.transport import Stream, open_stream

__all__ = ["DeviceReply", "relay_round", "parse_address", "is_serial", "Address"]

log = logging.getLogger("fedtiny.bridge")


@dataclass(frozen=True)
class DeviceReply:
    """What a device sent back (bytes untrusted: the server's codec validates them).

    ``busy`` counts the BUSY frames of the round; ``progress`` is the last one's ``(step, steps)``.
    """

    update: bytes
    num_examples: int
    metrics: dict[str, float]
    info: dict[str, str]
    busy: int = 0
    progress: tuple[int, int] = (0, 0)


def is_serial(address: str) -> bool:
    """A serial line (``serial:HOST:PORT`` or ``serial:/dev/...``): the bridge opens each exchange with a
    HELLO of its own, as a line has no connections."""
    return parse_address(address).serial


def relay_round(
    address: str,
    expected_hash: str,
    meta: dict[str, Any],
    downlink: bytes,
    *,
    timeout: float = 30.0,
    round_timeout: float = 0.0,
) -> DeviceReply:
    """Run one round on the device at ``address``: HELLO, TRAIN, (BUSY | METRICS)*, UPDATE, ACK.

    Parameters
    ----------
    address
        A device address (:mod:`fedtiny.bridge.address`).
    expected_hash
        The federation's model hash, which the device's HELLO must carry.
    meta, downlink
        TRAIN's JSON header (``round`` included) and the downlink bytes.
    timeout
        The idle timeout: seconds without a byte from the device (``bridge.timeout_s``).
    round_timeout
        Seconds the whole exchange may take (``bridge.round_timeout_s``); 0: no limit.

    Raises
    ------
    ProtocolError
        Naming the device: a malformed address, a port that cannot be opened, a wrong version or
        model hash, a device ERROR, a HELLO mid-round (the board reset), a broken frame, the idle
        timeout, the time limit, or a closed connection.
    """
    addr = parse_address(address)
    server_round = int(meta.get("round", 0))
    deadline = time.monotonic() + round_timeout if round_timeout > 0 else None
    try:
        with open_stream(addr, timeout) as stream:
            return _exchange(stream, addr, expected_hash, meta, downlink, server_round, timeout, deadline)
    except ProtocolError as exc:
        limit = (
            f" (bridge.round_timeout_s = {round_timeout:g} s)"
            if deadline is not None and time.monotonic() >= deadline
            else ""
        )
        text = str(exc)
        raise ProtocolError(f"{text if address in text else f'device {address}: {text}'}{limit}") from None


def _exchange(
    stream: Stream,
    addr: Address,
    expected_hash: str,
    meta: dict[str, Any],
    downlink: bytes,
    server_round: int,
    timeout: float,
    deadline: float | None,
) -> DeviceReply:
    if addr.serial:
        stream.discard_input()  # what is already here is an earlier exchange's
        send_json(stream, HELLO, {"protocol": VERSION})
        skipped: list[str] = []
        hello = sync_frame(stream, lambda f: f.type == HELLO, timeout, deadline=deadline, skipped=skipped)
        if skipped:
            log.info("%s: skipped %s before the device's HELLO", addr.text, ", ".join(skipped))
    else:
        hello = read_frame(stream, timeout, deadline=deadline)
    if hello.type != HELLO:
        raise ProtocolError(f"expected HELLO from the device, got a {hello.name} frame")
    h = hello.json()
    if h.get("protocol") != VERSION:
        send_json(stream, ERROR, {"code": "version", "message": f"bridge speaks {VERSION}"})
        raise ProtocolError(f"device speaks protocol {h.get('protocol')!r}, the bridge {VERSION}")
    if h.get("model_hash") != expected_hash:
        send_json(stream, ERROR, {"code": "model", "message": "model hash mismatch"})
        raise ProtocolError(
            f"model hash mismatch: device runs {h.get('model_hash')!r}, the federation "
            f"{expected_hash!r} (flash the device with this scenario's model)"
        )
    send_frame(stream, TRAIN, pack_blob(meta, downlink))
    metrics: dict[str, float] = {}
    busy, progress = 0, (0, 0)
    while True:
        frame = read_frame(stream, timeout, deadline=deadline)
        if frame.type == BUSY:
            busy += 1
            progress = _progress(frame, server_round, progress)
        elif frame.type == METRICS:
            metrics = {k: float(v) for k, v in frame.json().items() if _scalar(v)}
        elif frame.type == ERROR:
            raise ProtocolError(f"device error in round {server_round}: {_error_text(frame)}")
        elif frame.type == HELLO:
            raise ProtocolError(
                f"the device sent HELLO in the middle of round {server_round}: it reset (or "
                f"restarted) while training; this round's update is lost"
            )
        elif frame.type == UPDATE:
            head, update = unpack_blob(frame.payload)
            n = head.get("num_examples")
            if not isinstance(n, int) or isinstance(n, bool):
                raise ProtocolError(f"UPDATE without an integer num_examples: {n!r}")
            # the device commits its round (residual, model) on this ACK only
            send_json(stream, ACK, {"round": server_round})
            m = {k: float(v) for k, v in (head.get("metrics") or metrics).items() if _scalar(v)}
            info = {k: str(v)[:300] for k, v in (head.get("info") or {}).items()}
            return DeviceReply(update, n, m, info, busy, progress)
        else:
            raise ProtocolError(f"unexpected {frame.name} frame from the device in round {server_round}")


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _progress(frame: Frame, server_round: int, last: tuple[int, int]) -> tuple[int, int]:
    """A BUSY frame's ``(step, steps)``; a keep-alive whose payload is not that is only a keep-alive."""
    try:
        body = frame.json()
    except ProtocolError:
        return last
    if body.get("round") != server_round:
        log.debug("BUSY for round %r during round %d", body.get("round"), server_round)
        return last
    step, steps = body.get("step"), body.get("steps")
    if isinstance(step, int) and isinstance(steps, int):
        log.debug("device at step %d of %d in round %d", step, steps, server_round)
        return step, steps
    return last


def _error_text(frame: Frame) -> str:
    try:
        body = frame.json()
    except ProtocolError:
        return repr(frame.payload[:200])
    code, message = str(body.get("code", ""))[:50], str(body.get("message", ""))[:300]
    return f"{code}: {message}" if code else message
