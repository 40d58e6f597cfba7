"""Seeded client sampling by partition id (Flower's node ids change every run; partition ids do not)."""

from __future__ import annotations

import numpy as np

__all__ = ["sample_clients"]


def sample_clients(seed: int, server_round: int, num_clients: int, per_round: int) -> list[int]:
    """Return the sorted partition ids sampled in ``server_round`` (all when ``per_round >= num_clients``)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, 257, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, per_round, replace=False))
