"""Benchmarks: each prints a ratio against a baseline run in the same process.

``sim``: the quickstart's local training for N clients, once through the Flower
simulation (Ray backend) and once as a bare Python loop calling the same
:func:`fedtiny.client.local_round`. Flower's figure is the wall time of one
training round as the ServerApp sees it (send to last reply, plus aggregation and
global evaluation); round 1 is a warm-up in which every Ray worker loads its data,
so round 2 is the one timed. Ray's start-up is reported apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["bench_sim", "BENCHES"]


def bench_sim(args: argparse.Namespace) -> dict[str, Any]:
    from fedtiny.client import client_task, local_round
    from fedtiny.models import model_arrays
    from fedtiny.payload import pack_dense
    from fedtiny.runlog import read_metrics
    from fedtiny.scenario import load_scenario, parse_overrides
    from fedtiny.sim import simulate

    n = args.clients
    overrides = {**parse_overrides(args.overrides), "run.clients": n, "run.clients_per_round": 0, "run.rounds": 2,
                 "run.name": "bench-sim"}
    scenario = load_scenario(args.scenario, overrides)

    # Bare loop: the same local_round, sequentially, after a warm-up call that loads the data.
    task = client_task(scenario)
    payload = pack_dense(model_arrays(task.model), task.downlink_spec)
    local_round(scenario, 0, 1, payload)
    t0 = time.perf_counter()
    for pid in range(n):
        local_round(scenario, pid, 2, payload)
    bare_s = time.perf_counter() - t0
    print(f"[bench sim] bare loop: {n} calls in {bare_s:.2f} s", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate(scenario, Path(tmp), verbose=args.verbose)
        total_s = time.perf_counter() - t0
        recs = read_metrics(tmp)
    by_round = {r["round"]: r["elapsed_s"] for r in recs}
    flower_s = by_round[2] - by_round[1]
    print(f"[bench sim] flower round: {n} calls in {flower_s:.2f} s (whole simulation {total_s:.1f} s)",
          file=sys.stderr)
    result = {
        "clients": n,
        "bare_s": round(bare_s, 4),
        "flower_s": round(flower_s, 4),
        "ratio": round(flower_s / bare_s, 3),
        "overhead_ms_per_call": round((flower_s - bare_s) / n * 1000, 3),
        "simulation_total_s": round(total_s, 2),
        "ray_workers": scenario.run.num_cpus,
    }
    print(f"\nbench sim (N={n}, {scenario.run.num_cpus} Ray workers vs 1 bare loop)\n"
          f"  bare loop       {bare_s:8.2f} s  ({bare_s / n * 1000:.1f} ms/call)\n"
          f"  flower round    {flower_s:8.2f} s  ({flower_s / n * 1000:.1f} ms/call)\n"
          f"  ratio           {result['ratio']:8.3f}  (flower / bare)\n"
          f"  overhead        {result['overhead_ms_per_call']:8.2f} ms per call\n"
          f"  whole simulation incl. Ray start-up and pretraining: {total_s:.1f} s")
    return result


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"sim": bench_sim}
