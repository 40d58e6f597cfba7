"""The Cortex-M firmware (device/firmware) in QEMU against the simulator: the same update bytes, and the RAM the
simulator counts for the whole client (fedtiny.budget.device_memory) is what the image links.

Two firmwares: scenarios/firmware-demo.toml (batches of 16 with accumulators, momentum, a float64 residual: an
nRF52840's 256 KB) and a quickstart client (one sample per step, no momentum, a compact residual: an nRF52832's
64 KB, the linker's limit).

Needs Debian's gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (.ci/run installs them
when it runs as root); without them the test is skipped with their names.
"""

import json
import socket
import subprocess

import pytest
from conftest import ROOT

from fedtiny.tools.qemu import missing_packages, start_qemu

MISSING = missing_packages()
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason="the firmware test needs the Debian packages "
    + ", ".join(MISSING)
    + " (apt-get install "
    + " ".join(MISSING)
    + ")",
)
SCENARIOS = {
    "firmware-demo": ROOT / "scenarios" / "firmware-demo.toml",
    "quickstart": ROOT / "scenarios" / "quickstart.toml",
}
# the demo's client on a tenth of the data (ten partitions: ~72 samples, 5 steps of 16), so that a round is
# seconds of emulation; make firmware-demo runs its 359 samples
OVERRIDES = {"firmware-demo": {"run.clients": 10}, "quickstart": {}}
# the quickstart's image abandons a frame after 200 ms of silence instead of 2 s: the test waits for it, and
# QEMU takes about 27 s of wall time per second of board time spent polling the UART
BUILD_FLAGS = {"firmware-demo": "", "quickstart": "-DBYTE_TIMEOUT_US=200000u"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sections(elf) -> dict[str, int]:
    out = subprocess.run(["arm-none-eabi-size", "-A", "-d", str(elf)], capture_output=True, text=True, check=True)
    return {
        p[0]: int(p[1])
        for p in (line.split() for line in out.stdout.splitlines())
        if len(p) >= 2 and p[0].startswith(".") and p[1].isdigit()
    }


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def firmware(request, tmp_path_factory):
    from fedtiny.tools.firmware import generate

    out = tmp_path_factory.mktemp(request.param)
    summary = generate(str(SCENARIOS[request.param]), 1, out / "gen", overrides=OVERRIDES[request.param])
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT / "device" / "firmware"),
            "BOARD=an386",
            f"GEN={out / 'gen'}",
            f"OUT={out / 'an386'}",
            f"EXTRA_CFLAGS={BUILD_FLAGS[request.param]}",
        ],
        check=True,
        capture_output=True,
    )
    return request.param, out / "an386" / "firmware.elf", summary


def _round(name, server_round=1):
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task
    from fedtiny.federated.train import round_seed
    from fedtiny.scenario import load_scenario
    from fedtiny.server_setup import server_task

    task, initial, _, schemes = server_task(load_scenario(SCENARIOS[name], OVERRIDES[name]), progress=None)
    scheme = next(iter(schemes.by_profile.values()))
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    meta = {
        "round": server_round,
        "scenario": task.scenario.to_json(),
        "scheme": scheme.to_json(),
        "downlink": "full",
        "seed": round_seed(task.scenario.run.seed, server_round, 1),
    }
    return task, scheme, client, down, meta


def test_firmware_update_equals_the_simulators(firmware, tmp_path):
    """Two rounds (the error-feedback residual carried on the device, committed on the bridge's ACK): the
    firmware's UPDATE bytes equal the simulated client's, with the PyTorch exact step and with the host C step;
    the image's RAM (.data + .bss + measured stack) is within 5% of the simulator's device_ram_bytes and
    within the profile; a TRAIN whose settings or frozen tensors differ from the image's is refused by name; the
    device sends a BUSY keep-alive per step; and (the quickstart's client) a TRAIN cut short is abandoned after
    the inter-byte timeout, and a round whose UPDATE the bridge never acknowledges leaves the residual as it was."""
    import dataclasses

    from fedtiny.bridge.protocol import ProtocolError, model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.federated.client import local_round

    name, elf, summary = firmware
    task, scheme, client, down, meta = _round(name, 1)
    meta2 = {**meta, "round": 2, "seed": _round(name, 2)[4]["seed"]}
    port = _free_port()
    qemu = start_qemu(elf, "an386", port, tmp_path / "qemu.log")
    try:
        address = f"serial:127.0.0.1:{port}"
        expected = model_hash(client.downlink_spec)
        if name == "firmware-demo":  # a downlink whose frozen part is not the firmware's model is refused
            bad = bytearray(down)
            bad[-1] ^= 0xFF  # the classifier's qparams: frozen
            with pytest.raises(ProtocolError, match="frozen tensor"):
                relay_round(address, expected, meta, bytes(bad), timeout=120)
        else:  # a scenario whose training settings differ from the image's: the device names the key
            other = json.loads(meta["scenario"])
            other["train"]["lr"] = 0.125
            with pytest.raises(ProtocolError, match="train.lr differs"):
                relay_round(
                    address, expected, {**meta, "scenario": json.dumps(other, sort_keys=True)}, down, timeout=120
                )
            unacked = _cut_frame_then_no_ack(port, meta, down)
        replies = [relay_round(address, expected, m, down, timeout=120) for m in (meta, meta2)]
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
            assert reply.metrics["device_ram_bytes"] == host.device_ram_bytes == summary["device_ram_bytes"]
    assert replies[0].update != replies[1].update  # round 2 differs: its seed and the carried residual
    for reply in replies:  # a BUSY keep-alive before training and after every step
        assert reply.busy == reply.metrics["steps"] + 1
    if name == "quickstart":  # the round the bridge never acknowledged sent round 1's update and left the
        assert unacked.endswith(replies[0].update)  # residual as it was: round 1 again gives the same bytes
    reply = replies[0]
    assert reply.metrics["arena_high_water"] == summary["arena_bytes"]
    # whole-device memory: what links (and the stack the round used) against the simulator's count
    sections = _sections(elf)
    stack = max(int(r.metrics["stack_bytes"]) for r in replies)
    linked = sections[".data"] + sections[".bss"] + sections.get(".bss2", 0) + stack
    assert abs(linked / summary["device_ram_bytes"] - 1) < 0.05, (linked, summary["device_ram"])
    assert linked <= summary["profile_sram_bytes"] and summary["device_ram_bytes"] <= summary["profile_sram_bytes"]
    assert stack <= summary["stack_reserved_bytes"]
    flash = sections[".vectors"] + sections[".text"] + sections[".data"]
    assert abs(flash / summary["device_flash_bytes"] - 1) < 0.05, (flash, summary["device_flash"])
    assert flash <= summary["profile_flash_bytes"]
    # the device-time model (kernel costs per op kind, fitted on tiny-ir trained in full: another scheme and
    # batch than these clients') predicts the measured instructions per step within 10%
    predicted = (
        summary["cycles_per_sample"] * summary["samples"] / reply.metrics["steps"] + summary["update_cycles_per_step"]
    )
    assert 0.9 < reply.metrics["instructions_per_step"] / predicted < 1.1, (reply.metrics, predicted)


