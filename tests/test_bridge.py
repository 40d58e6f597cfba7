"""Bridge protocol frames, the device emulator, and the bridge surviving a device that vanishes."""

import json
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from conftest import ROOT

from fedtiny.bridge.protocol import (
    HELLO,
    TRAIN,
    UPDATE,
    ProtocolError,
    decode_frame,
    encode_frame,
    pack_blob,
    read_frame,
    unpack_blob,
)


@pytest.mark.parametrize(
    "ftype, payload", [(HELLO, b'{"protocol": 1}'), (TRAIN, pack_blob({"round": 3}, b"\x00\x01")), (UPDATE, b"")]
)
def test_frame_round_trip(ftype, payload):
    f = decode_frame(encode_frame(ftype, payload))
    assert (f.type, f.payload) == (ftype, payload)


def test_blob_round_trip():
    meta, blob = unpack_blob(pack_blob({"a": 1, "b": "x"}, b"\xff" * 10))
    assert meta == {"a": 1, "b": "x"} and blob == b"\xff" * 10


def test_crc_failure_truncation_and_version():
    data = bytearray(encode_frame(HELLO, b'{"protocol": 1}'))
    data[12] ^= 0x01
    with pytest.raises(ProtocolError, match="CRC"):
        decode_frame(bytes(data))
    good = encode_frame(HELLO, b"{}")
    for n in range(len(good)):
        with pytest.raises(ProtocolError, match="truncated"):
            decode_frame(good[:n])
    head = struct.pack("<3sBBBI", b"FTB", 2, HELLO, 0, 2) + b"{}"
    with pytest.raises(ProtocolError, match="version 2"):
        decode_frame(head + struct.pack("<I", zlib.crc32(head)))
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_frame(b"XYZ" + good[3:])


def test_read_frame_times_out_and_detects_close():
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ProtocolError, match="timed out"):
            read_frame(a, timeout=0.2)
        b.sendall(encode_frame(HELLO, b"{}")[:6])
        b.close()
        with pytest.raises(ProtocolError, match="closed"):
            read_frame(a, timeout=1)


def _emulator(port_box, fault="", engine="torch"):
    from fedtiny.device_emulator import serve
    from fedtiny.devices import get_profile
    from fedtiny.scenario import load_scenario, parse_overrides

    scenario = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        parse_overrides(["run.clients=2", "model.pretrain_epochs=2", f"train.engine={engine!r}"]),
    )
    srv = socket.create_server(("127.0.0.1", 0))
    port_box.append(srv.getsockname()[1])
    srv.close()
    ready = threading.Event()
    t = threading.Thread(
        target=serve,
        args=(port_box[0], scenario, 1, get_profile("nrf52832")),
        kwargs={"fault": fault, "ready": ready, "max_connections": 2, "log": None},
        daemon=True,
    )
    t.start()
    ready.wait(10)
    return scenario


def test_relay_to_emulator_returns_a_valid_update_and_checks_the_model_hash():
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.server_setup import resolve_scheme

    port = []
    scenario = _emulator(port)
    task = make_task(scenario)
    state, _ = cloud_model(task)
    task = resolve_scheme(task, state)
    from fedtiny.compress.dense import pack_dense

    meta = {"round": 1, "scenario": scenario.to_json(), "scheme": task.scheme.to_json(), "downlink": "full"}
    with pytest.raises(ProtocolError, match="model hash mismatch"):
        relay_round(f"127.0.0.1:{port[0]}", "0000", meta, pack_dense(state, task.downlink_spec), timeout=60)
    reply = relay_round(
        f"127.0.0.1:{port[0]}", model_hash(task.downlink_spec), meta, pack_dense(state, task.downlink_spec), timeout=120
    )
    assert reply.num_examples > 0 and reply.info["device"] == "nrf52832"
    change = task.uplink.decode(reply.update, state)  # the server's decoder accepts it: valid for the model
    assert change and all(np.isfinite(v).all() for _, v in change.values())


def test_an_emulator_training_with_the_c_step_sends_the_same_bytes():
    """device-emulator --engine c: the device's C step gives the update the PyTorch exact step gives."""
    from conftest import build_c_library

    from fedtiny.bridge.protocol import model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.server_setup import resolve_scheme

    build_c_library("libfedtiny_step.so")
    replies = []
    for engine in ("torch", "c"):
        port = []
        scenario = _emulator(port, engine=engine)
        task = make_task(scenario)
        state, _ = cloud_model(task)
        task = resolve_scheme(task, state)
        meta = {"round": 1, "scenario": scenario.to_json(), "scheme": task.scheme.to_json(), "downlink": "full"}
        replies.append(
            relay_round(
                f"127.0.0.1:{port[0]}",
                model_hash(task.downlink_spec),
                meta,
                pack_dense(state, task.downlink_spec),
                timeout=120,
            )
        )
    assert replies[0].num_examples > 0 and replies[0].update == replies[1].update


def test_relay_fails_cleanly_when_the_device_disconnects_mid_round():
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.federated.task import make_task

    port = []
    scenario = _emulator(port, fault="disconnect")
    meta = {"round": 1, "scenario": scenario.to_json(), "scheme": "", "downlink": "full"}
    with pytest.raises(ProtocolError, match="closed|failed"):
        relay_round(f"127.0.0.1:{port[0]}", model_hash(make_task(scenario).downlink_spec), meta, b"", timeout=30)


def test_simulated_round_survives_a_device_that_disconnects(tmp_path, cli):
    """Partition 1 is a bridged device that vanishes mid-round: the round completes without it,
    and the failure is counted with its reason."""
    port = []
    _emulator(port, fault="disconnect")
    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=2",
        "--set",
        "run.rounds=1",
        "--set",
        "model.pretrain_epochs=2",
        "--set",
        f'bridge.devices="1=127.0.0.1:{port[0]}"',
        "--set",
        "bridge.timeout_s=20",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rejected_updates_total"] == 1 and summary["rounds"] == 1
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert [c["partition_id"] for c in rec["clients"]] == [0]
    (rej,) = rec["rejected"]
    assert rej["partition_id"] == 1 and "client error" in rej["reason"]
