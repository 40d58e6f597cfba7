"""The firmware's board layer (device/firmware/boards) in QEMU: the same round on netduinoplus2 (STM32F405) as on
mps2-an386, a stack overflow stopped by the MPU guard, the watchdog ending a firmware that stops kicking it.

Needs Debian's gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm; without them the tests are skipped
with their names. Images are built into temporary folders.
"""

import socket
import subprocess
import time

import pytest
from conftest import ROOT

from fedtiny.tools.qemu import BOARDS, missing_packages, start_qemu

FIRMWARE = ROOT / "device" / "firmware"
MISSING = missing_packages()
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason="the firmware tests need the Debian packages "
    + ", ".join(MISSING)
    + " (apt-get install "
    + " ".join(MISSING)
    + ")",
)

# A small client of the firmware demo's federation, so that a round takes seconds in QEMU: ten partitions
# (partition 1 has about 70 samples), a sparse scheme of three biases and half of one layer's weights.
SCHEME = (
    '{"id": "board-test", "n_bias_update": 3, "weight_update_idx": [8], "weight_update_ratio": [0.5], '
    '"weight_select_criteria": "magnitude+"}'
)
SCENARIO = f"""
[run]
name = "firmware-boards"
seed = 0
rounds = 1
clients = 10

[data]
source = "digits"
partition = "iid"
public_fraction = 0.3
test_fraction = 0.2
client_test_fraction = 0.2

[model]
file = "{ROOT / "scenarios" / "models" / "quickstart-cloud.safetensors"}"
head = "keep"
name = "tiny-ir"
width = 16
precision = "int8"
classifier_precision = "int8"

[train]
optimizer = "sgd+qas"
scheme = "SCHEME_FILE"
lr = 0.02
momentum = 0.9
local_epochs = 1
batch_size = 16
shuffle = "hash"

[device]
profiles = ["nrf52840"]
kernels = "reference"

[compression]
uplink = "sparse"
density = 0.1
values = "int8"
error_feedback = true
downlink = "full"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(board: str, gen, out, extra: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        ["make", "-s", "-C", str(FIRMWARE), f"BOARD={board}", f"GEN={gen}", f"OUT={out}", f"EXTRA_CFLAGS={extra}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode(errors="replace")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from fedtiny.tools.firmware import generate

    out = tmp_path_factory.mktemp("boards")
    (out / "scheme.json").write_text(SCHEME)
    (out / "scenario.toml").write_text(SCENARIO.replace("SCHEME_FILE", str(out / "scheme.json")))
    summary = generate(str(out / "scenario.toml"), 1, out / "gen")
    return out, summary


@pytest.fixture(scope="module")
def images(generated):
    """The firmware for an386 and netduinoplus2, and the two self-test images, built two at a time (the
    self-tests run before main: they need the whole image only to link)."""
    out, _ = generated
    builds = {
        ("an386", ""): None,
        ("netduinoplus2", ""): None,
        ("netduinoplus2", "-DFT_TEST_STACK_OVERFLOW"): None,
        ("an386", "-DFT_TEST_WATCHDOG_STALL -DBOARD_WATCHDOG_MS=200"): None,
    }
    keys = list(builds)
    for i in range(0, len(keys), 2):
        procs = []
        for board, extra in keys[i : i + 2]:
            folder = out / f"{board}{'-' + str(keys.index((board, extra))) if extra else ''}"
            builds[(board, extra)] = folder / "firmware.elf"
            procs.append(_make(board, out / "gen", folder, extra))
        for proc in procs:
            _wait(proc)
    return builds


def _exit_code(elf, board: str, timeout: float = 20.0) -> tuple[int, float]:
    """Run an image with no UART peer until it exits (semihosting): its code and the wall time."""
    cmd = [
        "qemu-system-arm",
        "-M",
        BOARDS[board][0],
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "null",
        "-kernel",
        str(elf),
        "-icount",
        "shift=0",
        "-semihosting-config",
        "enable=on,target=native",
    ]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - t0
    return proc.returncode, time.monotonic() - t0


def test_netduinoplus2_trains_the_round_an386_trains(generated, images, tmp_path):
    """HELLO and one TRAIN on each board: netduinoplus2's UPDATE bytes are an386's (which tests/test_firmware.py
    checks against the simulator's)."""
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task
    from fedtiny.federated.train import round_seed
    from fedtiny.scenario import load_scenario
    from fedtiny.server_setup import server_task

    out, summary = generated
    task, initial, _, schemes = server_task(load_scenario(out / "scenario.toml"), progress=None)
    scheme = next(iter(schemes.by_profile.values()))
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    meta = {
        "round": 1,
        "scenario": task.scenario.to_json(),
        "scheme": scheme.to_json(),
        "downlink": "full",
        "seed": round_seed(task.scenario.run.seed, 1, 1),
    }
    replies = {}
    for board in ("an386", "netduinoplus2"):
        port = _free_port()
        qemu = start_qemu(images[(board, "")], board, port, tmp_path / f"{board}.log")
        try:
            replies[board] = relay_round(
                f"serial:127.0.0.1:{port}", model_hash(client.downlink_spec), meta, down, timeout=120
            )
        finally:
            qemu.kill()
            qemu.wait()
    a, n = replies["an386"], replies["netduinoplus2"]
    assert len(n.update) > 0 and n.update == a.update
    assert n.num_examples == a.num_examples == summary["samples"]
    assert n.metrics["steps"] == a.metrics["steps"]
    # the same code for the same core: the instruction counts agree (netduinoplus2 counts 168 MHz SysTick
    # cycles, converted to nanoseconds; an386 25 MHz ticks of 40 ns), within the board layers' differences
    assert abs(n.metrics["instructions_per_step"] / a.metrics["instructions_per_step"] - 1) < 0.01


def test_stack_overflow_ends_in_the_guard(images):
    """A firmware that recurses without end stops at the MPU guard below the stack with exit code 4 (the
    stack is at the bottom of RAM: it never reaches .data or .bss). The guard is board_common.c's, the same
    on every board."""
    code, _ = _exit_code(images[("netduinoplus2", "-DFT_TEST_STACK_OVERFLOW")], "netduinoplus2")
    assert code == 4


def test_watchdog_ends_a_firmware_that_stops_kicking(images):
    """mps2-an386's CMSDK watchdog (QEMU models it; netduinoplus2's IWDG it does not): a firmware that waits
    without kicking it ends with exit code 5 when its 200 ms run out (its NMI warning; a reset follows on a
    board without a debugger)."""
    code, seconds = _exit_code(images[("an386", "-DFT_TEST_WATCHDOG_STALL -DBOARD_WATCHDOG_MS=200")], "an386")
    assert code == 5
    assert seconds < 10
