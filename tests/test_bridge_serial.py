"""The bridge on a serial port: a pseudo-terminal pair stands in for the cable.

The device end is the Python emulator (``fedtiny.device_emulator.serve_serial`` on the pty's master);
the bridge opens the slave's path through pyserial as ``serial:/dev/pts/N@115200``. Covers the
update bytes against ``local_round``, the ACK commit rule, a device that stalls mid-frame, line
noise before the HELLO (resync), garbage and a reset mid-round, and a faulty device through the
server's strategy (counted, the global model untouched by it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pty
import threading
import time
import tty

import numpy as np
import pytest
from conftest import ROOT

from fedtiny.bridge.address import parse_address
from fedtiny.bridge.protocol import (
    HELLO,
    TRAIN,
    UPDATE,
    ProtocolError,
    pack_blob,
    read_frame,
    send_frame,
    send_json,
    sync_frame,
    unpack_blob,
)
from fedtiny.bridge.relay import relay_round
from fedtiny.bridge.transport import open_stream

PROFILE = "mcu-256kb"  # a device the quickstart's sparse step fits, whatever the memory model counts
PARTITION = 1


@functools.lru_cache(maxsize=None)
def setup():
    """The scenario, the client's task, the model the server sends, its downlink bytes, the model hash."""
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.scenario import load_scenario, parse_overrides
    from fedtiny.server_setup import resolve_scheme

    # sparse uplink with error feedback (quickstart): the residual carried on the device changes round 2;
    # a few samples in steps of 16: a round takes a fraction of a second
    scenario = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        parse_overrides(
            ["run.clients=2", "data.max_samples=500", "train.batch_size=16", 'compression.downlink="full"']
        ),
    )
    task = make_task(scenario)
    state, _ = cloud_model(task)
    task = resolve_scheme(task, state)
    down = pack_dense(state, task.downlink_spec)
    return scenario, task, state, down, model_hash(client_task(scenario, task.scheme).downlink_spec)


def meta(server_round: int) -> dict:
    from fedtiny.federated.train import round_seed

    scenario, task, *_ = setup()
    return {
        "round": server_round,
        "scenario": scenario.to_json(),
        "scheme": task.scheme.to_json(),
        "downlink": "full",
        "seed": round_seed(scenario.run.seed, server_round, PARTITION),
    }


@functools.lru_cache(maxsize=None)
def host_rounds():
    """What the simulated client sends: round 1, round 2 after round 1, round 2 without round 1."""
    from fedtiny.devices import get_profile
    from fedtiny.federated.client import local_round

    scenario, task, _, down, _ = setup()
    run = functools.partial(
        local_round, scenario, PARTITION, kind="full", scheme=task.scheme, profile=get_profile(PROFILE)
    )
    r1, state = run(1, down, state={})
    r2, _ = run(2, down, state=state)
    r2_alone, _ = run(2, down, state={})
    assert r1.update and r2.update != r2_alone.update  # the carried residual matters: the tests can tell
    return r1.update, r2.update, r2_alone.update


@contextlib.contextmanager
def pty_device(fault: str = "", keepalive_s: float = 5.0):
    """The emulator on a pseudo-terminal's master; yields the bridge's address of the slave end."""
    from fedtiny.device_emulator import serve_serial
    from fedtiny.devices import get_profile

    scenario = setup()[0]
    master, slave = pty.openpty()
    tty.setraw(slave)  # no echo, no line discipline: a cable (pyserial sets the same when it opens it)
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_serial,
        args=(f"fd:{master}", scenario, PARTITION, get_profile(PROFILE)),
        kwargs={"fault": fault, "keepalive_s": keepalive_s, "stop": stop, "log": None},
        daemon=True,
    )
    thread.start()
    try:
        yield f"serial:{os.ttyname(slave)}@115200"
    finally:
        stop.set()
        thread.join(10)
        os.close(master)
        os.close(slave)


def relay(address: str, server_round: int, **kw):
    *_, down, digest = setup()
    return relay_round(address, digest, meta(server_round), down, **{"timeout": 30.0, **kw})


def test_addresses_parse_and_a_missing_port_names_itself():
    a = parse_address("serial:/dev/ttyACM0")
    assert (a.kind, a.path, a.baud, a.serial) == ("serial-port", "/dev/ttyACM0", 115200, True)
    assert (parse_address("serial:COM3@9600").path, parse_address("serial:COM3@9600").baud) == ("COM3", 9600)
    assert parse_address("serial:127.0.0.1:7070").kind == "serial-tcp"
    assert parse_address("127.0.0.1:7070").kind == "tcp" and not parse_address("127.0.0.1:7070").serial
    with pytest.raises(ProtocolError, match="serial port '/dev/fedtiny-no-such-tty'"):
        relay_round("serial:/dev/fedtiny-no-such-tty@115200", "0" * 16, {"round": 1}, b"", timeout=1)
    from fedtiny.scenario import load_scenario, parse_overrides

    s = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        parse_overrides(['bridge.devices={1="serial:/dev/ttyACM0@921600", 2="serial:COM3"}']),
    )
    assert s.device_address(1) == "serial:/dev/ttyACM0@921600" and s.bridge.round_timeout_s == 3600.0


