"""make firmware-profile: where a training step's instructions go on the device, op kind by op kind.

Runs a measurement build of the firmware (`make firmware PROFILE=1`: the C step reports each op's parts to
the firmware, which prints the round's tally on QEMU's console) for one round through the bridge, and
attributes the instructions (QEMU -icount shift=0: one instruction per nanosecond of board time) to the
C step's ops (build/firmware/gen/ops.json) and their work (fedtiny.budget.step_time.c_op_work). Prints one
JSON line: instructions per step, by op and by kind and part, instructions per MAC, the published-cycles
model's figure for the same step (cycles per MAC x (forward + backward factor x backward MACs), CPI 1), and
the costs fitted on this run (fit_costs). Also checks the round's update against the simulator's.

usage: python scripts/firmware_profile.py ELF GEN_DIR SCENARIO [--board an386] [--set KEY=VALUE ...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read_profile(log: Path) -> dict:
    """The FTPROFILE line of a QEMU console log."""
    text = log.read_text(errors="replace")
    found = re.findall(r"FTPROFILE (\{.*?\]\})", text.replace("\n", " "))
    if not found:
        raise SystemExit(f"firmware_profile: no FTPROFILE line in {log} (a build without PROFILE=1?)")
    return json.loads(found[-1])


def round_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script that runs one round of a built firmware (ELF, GEN_DIR, SCENARIO, board,
    partition, --set) in QEMU."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("gen")
    ap.add_argument("scenario")
    ap.add_argument("--board", default="an386")
    ap.add_argument("--partition", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    return ap


def main() -> int:
    from fedtiny.bridge.relay import relay_round
    from fedtiny.budget.step_time import PARTS, StepWork, c_op_work, fit_costs
    from fedtiny.devices import get_profile
    from fedtiny.federated.client import local_round
    from fedtiny.scenario import parse_overrides
    from fedtiny.tools.firmware import bridged_client
    from fedtiny.tools.qemu import running

    ap = round_parser(__doc__)
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    gen = Path(a.gen)
    ops = json.loads((gen / "ops.json").read_text())
    summary = json.loads((gen / "summary.json").read_text())
    bc = bridged_client(a.scenario, a.partition, parse_overrides(a.overrides))
    task = bc.task
    log = Path(tempfile.mkdtemp(prefix="fedtiny-firmware-profile-")) / "qemu.log"
    with running(a.elf, a.board, log) as address:
        t0 = time.monotonic()
        reply = relay_round(
            address, bc.model_hash(), bc.train_meta(1), bc.downlink, timeout=task.scenario.bridge.timeout_s
        )
        wall = time.monotonic() - t0
        time.sleep(0.5)  # the console line is written before UPDATE; let QEMU flush it
    host, _ = local_round(task.scenario, a.partition, 1, bc.downlink, kind="full", scheme=bc.scheme, state={})
    prof = read_profile(log)
    steps = prof["steps"]
    per_tick = 1e9 / prof["tick_hz"]  # instructions per tick at -icount shift=0
    samples_per_step = summary["samples"] * task.scenario.train.local_epochs / steps
    works = c_op_work(ops)
    if len(works) != len(prof["ops"]):
        raise SystemExit(f"firmware_profile: {len(prof['ops'])} ops profiled, {len(works)} in {gen / 'ops.json'}")
    names = ("forward", "quantize", "input", "weight", "update")
    rows, measured = [], []  # measured: (one sample's work, instructions per step by part)
    for geometry, work, ticks in zip(ops, works, prof["ops"]):
        instr = {n: t * per_tick / steps for n, t in zip(names, ticks)}
        measured.append((work, instr))
        rows.append(
            {
                "op": work.name,
                "kind": work.kind,
                "geometry": geometry,
                "macs_per_sample": work.macs,
                "written_per_sample": work.written,
                "gradient_elements": work.gradient_elements,
                "updated": work.updated,
                "instructions_per_step": {n: round(v) for n, v in instr.items() if v},
            }
        )
    step = StepWork.of(works)
    by_kind: dict[str, dict] = {}  # per step: MACs or elements, instructions
    for work, per_step in measured:
        elementwise = not work.macs  # ADD, pools, the parameter-free kinds
        for part in () if elementwise else PARTS:
            if work.macs.get(part):
                d = by_kind.setdefault(f"{work.kind}/{part}", {"macs": 0, "instructions": 0.0})
                d["macs"] += work.macs[part] * samples_per_step
                d["instructions"] += per_step.get(part, 0.0)
        extras = (
            [("elementwise", work.elementwise * samples_per_step, sum(per_step.values()))]
            if elementwise
            else [
                ("quantize", work.gradient_elements * samples_per_step, per_step.get("quantize", 0.0)),
                ("update", work.updated if per_step.get("update") else 0, per_step.get("update", 0.0)),
            ]
        )
        for name, elements, instructions in extras:
            d = by_kind.setdefault(name, {"elements": 0, "instructions": 0.0})
            d["elements"] += elements
            d["instructions"] += instructions
    for d in by_kind.values():
        d["instructions"] = round(d["instructions"])
        if d.get("macs"):
            d["instructions_per_mac"] = round(d["instructions"] / d["macs"], 3)
    profiled = sum(d["instructions"] for d in by_kind.values())
    published = get_profile(summary["profile"])
    model = (
        published.cycles_per_mac
        * (step.forward_macs + published.backward_factor * step.backward_macs)
        * samples_per_step
    )
    whole = float(reply.metrics["instructions_per_step"])
    costs = fit_costs(measured, samples_per_step, f"{summary['scenario']} on {a.board}", outside=whole - profiled)
    flags = Path(a.elf).with_name("cflags.txt")
    kernels = "portable" if flags.exists() and "-DFT_PORTABLE" in flags.read_text() else "dsp"
    result = {
        "scenario": a.scenario,
        "overrides": a.overrides,
        "board": a.board,
        "kernels": kernels,
        "steps": steps,
        "samples_per_step": round(samples_per_step, 3),
        "wall_s": round(wall, 1),
        "update_identical": reply.update == host.update,
        "instructions_per_step_profile_build": round(whole),
        "profiled_instructions_per_step": profiled,
        "unattributed_share": round(1 - profiled / whole, 4),
        "macs_per_step": {
            "forward": step.forward_macs * samples_per_step,
            "backward": step.backward_macs * samples_per_step,
        },
        "published_model_instructions_per_step": round(model),
        "published_cycles_per_mac": published.cycles_per_mac,
        "backward_factor": published.backward_factor,
        "by_kind": by_kind,
        "ops": rows,
        "fitted_costs": {
            "per_mac": costs.table(),
            "per_gradient_element": costs.per_gradient_element,
            "per_elementwise": costs.per_elementwise,
            "per_update_element": costs.per_update_element,
            "per_written": {f"{k}/{p}": v for (k, p), v in costs.per_written},
            "per_channel": costs.per_channel,
        },
    }
    text = json.dumps(result, sort_keys=True)
    print(text)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0 if result["update_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
