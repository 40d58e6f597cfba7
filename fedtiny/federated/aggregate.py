"""Server-side aggregation of client updates, with validation and rejection counting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from fedtiny.compress.uplink import Decoded
from fedtiny.errors import UpdateError
from fedtiny.models.state import to_wire
from fedtiny.privacy.dp import DP_STREAM, add_noise, clip_change
from fedtiny.rules import RuleParams, rule_named

if TYPE_CHECKING:
    from fedtiny.federated.task import Task

__all__ = [
    "ClientUpdate",
    "Rejection",
    "AggregateResult",
    "aggregate",
    "GlobalModel",
    "Rule",
    "CentralDP",
    "central_dp",
]


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


@dataclass(frozen=True)
class Rule:
    """How accepted changes are combined (``[server]``): a registered rule's name (:mod:`fedtiny.rules`:
    ``fedavg``, ``median``, ``trimmed-mean``, ``krum``, and any registered since) and the parameters it reads."""

    name: str = "fedavg"
    trim_fraction: float = 0.1
    krum_byzantine: int = 1
    krum_selected: int = 1

    @property
    def params(self) -> RuleParams:
        return RuleParams(self.trim_fraction, self.krum_byzantine, self.krum_selected)


@dataclass(frozen=True)
class CentralDP:
    """Central differential privacy of a round (``[privacy] dp = "central"``, :mod:`fedtiny.privacy.dp`).

    Each accepted change is clipped to ``clip_norm`` (L2 in real units), the clipped changes
    are summed unweighted, N(0, std^2) real-unit noise is added to every element some client
    could train, and the sum is divided by ``denominator`` (the round's sampled clients).

    Attributes
    ----------
    units
        Real value of one stored unit of every element of each tensor (flat).
    rng
        The round's noise generator (seeded by the caller).
    """

    clip_norm: float
    std: float
    denominator: int
    units: dict[str, np.ndarray]
    rng: np.random.Generator


def central_dp(task: "Task", server_round: int, sampled: int) -> CentralDP | None:
    """The round's :class:`CentralDP` when the scenario asks for it (``[privacy] dp = "central"``), else None."""
    s = task.scenario
    p = s.privacy
    if p.dp != "central":
        return None
    return CentralDP(
        p.clip_norm,
        p.noise_multiplier * p.clip_norm,
        max(1, sampled),
        task.units,
        np.random.default_rng((s.run.seed, server_round, DP_STREAM)),
    )


def _frozen_empty(dtype: type) -> np.ndarray:
    a = np.zeros(0, dtype)
    a.setflags(write=False)  # shared by every call
    return a


_NOTHING = (_frozen_empty(np.int64), _frozen_empty(np.float64))  # a tensor a client did not send


def _as_slice(idx: np.ndarray, size: int) -> slice | np.ndarray:
    """``slice(None)`` for positions that are every element (a dense update), else ``idx``: the sums then add
    whole arrays, the same additions as through the positions, without a scatter per tensor. A codec's
    positions are strictly increasing and within the tensor (``Decoded``), so ``size`` of them are all."""
    return slice(None) if len(idx) == size else idx


def aggregate(
    updates: list[ClientUpdate],
    decode: Callable[[int, bytes], Decoded],
    shapes: dict[str, tuple[int, ...]],
    *,
    coverage: Callable[[int], dict[str, np.ndarray]] | None = None,
    max_examples: int = 10_000_000,
    rule: Rule = Rule(),
    dp: CentralDP | None = None,
) -> AggregateResult:
    """Combine the clients' changes per element, in partition-id order (FedAvg unless ``rule`` says otherwise).

    ``decode(partition_id, payload)`` turns a payload into ``{name: (positions, change)}`` or
    raises :class:`~fedtiny.errors.UpdateError` (a codec or payload error); such an update, or
    one with a non-positive or absurd example count, is rejected with its reason and does not
    touch the result. ``coverage(partition_id)`` gives the flat positions of each tensor the
    client trained (its scheme's slices; ``None``: every element of every tensor). Each element
    is combined over the clients that trained it (a trained element a client did not send has
    change 0); an element nobody trained keeps its value (change 0). FedAvg weights by
    examples, so with one scheme for all clients it is plain FedAvg; any other rule
    (:mod:`fedtiny.rules`) combines every accepted client's dense change (NaN where it did not
    train). Sums run in float64 in a fixed order so results repeat. With ``dp`` the mean is
    DP-FedAvg's (:class:`CentralDP`).
    """
    result = AggregateResult(None)
    kind = rule_named(rule.name)
    # Coverage arrays are shared by the clients of one scheme: one mask each (the array is kept with its
    # mask so that its id cannot be reused by another array during this call).
    masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sums = {name: np.zeros(int(np.prod(shape)), np.float64) for name, shape in shapes.items()}
    weights = {name: np.zeros(int(np.prod(shape)), np.float64) for name, shape in shapes.items()}
    rows: list[tuple[int, dict[str, np.ndarray]]] = []  # robust rules: (examples, dense change, NaN = untrained)
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
        kept: dict[str, tuple[slice | np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in shapes if covered is None else covered:
            where: slice | np.ndarray = slice(None)
            idx, values = changes.get(name, _NOTHING)
            if covered is not None:  # a change outside what the client trained does not count
                key = id(covered[name])
                if key not in masks:
                    mask = np.zeros(len(sums[name]), bool)
                    mask[covered[name]] = True
                    masks[key] = (covered[name], mask, bool(mask.all()))
                _, mask, every = masks[key]
                if not every:
                    keep = mask[idx]
                    idx, values = idx[keep], values[keep]
                    where = covered[name]
            kept[name] = (where, _as_slice(idx, len(sums[name])), values)
        if dp is not None:
            clipped, _ = clip_change(
                {n: v for n, (_, _, v) in kept.items()},
                {n: dp.units[n][i] for n, (_, i, _) in kept.items()},
                dp.clip_norm,
            )
            kept = {n: (w, i, clipped[n]) for n, (w, i, _) in kept.items()}
        dense: dict[str, np.ndarray] = {}
        for name, (where, idx, values) in kept.items():
            if kind.streams:
                weight = 1 if dp is not None else u.num_examples  # DP-FedAvg: one client, one vote
                weights[name][where] += weight
                sums[name][idx] += values * weight
            else:
                row = np.full(len(sums[name]), np.nan)
                row[where] = 0.0
                row[idx] = values
                dense[name] = row
        if not kind.streams:
            rows.append((u.num_examples, dense))
        result.accepted.append(u.partition_id)
    if not result.accepted:
        return result
    if dp is not None:
        # Noise on every element some accepted client could train (the schemes are public), then the fixed mean.
        noised = add_noise(
            {n: s[weights[n] > 0] for n, s in sums.items()},
            {n: dp.units[n][weights[n] > 0] for n in sums},
            dp.std,
            dp.rng,
        )
        flat = {}
        for name, s in sums.items():
            out = np.zeros_like(s)
            out[weights[name] > 0] = noised[name] / dp.denominator
            flat[name] = out
    elif kind.streams:
        flat = {
            name: np.divide(s, weights[name], out=np.zeros_like(s), where=weights[name] > 0) for name, s in sums.items()
        }
    else:
        flat = kind.combine(rows, {name: len(s) for name, s in sums.items()}, rule.params)
    result.arrays = {name: a.reshape(shapes[name]) for name, a in flat.items()}
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