def test_two_rounds_over_a_serial_port_equal_the_simulated_clients():
    """Round 1 is the simulated client's bytes; ACKed, round 2 is the client's round 2 (the residual kept)."""
    r1, r2, _ = host_rounds()
    with pty_device() as address:
        first = relay(address, 1)
        second = relay(address, 2)
    assert first.update == r1 and second.update == r2
    assert first.info["device"] == PROFILE and first.num_examples > 0
    assert first.busy >= 2 and first.progress[0] == first.progress[1] == first.metrics["steps"]


def test_a_round_without_ack_is_not_committed():
    """The bridge read round 1's UPDATE but never acknowledged it: round 2 trains from the state before round 1."""
    _, r2, r2_alone = host_rounds()
    down = setup()[3]
    with pty_device() as address:
        with open_stream(address, 5) as line:  # a bridge that dies right after reading the UPDATE
            send_json(line, HELLO, {"protocol": 1})
            sync_frame(line, lambda f: f.type == HELLO, 10)
            send_frame(line, TRAIN, pack_blob(meta(1), down))
            frame = read_frame(line, 30)
            while frame.type != UPDATE:
                frame = read_frame(line, 30)
            assert unpack_blob(frame.payload)[1] == host_rounds()[0]
        second = relay(address, 2)
    assert second.update == r2_alone and second.update != r2


def test_line_noise_and_stale_frames_before_the_hello_are_skipped():
    """Noise, a stale BUSY and a truncated UPDATE precede the device's HELLO: the bridge resyncs on it."""
    with pty_device("noise") as address:
        assert relay(address, 1).update == host_rounds()[0]


def test_a_device_that_stalls_mid_frame_fails_within_the_idle_timeout():
    with pty_device("stall") as address:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match=f"device {address}: timed out.*mid-frame"):
            relay(address, 1, timeout=0.5)
        assert time.monotonic() - start < 5


def test_keep_alives_hold_the_idle_timeout_but_not_the_round_limit():
    """A device whose round hangs but sends BUSY every 0.05 s: the 0.3 s idle timeout never fires, the
    whole-round limit (1 s) ends the exchange."""
    with pty_device("busy", keepalive_s=0.05) as address:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match=r"time limit.*bridge.round_timeout_s = 1 s"):
            relay(address, 1, timeout=0.3, round_timeout=1.0)
        assert 1.0 <= time.monotonic() - start < 5


def test_garbage_or_a_reset_mid_round_is_a_protocol_error():
    with pty_device("garbage") as address:
        with pytest.raises(ProtocolError, match="bad magic"):
            relay(address, 1, timeout=5)
    with pty_device("reset") as address:
        with pytest.raises(ProtocolError, match="HELLO in the middle of round 1: it reset"):
            relay(address, 1, timeout=5)


def test_a_device_that_resets_is_counted_and_leaves_the_global_model_alone(flower_task_identity):
    """The strategy's real path: partition 1 is a bridged board that resets mid-round. Its error reply is a
    rejection with the reason, the round goes on, and the global model is the one partition 0 alone makes."""
    from clients.bridge import relay as bridge_relay
    from clients.wire import bytes_record, reply_content, train_jobs
    from fedtiny.devices import get_profile
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.federated.client import local_round
    from server.strategy import FedTinyStrategy

    scenario, task, state, down, _ = setup()
    trained = [n for n, *_ in task.uplink_spec]
    outcomes = {"bridged": [], "alone": []}
    strategies = {
        k: FedTinyStrategy(task, {0: 100, 1: 101}, GlobalModel(state, trained), on_round=[outcomes[k].append])
        for k in outcomes
    }
    record = bytes_record(down)
    sent = {k: list(s.configure_train(1, record, None, None)) for k, s in strategies.items()}
    to0 = next(m for m in sent["bridged"] if m.metadata.dst_node_id == 100)
    (job,) = train_jobs(to0.content, 0)
    result, _ = local_round(
        scenario, 0, 1, job.downlink, kind=job.kind, scheme=task.scheme, profile=get_profile(PROFILE)
    )
    assert result.update
    to1 = next(m for m in sent["bridged"] if m.metadata.dst_node_id == 101)
    missing = bridge_relay(to1, "serial:/dev/fedtiny-no-such-tty@9600", 1.0, 1)  # a SuperNode's bad device-address
    assert "serial port '/dev/fedtiny-no-such-tty'" in missing.content["info"]["error"]
    with pty_device("reset") as address:
        failed = bridge_relay(to1, address, 5.0, 1)
        with pytest.raises(ProtocolError, match="exclusively lock"):  # one bridge per port
            with open_stream(address, 1):
                open_stream(address, 1)
    from flwr.app import Message

    replies = {
        k: [
            Message(
                reply_content([(0, result)], cohort=False),
                reply_to=next(m for m in sent[k] if m.metadata.dst_node_id == 100),
            )
        ]
        for k in outcomes
    }
    replies["bridged"].append(failed)
    for k, s in strategies.items():
        new, _ = s.aggregate_train(1, replies[k])
        assert new is not None  # the round went on
    stats = outcomes["bridged"][0].stats
    assert [c["partition_id"] for c in stats.clients] == [0]
    (rej,) = stats.rejected
    assert rej["partition_id"] == 1
    assert rej["reason"].startswith(f"client error: bridged device: device {address}: the device sent HELLO")
    for name in trained:
        np.testing.assert_array_equal(
            strategies["bridged"].global_model.master[name], strategies["alone"].global_model.master[name]
        )
