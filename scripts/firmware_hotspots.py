"""Where the firmware's instructions go, function by function and instruction by instruction (a developer's tool).

Runs one round of the firmware in QEMU through the bridge, as ``make firmware-profile`` does, with QEMU's
execution log (``-d in_asm,exec,nochain``: every translated block once, every executed block once per
execution) read through a pipe, and attributes each executed block's instructions to the ELF's functions
(``arm-none-eabi-nm``). Prints the functions by instructions per step; ``--annotate FUNC`` prints the
function's disassembly with each instruction's count per step. The counts are QEMU's: an instruction
skipped by an IT block is still counted, as ``-icount`` counts it.

usage: python scripts/firmware_hotspots.py ELF GEN_DIR SCENARIO [--board an386] [--set KEY=VALUE ...]
       [--top 40] [--annotate FUNC ...] [--out counts.json | --load counts.json]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_log(path: str, counts: collections.Counter, blocks: dict) -> None:
    """Executions per block start and each block's instruction addresses, from QEMU's log at path."""
    cur: list[int] | None = None
    with open(path, errors="replace") as f:
        for line in f:
            c = line[0]
            if c == "T":  # Trace 0: 0x... [cs_base/pc/flags/cflags] symbol
                i = line.find("[")
                counts[line[i + 10 : i + 18]] += 1
            elif c == "0" and cur is not None:
                cur.append(int(line[: line.index(":")], 16))
            elif line.startswith("IN:"):
                cur = []
            elif cur is not None and (c == "\n" or c == "-"):
                if cur:
                    blocks["%08x" % cur[0]] = cur
                cur = None


def symbols(elf: str) -> tuple[list[int], list[str]]:
    out = subprocess.run(
        ["arm-none-eabi-nm", "-n", "--defined-only", elf], capture_output=True, text=True, check=True
    ).stdout
    starts, names = [], []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            starts.append(int(parts[0], 16) & ~1)
            names.append(parts[2])
    return starts, names


def source_lines(elf: str, per_insn: collections.Counter) -> tuple[collections.Counter, collections.Counter]:
    """Counts by source line and by innermost (inlined) function, through addr2line's inlining chains."""
    addrs = sorted(per_insn)
    out = subprocess.run(
        ["arm-none-eabi-addr2line", "-f", "-i", "-a", "-e", elf] + [f"{x:x}" for x in addrs],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    by_line: collections.Counter = collections.Counter()
    by_func: collections.Counter = collections.Counter()
    i = 0
    while i < len(out):
        addr = int(out[i], 16)
        func, loc = out[i + 1], out[i + 2]  # the innermost frame comes first
        i += 3
        while i < len(out) and not out[i].startswith("0x"):
            i += 2
        by_func[func] += per_insn[addr]
        by_line[f"{Path(loc.split(' ')[0]).name}  ({func})"] += per_insn[addr]
    return by_line, by_func


def run_round(a: argparse.Namespace) -> tuple[collections.Counter, int]:
    """One round in QEMU with the execution log: executions per instruction address, steps."""
    from fedtiny.bridge.relay import relay_round
    from fedtiny.scenario import parse_overrides
    from fedtiny.tools.firmware import bridged_client
    from fedtiny.tools.qemu import running

    bc = bridged_client(a.scenario, a.partition, parse_overrides(a.overrides))
    tmp = Path(tempfile.mkdtemp(prefix="fedtiny-hotspots-"))
    fifo = tmp / "exec.log"
    os.mkfifo(fifo)
    counts: collections.Counter = collections.Counter()
    blocks: dict = {}
    reader = threading.Thread(target=read_log, args=(str(fifo), counts, blocks), daemon=True)
    reader.start()
    os.environ["FEDTINY_QEMU_ARGS"] = f"-d in_asm,exec,nochain -D {fifo}"
    with running(a.elf, a.board, tmp / "qemu.log") as address:
        reply = relay_round(address, bc.model_hash(), bc.train_meta(1), bc.downlink, timeout=600)
    reader.join(timeout=600)
    per_insn: collections.Counter = collections.Counter()
    for pc, n in counts.items():
        for addr in blocks.get(pc, ()):
            per_insn[addr] += n
    steps = int(reply.metrics.get("steps", 1)) or 1
    return per_insn, steps


def main() -> int:
    from firmware_profile import round_parser

    ap = round_parser(__doc__)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--annotate", action="append", default=[])
    ap.add_argument("--out", help="write the per-instruction counts as JSON")
    ap.add_argument("--load", help="read the counts a previous --out wrote instead of running QEMU")
    a = ap.parse_args()
    if a.load:
        saved = json.loads(Path(a.load).read_text())
        steps = saved["steps"]
        per_insn = collections.Counter({int(k, 16): v for k, v in saved["per_insn"].items()})
    else:
        per_insn, steps = run_round(a)
    if a.out:
        Path(a.out).write_text(json.dumps({"steps": steps, "per_insn": {f"{k:08x}": v for k, v in per_insn.items()}}))
    starts, names = symbols(a.elf)
    by_func: collections.Counter = collections.Counter()
    for addr, n in per_insn.items():
        i = bisect.bisect_right(starts, addr) - 1
        by_func[names[i] if i >= 0 else "?"] += n
    by_line, by_inline = source_lines(a.elf, per_insn)
    total = sum(by_func.values())
    print(f"{total:,} instructions in the round ({steps} steps: {total / steps:,.0f} per step)")
    for name, n in by_func.most_common(a.top):
        print(f"{n / steps:14,.0f} {100 * n / total:5.1f}%  {name}")
    print("\nby source function (inlined code counted where it was written):")
    for name, n in by_inline.most_common(a.top):
        print(f"{n / steps:14,.0f} {100 * n / total:5.1f}%  {name}")
    print("\nby source line:")
    for name, n in by_line.most_common(a.top):
        print(f"{n / steps:14,.0f} {100 * n / total:5.1f}%  {name}")
    for func in a.annotate:
        i = names.index(func)
        lo, hi = starts[i], starts[i + 1] if i + 1 < len(starts) else starts[i] + 4096
        dis = subprocess.run(
            [
                "arm-none-eabi-objdump",
                "-d",
                "--no-show-raw-insn",
                f"--start-address={lo}",
                f"--stop-address={hi}",
                a.elf,
            ],
            capture_output=True,
            text=True,
        ).stdout
        print(f"\n== {func}")
        for line in dis.splitlines():
            head = line.strip().split(":")[0]
            try:
                addr = int(head, 16)
            except ValueError:
                continue
            print(f"{per_insn.get(addr, 0) / steps:12,.0f}  {line.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
