"""The DSP kernels (device/c/fedtiny_kernels.c built for a Cortex-M4 and M7, run in QEMU) against the portable
kernels built for this machine: every kernel on the same pseudo-random data and shapes (device/c/kernel_check.c,
odd sizes included) gives the same integers. The training step's use of them is held by tests/test_firmware.py
(the firmware's update bytes equal the simulator's)."""

import subprocess

import pytest
from conftest import ROOT

from fedtiny.tools.qemu import BOARDS, missing_packages

C = ROOT / "device" / "c"


def _host_lines(tmp_path) -> list[str]:
    exe = tmp_path / "kernel_check"
    subprocess.run(
        [
            "cc",
            "-std=c99",
            "-O3",
            "-DFT_KERNEL_CHECK_HOST",
            f"-I{C}",
            str(C / "kernel_check.c"),
            str(C / "fedtiny_kernels.c"),
            "-o",
            str(exe),
        ],
        check=True,
        capture_output=True,
    )
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()


@pytest.mark.skipif(bool(missing_packages()), reason="needs the Debian packages " + ", ".join(missing_packages()))
@pytest.mark.parametrize("board", ["an386", "an500"])
def test_dsp_kernels_give_the_portable_kernels_integers(tmp_path, board):
    out = tmp_path / board
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "device" / "firmware"), "kernel-check", f"BOARD={board}", f"OUT={out}"],
        check=True,
        capture_output=True,
    )
    elf = out / "kernel-check" / "kernel_check.elf"
    disassembly = subprocess.run(
        ["arm-none-eabi-objdump", "-d", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    assert "smlad" in disassembly and "sxtb16" in disassembly  # the DSP build, not the portable loops
    run = subprocess.run(
        [
            "qemu-system-arm",
            "-M",
            BOARDS[board][0],
            "-nographic",
            "-monitor",
            "none",
            "-kernel",
            str(elf),
            "-serial",
            "null",
            "-icount",
            "shift=0",
            "-semihosting-config",
            "enable=on,target=native",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-500:] + run.stderr[-500:]
    device = (run.stdout + run.stderr).splitlines()
    host = _host_lines(tmp_path)
    assert host[-1] == "done" and len(host) > 200
    assert device == host
