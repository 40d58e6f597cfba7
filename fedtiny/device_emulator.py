"""A reference device for the bridge protocol: an emulated MCU client on TCP or on a serial line.

``fedtiny device-emulator`` runs it. It holds one data partition of its scenario, a device
profile whose memory it respects (it refuses a scheme that does not fit), and its persistent
state (the model it received, its error-feedback residual) across rounds, and it answers TRAIN
frames with fedtiny's int8/QAS/sparse client code. It is a stand-in for firmware and a test peer.

It behaves as docs/protocol.md asks of a device:

- on TCP it sends HELLO first on each connection; on a serial line (:func:`serve_serial`,
  :func:`serve_stream` with ``serial=True``) it waits, skips bytes before a frame's magic, answers
  a broken frame with ERROR, and answers the bridge's HELLO with its own;
- it sends BUSY before training, every ``keepalive_s`` seconds while it trains, and after;
- the state a round produces is pending until the bridge's ACK of that round; a TRAIN that comes
  without it drops the pending state, so the device trains from the state the server last got.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
from typing import Any, Callable

from fedtiny.bridge.protocol import (
    ACK,
    BUSY,
    ERROR,
    HELLO,
    MAGIC,
    METRICS,
    TRAIN,
    UPDATE,
    VERSION,
    Frame,
    ProtocolError,
    encode_frame,
    model_hash,
    pack_blob,
    read_frame,
    send_frame,
    send_json,
    unpack_blob,
)
from fedtiny.bridge.transport import FdStream, SerialStream, SocketStream, Stream
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.errors import StreamClosed
from fedtiny.federated.client import client_task, local_round
from fedtiny.scenario import scenario_from_json

__all__ = ["serve", "serve_serial", "serve_stream", "handle_connection", "FAULTS"]

FAULTS = {
    "": "none",
    "disconnect": "vanish when TRAIN arrives (TCP: close the connection; serial: stop serving)",
    "stall": "on TRAIN, send half of a BUSY frame, then nothing until the next frame",
    "reset": "on TRAIN, lose all state and send HELLO, as a board that rebooted",
    "garbage": "on TRAIN, send bytes that are not a frame instead of training",
    "busy": "on TRAIN, send BUSY every keepalive_s and never an UPDATE (a training loop that hangs but ticks)",
    "noise": "before each HELLO, send line noise, a stale BUSY and a truncated UPDATE (serial leftovers)",
}
_NOISE = bytes(range(0x80, 0xC0)) + b"\x00\xff\x13FT"  # never the magic


def _say(log, text: str) -> None:
    if log is not None:
        print(f"[device] {text}", file=log, flush=True)


class _Device:
    """One emulated device: its committed state, the pending state of its last UPDATE, its writer lock."""

    def __init__(
        self,
        stream: Stream,
        scenario,
        partition_id: int,
        profile,
        state: dict[str, Any],
        *,
        fault: str,
        keepalive_s: float,
        log,
    ) -> None:
        if fault not in FAULTS:
            raise ProtocolError(f"unknown emulator fault {fault!r}; known: {', '.join(k for k in FAULTS if k)}")
        self.stream, self.scenario, self.partition_id, self.profile = stream, scenario, partition_id, profile
        self.state, self.fault, self.keepalive_s, self.log = state, fault, keepalive_s, log
        self.pending: tuple[int, dict[str, Any]] | None = None
        self.lock = threading.Lock()
        self.hung: tuple[threading.Event, threading.Thread] | None = None  # the fault "busy"
        self.hello = {
            "protocol": VERSION,
            "profile": profile.name,
            "partition_id": partition_id,
            "model_hash": model_hash(client_task(scenario).downlink_spec),
        }

    def send(self, ftype: int, payload: bytes) -> None:
        with self.lock:
            send_frame(self.stream, ftype, payload)

    def send_json(self, ftype: int, obj: dict[str, Any]) -> None:
        with self.lock:
            send_json(self.stream, ftype, obj)

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.stream.write(data)

    def say_hello(self) -> None:
        if self.fault == "noise":
            stale = encode_frame(UPDATE, pack_blob({"num_examples": 1}, b"\x01" * 64))
            self.send_raw(_NOISE + encode_frame(BUSY, b'{"round": 0, "step": 1, "steps": 2}') + stale[:20])
        self.send_json(HELLO, self.hello)

    def on_frame(self, frame: Frame) -> bool:
        """Handle one frame from the bridge; ``False``: stop serving (the fault ``disconnect``)."""
        self.close()
        if frame.type == HELLO:
            self.say_hello()
        elif frame.type == ACK:
            self.on_ack(frame)
        elif frame.type == ERROR:
            _say(self.log, f"bridge error: {frame.payload[:200]!r}")
        elif frame.type == TRAIN:
            if self.pending is not None:
                _say(self.log, f"round {self.pending[0]} was never acknowledged: training from the state before it")
                self.pending = None
            return self.train(frame)
        else:
            self.send_json(ERROR, {"code": "unexpected", "message": f"frame type {frame.type}"})
        return True

    def on_ack(self, frame: Frame) -> None:
        try:
            acked = frame.json().get("round")
        except ProtocolError:
            acked = None
        if self.pending is not None and acked == self.pending[0]:
            self.state.clear()
            self.state.update(self.pending[1])
            _say(self.log, f"round {acked} acknowledged: state committed")
            self.pending = None
        else:
            _say(self.log, f"ACK of round {acked!r} ignored (pending: {self.pending[0] if self.pending else None})")

    def train(self, frame: Frame) -> bool:
        if self.fault == "disconnect":
            return False
        if self.fault == "stall":
            self.send_raw(encode_frame(BUSY, b'{"round": 0, "step": 0, "steps": 0}')[:7])
            return True
        if self.fault == "reset":
            self.state.clear()
            self.pending = None
            self.send_json(HELLO, self.hello)
            return True
        if self.fault == "garbage":
            self.send_raw(_NOISE * 4)
            return True
        if self.fault == "busy":
            done = threading.Event()
            beat = threading.Thread(
                target=self._keepalive, args=(done, unpack_blob(frame.payload)[0].get("round")), daemon=True
            )
            beat.start()
            self.hung = (done, beat)
            return True
        meta, downlink = unpack_blob(frame.payload)
        server_round = meta.get("round")
        self.send_json(BUSY, {"round": server_round, "step": 0, "steps": 0})
        done = threading.Event()
        beat = threading.Thread(target=self._keepalive, args=(done, server_round), daemon=True)
        beat.start()
        try:
            result, new_state = self._local_round(meta, downlink)
        except Exception as exc:  # report to the bridge instead of dying
            done.set()
            beat.join()
            self.send_json(ERROR, {"code": "train-failed", "message": str(exc)[:500]})
            return True
        done.set()
        beat.join()
        self.send_json(BUSY, {"round": server_round, "step": result.steps, "steps": result.steps})
        self.pending = (int(server_round), new_state)
        metrics = result.metrics()
        self.send(METRICS, json.dumps(metrics).encode())
        self.send(
            UPDATE,
            pack_blob({"num_examples": result.num_examples, "metrics": metrics, "info": result.info()}, result.update),
        )
        _say(
            self.log,
            f"round {server_round}: {len(result.update)} bytes sent"
            + (f" (refused: {result.refusal})" if result.refusal else ""),
        )
        return True

    def close(self) -> None:
        """Stop a hung round's keep-alives (the fault ``busy``)."""
        if self.hung is not None:
            self.hung[0].set()
            self.hung[1].join()
            self.hung = None

    def _keepalive(self, done: threading.Event, server_round: Any) -> None:
        while not done.wait(self.keepalive_s):
            try:
                self.send_json(BUSY, {"round": server_round, "step": 0, "steps": 0})
            except ProtocolError:
                return

    def _local_round(self, meta: dict[str, Any], downlink: bytes):
        sent = scenario_from_json(meta["scenario"])
        # what runs the step (PyTorch or the C step) is the device's own choice; the numbers are the same
        sent = dataclasses.replace(sent, train=dataclasses.replace(sent.train, engine=self.scenario.train.engine))
        return local_round(
            sent,
            self.partition_id,
            int(meta["round"]),
            downlink,
            kind=str(meta.get("downlink", "full")),
            scheme=ResolvedScheme.from_json(meta["scheme"]) if meta.get("scheme") else None,
            state=self.state,
            profile=self.profile,
        )


