"""How a simulation holds its fleet: one node per client, or cohorts of virtual clients on a few nodes.

One Flower node per client is the deployment's shape and the simulation's default, but Flower's
in-process simulation cannot hold a large fleet that way: with 10,000 nodes on 2 cores the server's
partition query timed out for half of them. Past ``MAX_NODES`` clients a run whose
``run.cohort_size`` was left at 1 gets cohorts instead, one per CPU, each a ClientApp call that runs
its virtual clients one after the other (same data, state, memory check and bytes per client).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["MAX_NODES", "simulation_layout"]

# One node per client up to here. Each node costs a ClientApp call to be discovered at the start and
# Flower's per-message work every round it is sampled; at 10,000 nodes the discovery timed out. The
# scenarios that keep one node per client have at most 30 clients.
MAX_NODES = 100


def simulation_layout(scenario) -> tuple[object, str]:
    """The scenario a simulation runs, and a line saying what was chosen (empty when nothing was).

    Cohorts are chosen only when ``run.cohort_size`` is 1, no partition is a bridged device, and the
    fleet is larger than :data:`MAX_NODES`: ``ceil(clients_per_round / run.num_cpus)`` virtual clients per cohort (at
    least 2), so a round is ``run.num_cpus`` ClientApp calls at most.
    """
    r = scenario.run
    if r.cohort_size > 1 or r.clients <= MAX_NODES or scenario.bridge.devices:  # bridged devices need their nodes
        return scenario, ""
    per_round = scenario.clients_per_round
    size = max(2, math.ceil(per_round / r.num_cpus))
    chosen = dataclasses.replace(scenario, run=dataclasses.replace(r, cohort_size=size))
    nodes = math.ceil(per_round / size)
    return chosen, (
        f"{r.clients:,} clients are more than one simulated node each can hold ({MAX_NODES}): "
        f"cohorts of {size} virtual clients on {nodes} node(s) per round (run.cohort_size = {size}; "
        f"set it to choose)"
    )
