"""Seeded client sampling by partition id (Flower's node ids change every run; partition ids do not).

Availability (``[fleet]``) decides who is awake in a round; sampling picks among them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_clients", "awake_clients", "malicious_clients"]


def awake_clients(fleet, seed: int, server_round: int, num_clients: int) -> np.ndarray:
    """Sorted partition ids awake in ``server_round`` under ``fleet.availability``.

    ``random``: each client independently with ``availability_rate`` (seeded by seed and round).
    ``diurnal``: client ``p`` has a seeded phase (its time zone) and is awake for the first
    ``diurnal_awake_fraction`` of each ``diurnal_period_rounds``-round day from that phase.
    """
    if fleet.availability == "always":
        return np.arange(num_clients)
    if fleet.availability == "random":
        draw = np.random.default_rng([seed, 263, server_round]).random(num_clients)
        return np.flatnonzero(draw < fleet.availability_rate)
    phase = np.random.default_rng([seed, 269]).random(num_clients)
    time_of_day = (server_round / fleet.diurnal_period_rounds + phase) % 1.0
    return np.flatnonzero(time_of_day < fleet.diurnal_awake_fraction)


def sample_clients(
    seed: int, server_round: int, num_clients: int, per_round: int, awake: np.ndarray | None = None
) -> list[int]:
    """Return the sorted partition ids sampled in ``server_round`` (all awake ones when there are too few).

    ``awake``: the partition ids that can be sampled (None: every client).
    """
    if awake is None:
        if per_round >= num_clients:
            return list(range(num_clients))
        rng = np.random.default_rng([seed, 257, server_round])
        return sorted(int(i) for i in rng.choice(num_clients, per_round, replace=False))
    if per_round >= len(awake):
        return [int(i) for i in awake]
    rng = np.random.default_rng([seed, 257, server_round])
    return sorted(int(i) for i in rng.choice(awake, per_round, replace=False))


def malicious_clients(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The fixed, seeded set of ``round(fraction * num_clients)`` clients that poison their changes."""
    count = int(round(fraction * num_clients))
    if count == 0:
        return frozenset()
    return frozenset(int(i) for i in np.random.default_rng([seed, 271]).choice(num_clients, count, replace=False))