def _next_frame(device: _Device, poll: float, stopped: Callable[[], bool]) -> Frame | None:
    """The next intact frame on a serial line: bytes before a magic are skipped, a broken frame is
    answered with ERROR (as the firmware does). ``None`` once ``stopped()``."""
    window = b""
    while not stopped():
        byte = device.stream.read(1, poll)
        if not byte:
            continue
        window = (window + byte)[-len(MAGIC) :]
        if window != MAGIC:
            continue
        device.stream.unread(MAGIC)
        window = b""
        try:
            return read_frame(device.stream, 5.0)
        except StreamClosed:
            raise
        except ProtocolError as exc:
            device.send_json(ERROR, {"code": "frame", "message": str(exc)[:300]})
    return None


def serve_stream(
    stream: Stream,
    scenario,
    partition_id: int,
    profile,
    state: dict[str, Any],
    *,
    serial: bool,
    timeout: float | None = 300.0,
    fault: str = "",
    keepalive_s: float = 5.0,
    stop: threading.Event | None = None,
    log=sys.stderr,
) -> None:
    """Serve the bridge on one stream until it closes (or ``stop`` is set).

    Parameters
    ----------
    serial
        A serial line: wait for the bridge's HELLO and resynchronise on the magic. Otherwise (a TCP
        connection) send HELLO first and read frames strictly, ``timeout`` seconds each.
    state
        The device's committed state, kept by the caller across connections; updated on ACK.
    stop
        Set it to make a serial device return (checked every 0.2 s).
    """
    device = _Device(stream, scenario, partition_id, profile, state, fault=fault, keepalive_s=keepalive_s, log=log)
    stopped = stop.is_set if stop is not None else (lambda: False)
    try:
        if not serial:
            device.say_hello()
        while not stopped():
            if serial:
                frame = _next_frame(device, 0.2, stopped)
                if frame is None:
                    return
            else:
                try:
                    frame = read_frame(stream, timeout)
                except ProtocolError:
                    return  # the bridge closed (or broke) the connection: wait for the next one
            if not device.on_frame(frame):
                return
    except StreamClosed as exc:
        _say(log, f"stream closed: {exc}")
    finally:
        device.close()


