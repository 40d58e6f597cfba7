"""The firmware in QEMU: the command line that runs it on an emulated board with its UART on a TCP port.

``-icount shift=0`` makes virtual time advance one nanosecond per instruction (the firmware counts its
instructions with SysTick); ``-semihosting`` lets it exit with a status. The bridge reaches the UART as
``serial:HOST:PORT`` (:mod:`fedtiny.bridge.relay`). ``FEDTINY_QEMU_ARGS`` appends arguments (a developer's
switch: ``scripts/firmware_hotspots.py`` adds QEMU's execution log with it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

__all__ = [
    "BOARDS",
    "PACKAGES",
    "missing_packages",
    "qemu_command",
    "start_qemu",
    "wait_listening",
    "free_port",
    "running",
]

# board (device/firmware/boards/<board>) -> (QEMU machine, core); the first -serial is the firmware's UART
# (UART0 on the MPS2 boards, USART1 on the STM32F405 of netduinoplus2)
BOARDS = {
    "an386": ("mps2-an386", "Cortex-M4F"),
    "an500": ("mps2-an500", "Cortex-M7"),
    "netduinoplus2": ("netduinoplus2", "Cortex-M4F (STM32F405)"),
}
# what the firmware needs on Debian: the cross compiler, its C library, the emulator
PACKAGES = {
    "arm-none-eabi-gcc": "gcc-arm-none-eabi",
    "newlib": "libnewlib-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}


def missing_packages() -> list[str]:
    """The Debian packages among :data:`PACKAGES` that this machine lacks."""
    missing = [PACKAGES[t] for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None]
    if shutil.which("arm-none-eabi-gcc"):
        out = subprocess.run(
            [
                "arm-none-eabi-gcc",
                "-mthumb",
                "-mcpu=cortex-m4",
                "-mfloat-abi=hard",
                "-mfpu=fpv4-sp-d16",
                "-print-file-name=libc_nano.a",
            ],
            capture_output=True,
            text=True,
        )
        if not Path(out.stdout.strip()).is_file():
            missing.append(PACKAGES["newlib"])
    return missing


def qemu_command(elf: str | Path, board: str, port: int, host: str = "127.0.0.1") -> list[str]:
    if board not in BOARDS:
        raise ValueError(f"board {board!r}: expected one of {', '.join(BOARDS)}")
    return [
        "qemu-system-arm",
        "-M",
        BOARDS[board][0],
        "-nographic",
        "-monitor",
        "none",
        "-kernel",
        str(elf),
        "-serial",
        f"tcp:{host}:{port},server=on,wait=off",
        "-icount",
        "shift=0",
        "-semihosting-config",
        "enable=on,target=native",
        *shlex.split(os.environ.get("FEDTINY_QEMU_ARGS", "")),
    ]


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"QEMU's UART does not listen on {host}:{port}")


def start_qemu(elf: str | Path, board: str, port: int, log: Path | None = None) -> subprocess.Popen:
    """Start QEMU with the firmware; return once its UART listens (the caller stops the process)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        qemu_command(elf, board, port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        wait_listening(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(elf: str | Path, board: str, log: Path | None = None) -> Iterator[str]:
    """The firmware in QEMU for the block's duration: yields its bridge address (``serial:127.0.0.1:PORT``);
    QEMU is stopped on the way out, whatever happened."""
    port = free_port()
    proc = start_qemu(elf, board, port, log)
    try:
        yield f"serial:127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":  # the command line, one argument per line (scripts/deploy_demo.sh runs it)
    import sys

    print("\n".join(qemu_command(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
