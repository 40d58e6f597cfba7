"""Server-side aggregation of client updates, with validation and rejection counting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedtiny.compress.uplink import Decoded
from fedtiny.errors import UpdateError
from fedtiny.models.state import to_wire

__all__ = ["ClientUpdate", "Rejection", "AggregateResult", "aggregate", "GlobalModel"]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sent: its encoded update and the examples it trained on."""

    partition_id: int
    payload: bytes
    num_examples: int


@dataclass(frozen=True)
class Rejection:
    """An update the server refused, and why."""

    partition_id: int
    reason: str


@dataclass
class AggregateResult:
    """The example-weighted mean (float64; None when nothing was accepted) and what was refused."""

    arrays: dict[str, np.ndarray] | None
    accepted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def aggregate(updates: list[ClientUpdate], decode: Callable[[int, bytes], Decoded], shapes: dict[str, tuple[int, ...]],
              *, coverage: Callable[[int], dict[str, np.ndarray]] | None = None,
              max_examples: int = 10_000_000) -> AggregateResult:
    """Example-weighted mean of the clients' changes, per element, in partition-id order.

    ``decode(partition_id, payload)`` turns a payload into ``{name: (positions, change)}`` or
    raises :class:`~fedtiny.errors.UpdateError` (a codec or payload error); such an update, or
    one with a non-positive or absurd example count, is rejected with its reason and does not
    touch the mean. ``coverage(partition_id)`` gives the flat positions of each tensor the
    client trained (its scheme's slices; ``None``: every element of every tensor). Each element's
    mean runs over the clients that trained it, weighted by their examples; an element nobody
    trained keeps its value (change 0). With one scheme for all clients this is plain FedAvg.
    Sums run in float64 in a fixed order so results repeat.
    """
    result = AggregateResult(None)
    # Coverage arrays are shared by the clients of one scheme: one mask each (the array is kept with its
    # mask so that its id cannot be reused by another array during this call).
    masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sums = {name: np.zeros(int(np.prod(shape)), np.float64) for name, shape in shapes.items()}
    weights = {name: np.zeros(int(np.prod(shape)), np.float64) for name, shape in shapes.items()}
    for u in sorted(updates, key=lambda u: u.partition_id):
        if not isinstance(u.num_examples, int) or not 0 < u.num_examples <= max_examples:
            result.rejected.append(Rejection(u.partition_id, f"bad num-examples {u.num_examples!r}"))
            continue
        try:
            changes = decode(u.partition_id, u.payload)
        except UpdateError as exc:
            result.rejected.append(Rejection(u.partition_id, str(exc)))
            continue
        covered = coverage(u.partition_id) if coverage is not None else None
        for name in shapes if covered is None else covered:
            where = slice(None) if covered is None else covered[name]
            weights[name][where] += u.num_examples
            if name in changes:
                idx, values = changes[name]
                if covered is not None:  # a change outside what the client trained does not count
                    key = id(covered[name])
                    if key not in masks:
                        mask = np.zeros(len(sums[name]), bool)
                        mask[covered[name]] = True
                        masks[key] = (covered[name], mask)
                    keep = masks[key][1][idx]
                    idx, values = idx[keep], values[keep]
                sums[name][idx] += values * u.num_examples
        result.accepted.append(u.partition_id)
    if result.accepted:
        result.arrays = {name: np.divide(s, weights[name], out=np.zeros_like(s), where=weights[name] > 0
                                         ).reshape(shapes[name]) for name, s in sums.items()}
    return result


class GlobalModel:
    """The server's global model: a float64 master of the trained tensors and the state it sends.

    Clients of the int8 graph return integer tensors; averaging them gives values
    between integers. The master keeps those fractions across rounds (a client's
    sub-LSB progress is not lost to rounding), and what is sent is the master
    rounded to the device's dtypes. For fp32 tensors this is plain FedAvg.

    Parameters
    ----------
    state
        The whole initial state in on-device dtypes (``downlink_spec``'s names).
    trained
        Names of the tensors clients train (``uplink_spec``'s names).
    """

    def __init__(self, state: dict[str, np.ndarray], trained: list[str]) -> None:
        self.state = dict(state)
        self.master = {n: state[n].astype(np.float64) for n in trained}

    def apply_delta(self, mean_delta: dict[str, np.ndarray]) -> None:
        """Move the master by the average client change and re-quantize what is sent."""
        for name, d in mean_delta.items():
            self.master[name] += d
            self.state[name] = to_wire(self.master[name], self.state[name].dtype)
