"""make firmware-opcheck: the firmware's training step against the host's, op by op.

Runs the firmware's op-check build (`make firmware CHECK=1`: the DSP kernels, every tensor a step produces
hashed and printed on QEMU's console) for one round through the bridge, and the same round on the host with
the C step's op-check build (device/c/libfedtiny_step_check.so: the portable kernels, the same lines on
standard error), and compares the two sequences line by line: per op, the forward's output and ReLU mask,
the quantized output gradient, the input gradient after the op's contribution, the weight and bias after
their update. Prints one JSON line (lines compared, by kind, the first difference) and exits 1 on a
difference.

usage: python scripts/firmware_opcheck.py ELF SCENARIO [--board an386] [--partition 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHAT = ("output", "mask", "quantized gradient", "input gradient", "weight", "bias")

_HOST = """
import sys
from fedtiny.federated.client import local_round
from fedtiny.scenario import parse_overrides
from fedtiny.tools.firmware import bridged_client
scenario, pid, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
bc = bridged_client(scenario, pid, parse_overrides(overrides + ["train.engine=c"]))
local_round(bc.task.scenario, pid, 1, bc.downlink, kind="full", scheme=bc.scheme, state={})
"""


def check_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("FTCHECK ")]


def main() -> int:
    from fedtiny.bridge.relay import relay_round
    from fedtiny.scenario import parse_overrides
    from fedtiny.tools.firmware import bridged_client
    from fedtiny.tools.qemu import running

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("scenario")
    ap.add_argument("--board", default="an386")
    ap.add_argument("--partition", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args()
    lib = ROOT / "device" / "c" / "libfedtiny_step_check.so"
    if not lib.is_file():
        raise SystemExit(f"firmware_opcheck: {lib} is missing: make -C device/c libfedtiny_step_check.so")
    bc = bridged_client(a.scenario, a.partition, parse_overrides(a.overrides))
    log = Path(tempfile.mkdtemp(prefix="fedtiny-firmware-opcheck-")) / "qemu.log"
    with running(a.elf, a.board, log) as address:
        reply = relay_round(
            address, bc.model_hash(), bc.train_meta(1), bc.downlink, timeout=bc.task.scenario.bridge.timeout_s
        )
    device = check_lines(log.read_text(errors="replace"))
    host_run = subprocess.run(
        [sys.executable, "-c", _HOST, a.scenario, str(a.partition), *a.overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "FEDTINY_STEP_LIB": str(lib)},
        cwd=str(ROOT),
    )
    if host_run.returncode != 0:
        raise SystemExit(f"firmware_opcheck: the host round failed:\n{host_run.stderr[-2000:]}")
    host = check_lines(host_run.stderr)
    first = next((i for i, (d, h) in enumerate(zip(device, host)) if d != h), None)
    if first is None and len(device) != len(host):
        first = min(len(device), len(host))
    kinds: dict[str, int] = {}
    for line in host:
        what = WHAT[int(line.split()[2])]
        kinds[what] = kinds.get(what, 0) + 1
    result = {
        "scenario": a.scenario,
        "overrides": a.overrides,
        "board": a.board,
        "partition": a.partition,
        "update_bytes": len(reply.update),
        "device_lines": len(device),
        "host_lines": len(host),
        "by_kind": kinds,
        "identical": first is None and bool(host),
    }
    if first is not None:

        def describe(lines: list[str]) -> str | None:
            if first >= len(lines):
                return None
            _, op, what, size, h = lines[first].split()
            return f"op {op} {WHAT[int(what)]} ({size} bytes) hash {h}"

        result["first_difference"] = {"line": first, "device": describe(device), "host": describe(host)}
    print(json.dumps(result, sort_keys=True))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