def handle_connection(
    conn: socket.socket,
    scenario,
    partition_id: int,
    profile,
    state: dict[str, Any],
    *,
    timeout: float = 300.0,
    fault: str = "",
    log=sys.stderr,
) -> None:
    """Serve one bridge connection until it closes."""
    serve_stream(
        SocketStream(conn), scenario, partition_id, profile, state, serial=False, timeout=timeout, fault=fault, log=log
    )
    if fault == "disconnect":
        conn.close()


def serve(
    port: int,
    scenario,
    partition_id: int,
    profile,
    *,
    host: str = "127.0.0.1",
    fault: str = "",
    max_connections: int | None = None,
    ready=None,
    log=sys.stderr,
) -> None:
    """Listen on ``host:port`` and serve bridge connections one at a time."""
    state: dict[str, Any] = {}
    with socket.create_server((host, port)) as srv:
        if ready is not None:
            ready.set()
        _say(log, f"{profile.name} emulator on {host}:{srv.getsockname()[1]} (partition {partition_id})")
        served = 0
        while max_connections is None or served < max_connections:
            conn, _ = srv.accept()
            with conn:
                handle_connection(conn, scenario, partition_id, profile, state, fault=fault, log=log)
            served += 1


def serve_serial(
    path: str,
    scenario,
    partition_id: int,
    profile,
    *,
    baud: int = 115200,
    fault: str = "",
    keepalive_s: float = 5.0,
    stop: threading.Event | None = None,
    log=sys.stderr,
) -> None:
    """Serve the bridge on a serial port (the device's end of a cable, or one end of a pseudo-terminal pair).

    ``path`` is a port pyserial opens (``/dev/ttyUSB0``, ``COM4``, a ``/dev/pts/N``), or ``fd:N`` for an
    open file descriptor (a pseudo-terminal's master in tests).
    """
    if path.startswith("fd:"):
        stream: Stream = FdStream(int(path[3:]), path)
    else:
        stream = SerialStream(path, baud)
    with stream:
        _say(log, f"{profile.name} emulator on serial port {path} (partition {partition_id})")
        serve_stream(
            stream,
            scenario,
            partition_id,
            profile,
            {},
            serial=True,
            fault=fault,
            keepalive_s=keepalive_s,
            stop=stop,
            log=log,
        )
