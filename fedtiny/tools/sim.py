"""Run a scenario as an in-process Flower simulation (Ray backend)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import update_console_handler
from flwr.simulation import run_simulation

from clients.client_app import app as client_app
from clients.secagg_client import make_secagg_client_app
from fedtiny.scenario import Scenario
from server.secagg_app import make_secagg_server_app
from server.server_app import cohort_nodes, make_server_app

__all__ = ["simulate", "backend_config", "simulate_secagg"]


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """One CPU per ClientApp, no GPU; ``run.num_cpus`` for a local Ray instance, or join ``run.ray_address``."""
    # "local": a fresh Ray instance even when a cluster started with `ray start` runs on this machine
    # (Ray would otherwise join it, and refuse num_cpus).
    init_args = (
        {"address": scenario.run.ray_address}
        if scenario.run.ray_address
        else {"address": "local", "num_cpus": scenario.run.num_cpus}
    )
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's and Ray's INFO chatter off the console unless asked for."""
    update_console_handler(level=logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(scenario: Scenario, run_dir: Path, *, verbose: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``scenario`` with ``flwr.simulation.run_simulation``; return the run's summary.

    The ServerApp writes the run folder (``metrics.jsonl``, ``summary.json``,
    plots, the checkpoint after each round) as it goes, so ``flwr run .`` and this
    function produce the same outputs. ``resume`` goes on from the folder's checkpoint.
    With ``run.cohort_size > 1`` the simulation starts one node per cohort of a round
    (the nodes are workers for virtual clients) instead of one per client.
    """
    quiet_flower(verbose)
    nodes = scenario.run.clients if scenario.run.cohort_size == 1 else cohort_nodes(scenario)
    run_simulation(
        server_app=make_server_app(scenario, run_dir, resume=resume),
        client_app=client_app,
        num_supernodes=nodes,
        backend_config=backend_config(scenario),
        verbose_logging=verbose,
    )
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path} (see the log above)")
    return json.loads(summary_path.read_text())


def simulate_secagg(
    changes: list[list[Any]],
    workdir: Path,
    *,
    secagg: bool,
    num_cpus: int = 2,
    num_shares: int | float = 1.0,
    threshold: int | float = 0.7,
    clipping_range: float = 256.0,
) -> dict[str, Any]:
    """One legacy Flower round in which client ``p`` sends ``changes[p]`` (NumPy arrays), with or without SecAgg+.

    Returns the round's mean change (``mean``), the serialized bytes each client received
    (``down``) and sent (``up``), its seconds in the ClientApp summed over the protocol's
    stages (``client_seconds``), the round's wall seconds and the number of exchanges.
    """
    quiet_flower(False)
    workdir = Path(workdir)
    timing = workdir / ("timing-secagg" if secagg else "timing-plain")
    timing.mkdir(parents=True, exist_ok=True)
    path = workdir / "changes.npz"
    np.savez(path, **{f"{p}/{i}": a for p, arrays in enumerate(changes) for i, a in enumerate(arrays)})
    out: dict[str, Any] = {}
    run_simulation(
        server_app=make_secagg_server_app(
            [a.size for a in changes[0]],
            len(changes),
            secagg=secagg,
            out=out,
            num_shares=num_shares,
            threshold=threshold,
            clipping_range=clipping_range,
        ),
        client_app=make_secagg_client_app(str(path), str(timing), secagg=secagg),
        num_supernodes=len(changes),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": num_cpus},
        },
    )
    if "mean" not in out:
        raise RuntimeError("the SecAgg+ round did not complete (see Flower's log with -v)")
    seconds: dict[int, float] = {}
    for f in timing.glob("client-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            seconds[rec["partition_id"]] = seconds.get(rec["partition_id"], 0.0) + rec["seconds"]
    return {
        "mean": out["mean"],
        "down": sorted(out["down"].values()),
        "up": sorted(out["up"].values()),
        "client_seconds": [seconds[p] for p in sorted(seconds)],
        "seconds": out["seconds"],
        "exchanges": out["exchanges"],
    }


def profile_server(path: str) -> None:
    """Profile fedtiny's server (the ServerApp's thread: cProfile sees one thread) into ``path``."""
    # deferred: cProfile only for a profiled run
    import cProfile

    from server import server_app  # the module, whose run_server the app looks up when it runs

    run_server = server_app.run_server

    def profiled(*args, **kwargs):
        prof = cProfile.Profile()
        try:
            return prof.runcall(run_server, *args, **kwargs)
        finally:
            prof.dump_stats(path)

    server_app.run_server = profiled  # make_server_app's main looks the name up when it runs