def test_a_client_that_does_not_fit_is_refused_before_the_build(tmp_path):
    """The generator refuses a client whose whole device does not fit its profile, with the figure; and an
    image forced past the profile's SRAM does not link, naming the limit."""
    from fedtiny.errors import ScenarioError
    from fedtiny.tools.firmware import generate

    with pytest.raises(ScenarioError, match=r"does not fit nrf52832: device RAM [\d,]+ B > 65,536 B"):
        generate(str(SCENARIOS["quickstart"]), 1, tmp_path / "gen", overrides={"train.momentum": 0.9})
    gen = tmp_path / "small"
    generate(str(SCENARIOS["quickstart"]), 1, gen)
    memory = (gen / "firmware_memory.ld").read_text()
    (gen / "firmware_memory.ld").write_text(memory.replace("FW_RAM_BYTES = 65536", "FW_RAM_BYTES = 32768"))
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT / "device" / "firmware"),
            "BOARD=an386",
            f"GEN={gen}",
            f"OUT={tmp_path / 'an386'}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "RAM" in proc.stderr and "FW_RAM_BYTES" in proc.stderr, proc.stderr[-800:]


def _cut_frame_then_no_ack(port: int, meta: dict, down: bytes) -> bytes:
    """On the device's serial line: a TRAIN cut short (the device abandons it after its inter-byte timeout
    and says so), then a whole round whose UPDATE is never acknowledged; returns that UPDATE's payload."""
    from fedtiny.bridge.protocol import ERROR, HELLO, TRAIN, UPDATE, encode_frame, pack_blob, read_frame, send_frame

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(encode_frame(TRAIN, pack_blob(meta, down))[:1000])  # ... and then nothing
        got = read_frame(sock, 120)
        assert got.type == ERROR and got.json()["code"] == "timeout", got
        send_frame(sock, HELLO, b'{"protocol": 1}')
        assert read_frame(sock, 60).type == HELLO
        send_frame(sock, TRAIN, pack_blob(meta, down))
        frame = read_frame(sock, 120)
        while frame.type != UPDATE:
            frame = read_frame(sock, 120)
        return frame.payload


def test_every_op_of_the_firmware_step_equals_the_host_step(tmp_path):
    """The firmware's op-check build (DSP kernels, in QEMU) against the host's (portable kernels): every tensor
    of every step of a round, op by op (forward output and mask, quantized gradient, input gradient, updated
    weight and bias), the same bytes (scripts/firmware_opcheck.py, make firmware-opcheck)."""
    import json
    import sys

    from fedtiny.tools.firmware import generate

    generate(str(SCENARIOS["firmware-demo"]), 1, tmp_path / "gen", overrides=OVERRIDES["firmware-demo"])
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT / "device" / "firmware"),
            "BOARD=an386",
            "CHECK=1",
            f"GEN={tmp_path / 'gen'}",
            f"OUT={tmp_path / 'an386'}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "device" / "c"), "libfedtiny_step_check.so"], check=True, capture_output=True
    )
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "firmware_opcheck.py"),
            str(tmp_path / "an386" / "firmware.elf"),
            str(SCENARIOS["firmware-demo"]),
            *[f"--set={k}={v}" for k, v in OVERRIDES["firmware-demo"].items()],
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and result["identical"], result
    assert result["device_lines"] == result["host_lines"] > 1000
    assert set(result["by_kind"]) == {"output", "mask", "quantized gradient", "input gradient", "weight", "bias"}
