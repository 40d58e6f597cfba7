"""The Cortex-M firmware (device/firmware) in QEMU against the simulator: the same update bytes.

Needs Debian's gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (.ci/run installs them
when it runs as root); without them the test is skipped with their names.
"""

import socket
import subprocess

import pytest

from conftest import ROOT
from fedtiny.tools.qemu import missing_packages, start_qemu

SCENARIO = ROOT / "scenarios" / "firmware-demo.toml"
MISSING = missing_packages()
pytestmark = pytest.mark.skipif(bool(MISSING), reason="the firmware test needs the Debian packages "
                                + ", ".join(MISSING) + " (apt-get install " + " ".join(MISSING) + ")")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def firmware(tmp_path_factory):
    from fedtiny.tools.firmware import generate

    out = tmp_path_factory.mktemp("firmware")
    summary = generate(str(SCENARIO), 1, out / "gen")
    subprocess.run(["make", "-s", "-C", str(ROOT / "device" / "firmware"), "BOARD=an386", f"GEN={out / 'gen'}",
                    f"OUT={out / 'an386'}"], check=True, capture_output=True)
    return out / "an386" / "firmware.elf", summary


def _round(server_round=1):
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task
    from fedtiny.federated.fleet import server_task
    from fedtiny.federated.train import round_seed
    from fedtiny.scenario import load_scenario

    task, initial, _, schemes = server_task(load_scenario(SCENARIO), progress=None)
    scheme = next(iter(schemes.by_profile.values()))
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    meta = {"round": server_round, "scenario": task.scenario.to_json(), "scheme": scheme.to_json(),
            "downlink": "full", "seed": round_seed(task.scenario.run.seed, server_round, 1)}
    return task, scheme, client, down, meta


def test_firmware_update_equals_the_simulators(firmware, tmp_path):
    """Two rounds (the error-feedback residual carried on the device): the firmware's UPDATE bytes equal
    the simulated client's, with the PyTorch exact step and with the host C step."""
    import dataclasses

    from fedtiny.bridge.protocol import ProtocolError, model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.federated.client import local_round

    elf, summary = firmware
    task, scheme, client, down, meta = _round(1)
    meta2 = {**meta, "round": 2, "seed": _round(2)[4]["seed"]}
    port = _free_port()
    qemu = start_qemu(elf, "an386", port, tmp_path / "qemu.log")
    try:
        address = f"serial:127.0.0.1:{port}"
        # a downlink whose frozen part is not the firmware's model is refused, and the device stays up
        bad = bytearray(down)
        bad[-1] ^= 0xFF  # the classifier's qparams: frozen
        with pytest.raises(ProtocolError, match="frozen tensor"):
            relay_round(address, model_hash(client.downlink_spec), meta, bytes(bad), timeout=120)
        replies = [relay_round(address, model_hash(client.downlink_spec), m, down, timeout=300) for m in (meta, meta2)]
    finally:
        qemu.kill()
        qemu.wait()
    on_c = dataclasses.replace(task.scenario, train=dataclasses.replace(task.scenario.train, engine="c"))
    for scenario in (task.scenario, on_c):
        state = {}
        for r, reply in zip((1, 2), replies):
            host, state = local_round(scenario, 1, r, down, kind="full", scheme=scheme, state=state)
            assert len(reply.update) > 0 and reply.update == host.update, (scenario.train.engine, r)
            assert reply.num_examples == host.num_examples == summary["samples"]
            assert abs(reply.metrics["train_loss"] - host.train_loss) < 1e-4
            assert reply.metrics["steps"] == host.steps
    assert replies[0].update != replies[1].update  # round 2 differs: its seed and the carried residual
    reply = replies[0]
    assert reply.metrics["arena_high_water"] == summary["arena_bytes"]
    # the device-time model of the reference kernels (device.kernels = "reference") predicts the measured
    # instructions per step within 10% (CPI 1; fedtiny.devices)
    weighted = summary["macs_forward_per_sample"] + summary["backward_factor"] * summary["macs_backward_per_sample"]
    predicted = summary["cycles_per_mac"] * weighted * summary["samples"] / reply.metrics["steps"]
    assert 0.9 < reply.metrics["instructions_per_step"] / predicted < 1.1
