"""A reference device for the bridge protocol: a TCP server that trains like an MCU client.

``fedtiny device-emulator`` runs it. It holds one data partition of its scenario, a device
profile whose memory it respects (it refuses a scheme that does not fit), and its persistent
state (the model it received, its error-feedback residual) across rounds, and it answers TRAIN
frames with fedtiny's int8/QAS/sparse client code. It is a stand-in for firmware and a test peer.
"""

from __future__ import annotations

import dataclasses

import json
import socket
import sys
from typing import Any

from fedtiny.bridge.protocol import (ERROR, HELLO, METRICS, TRAIN, UPDATE, VERSION, ProtocolError, model_hash,
                                     pack_blob, read_frame, send_frame, unpack_blob)

__all__ = ["serve", "handle_connection"]


def handle_connection(conn: socket.socket, scenario, partition_id: int, profile, state: dict[str, Any], *,
                      timeout: float = 300.0, fault: str = "", log=sys.stderr) -> None:
    """Serve one bridge connection until it closes."""
    from fedtiny.federated.client import client_task, local_round
    from fedtiny.scenario import scenario_from_json
    from fedtiny.budget.schemes import ResolvedScheme

    hello = {"protocol": VERSION, "profile": profile.name, "model_hash": model_hash(client_task(scenario).downlink_spec),
             "partition_id": partition_id}
    send_frame(conn, HELLO, json.dumps(hello).encode())
    while True:
        try:
            frame = read_frame(conn, timeout)
        except ProtocolError:
            return  # the bridge closed (or broke) the connection: wait for the next one
        if frame.type == ERROR:
            print(f"[device] bridge error: {frame.payload[:200]!r}", file=log)
            return
        if frame.type != TRAIN:
            send_frame(conn, ERROR, json.dumps({"code": "unexpected", "message": f"frame type {frame.type}"}).encode())
            continue
        if fault == "disconnect":  # test peer: vanish mid-round
            conn.close()
            return
        meta, downlink = unpack_blob(frame.payload)
        try:
            sent = scenario_from_json(meta["scenario"])
            # what runs the step (PyTorch or the C step) is the device's own choice; the numbers are the same
            sent = dataclasses.replace(sent, train=dataclasses.replace(sent.train, engine=scenario.train.engine))
            result, new_state = local_round(sent, partition_id, int(meta["round"]),
                                            downlink, kind=str(meta.get("downlink", "full")),
                                            scheme=ResolvedScheme.from_json(meta["scheme"]) if meta.get("scheme")
                                            else None, state=state, profile=profile)
        except Exception as exc:  # report to the bridge instead of dying
            send_frame(conn, ERROR, json.dumps({"code": "train-failed", "message": str(exc)[:500]}).encode())
            continue
        state.clear()
        state.update(new_state)
        metrics = result.metrics()
        send_frame(conn, METRICS, json.dumps(metrics).encode())
        send_frame(conn, UPDATE, pack_blob({"num_examples": result.num_examples, "metrics": metrics,
                                            "info": result.info()}, result.update))
        print(f"[device] round {meta['round']}: {len(result.update)} bytes sent"
              + (f" (refused: {result.refusal})" if result.refusal else ""), file=log, flush=True)


def serve(port: int, scenario, partition_id: int, profile, *, host: str = "127.0.0.1", fault: str = "",
          max_connections: int | None = None, ready=None, log=sys.stderr) -> None:
    """Listen on ``host:port`` and serve bridge connections one at a time."""
    state: dict[str, Any] = {}
    with socket.create_server((host, port)) as srv:
        if ready is not None:
            ready.set()
        print(f"[device] {profile.name} emulator on {host}:{srv.getsockname()[1]} (partition {partition_id})",
              file=log, flush=True)
        served = 0
        while max_connections is None or served < max_connections:
            conn, _ = srv.accept()
            with conn:
                handle_connection(conn, scenario, partition_id, profile, state, fault=fault, log=log)
            served += 1
