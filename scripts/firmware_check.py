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
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.bridge.relay import relay_round
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task, local_round
    from fedtiny.federated.fleet import server_task
    from fedtiny.federated.task import client_profile, limit_threads
    from fedtiny.federated.train import round_seed
    from fedtiny.scenario import load_scenario, parse_overrides
    from fedtiny.tools.qemu import start_qemu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("scenario")
    ap.add_argument("--board", default="an386")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partition", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args()
    pid = a.partition
    limit_threads()  # the server's start-up as server/server_app.py runs it (one intra-op thread)
    task, initial, _, schemes = server_task(load_scenario(a.scenario, parse_overrides(a.overrides)), progress=None)
    scheme = schemes.by_profile[client_profile(task.scenario, pid).name]
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    port = _free_port()
    log = Path(tempfile.mkdtemp(prefix="fedtiny-firmware-check-")) / "qemu.log"
    qemu = start_qemu(a.elf, a.board, port, log)
    rounds, state = [], {}
    try:
        for r in range(1, a.rounds + 1):
            meta = {"round": r, "scenario": task.scenario.to_json(), "scheme": scheme.to_json(), "downlink": "full",
                    "seed": round_seed(task.scenario.run.seed, r, pid)}
            t0 = time.monotonic()
            reply = relay_round(f"serial:127.0.0.1:{port}", model_hash(client.downlink_spec), meta, down,
                                timeout=task.scenario.bridge.timeout_s)
            wall = time.monotonic() - t0
            host, state = local_round(task.scenario, pid, r, down, kind="full", scheme=scheme, state=state)
            rounds.append({"round": r, "wall_s": round(wall, 1), "update_identical": reply.update == host.update,
                           "update_bytes": len(reply.update), "simulator_update_bytes": len(host.update),
                           "train_loss": reply.metrics.get("train_loss"), "simulator_train_loss": host.train_loss,
                           "busy_frames": reply.busy, "metrics": reply.metrics})
    finally:
        qemu.kill()
        qemu.wait()
    ok = bool(rounds) and all(r["update_identical"] for r in rounds)
    print(json.dumps({"scenario": a.scenario, "overrides": a.overrides, "board": a.board, "partition": pid,
                      "downlink_bytes": len(down), "rounds": rounds, "identical": ok}, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
