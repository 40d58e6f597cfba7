"""Run a scenario as an in-process Flower simulation (Ray backend)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fedtiny.scenario import Scenario

__all__ = ["simulate", "backend_config"]


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """One CPU per ClientApp, ``run.num_cpus`` for the whole Ray instance, no GPU."""
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": scenario.run.num_cpus}}


def quiet_flower(verbose: bool) -> None:
    """Keep Flower's and Ray's INFO chatter off the console unless asked for."""
    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(scenario: Scenario, run_dir: Path, *, verbose: bool = False) -> dict[str, Any]:
    """Run ``scenario`` with ``flwr.simulation.run_simulation``; return the run's summary.

    The ServerApp writes the run folder (``metrics.jsonl``, ``summary.json``,
    plots) as it goes, so ``flwr run .`` and this function produce the same outputs.
    """
    quiet_flower(verbose)
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import make_server_app

    run_simulation(server_app=make_server_app(scenario, run_dir), client_app=client_app,
                   num_supernodes=scenario.run.clients, backend_config=backend_config(scenario),
                   verbose_logging=verbose)
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path} (see the log above)")
    return json.loads(summary_path.read_text())
