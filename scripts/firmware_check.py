"""make firmware-check: the firmware in QEMU against the simulated client, round for round.

Runs the ELF `make firmware` built (partition 1 of FIRMWARE_SCENARIO with FIRMWARE_SET) in QEMU, sends it
two rounds through the bridge (fedtiny.bridge.relay: HELLO, TRAIN with the server's starting model, BUSY,
UPDATE, ACK, so the device commits its error-feedback residual), computes the same rounds with
fedtiny.federated.client.local_round, and prints one JSON line: per round the wall time, whether the UPDATE
bytes are identical, their length, the train losses and the device's metrics. Exit status 1 when a round's
bytes differ. Every process it starts is stopped.

usage: python scripts/firmware_check.py ELF SCENARIO [--board an386] [--rounds 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from fedtiny.bridge.relay import relay_round
    from fedtiny.federated.client import local_round
    from fedtiny.scenario import parse_overrides
    from fedtiny.tools.firmware import bridged_client
    from fedtiny.tools.qemu import running

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("scenario")
    ap.add_argument("--board", default="an386")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partition", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args()
    bc = bridged_client(a.scenario, a.partition, parse_overrides(a.overrides))
    log = Path(tempfile.mkdtemp(prefix="fedtiny-firmware-check-")) / "qemu.log"
    rounds, state = [], {}
    with running(a.elf, a.board, log) as address:
        for r in range(1, a.rounds + 1):
            t0 = time.monotonic()
            reply = relay_round(
                address, bc.model_hash(), bc.train_meta(r), bc.downlink, timeout=bc.task.scenario.bridge.timeout_s
            )
            wall = time.monotonic() - t0
            host, state = local_round(
                bc.task.scenario, a.partition, r, bc.downlink, kind="full", scheme=bc.scheme, state=state
            )
            rounds.append(
                {
                    "round": r,
                    "wall_s": round(wall, 1),
                    "update_identical": reply.update == host.update,
                    "update_bytes": len(reply.update),
                    "simulator_update_bytes": len(host.update),
                    "train_loss": reply.metrics.get("train_loss"),
                    "simulator_train_loss": host.train_loss,
                    "busy_frames": reply.busy,
                    "metrics": reply.metrics,
                }
            )
    ok = bool(rounds) and all(r["update_identical"] for r in rounds)
    print(
        json.dumps(
            {
                "scenario": a.scenario,
                "overrides": a.overrides,
                "board": a.board,
                "partition": a.partition,
                "downlink_bytes": len(bc.downlink),
                "rounds": rounds,
                "identical": ok,
            },
            sort_keys=True,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
