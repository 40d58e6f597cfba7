"""Aggregation rules, registered by name: how the server combines the accepted clients' changes.

A rule is an :class:`AggregationRule`: FedAvg streams example-weighted sums (``combine`` is None:
:func:`fedtiny.federated.aggregate.aggregate` adds each change as it arrives, so thousands of clients
never sit in memory at once); any other rule sees every accepted client's dense change and combines
them element by element. ``[server] aggregation`` takes the registered names (the scenario's choices
are read from here), and the aggregation looks the rule up instead of testing its name.

A rule of one's own is a function and one :func:`register` call (see docs/architecture.md,
"Adding an aggregation rule")::

    def _geometric_median(rows, sizes, params):
        ...  # {name: combined flat change}

    register(AggregationRule("geometric-median", "Weiszfeld's geometric median", _geometric_median))

Rows are ``(examples, {name: dense flat change})``; an element a client did not train is NaN in its
row (it is not that client's vote), and a tensor a client did not send is absent from its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedtiny.registry import Registry

__all__ = ["RuleParams", "AggregationRule", "Rows", "register", "rule_named", "rule_names"]

Rows = list[tuple[int, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class RuleParams:
    """The ``[server]`` parameters a rule may read (one schema: every key lives in ``scenario.py``)."""

    trim_fraction: float = 0.1
    krum_byzantine: int = 1
    krum_selected: int = 1


@dataclass(frozen=True)
class AggregationRule:
    """One way to combine changes.

    Attributes
    ----------
    name
        ``[server] aggregation``'s value.
    help
        One line for the scenario reference.
    combine
        ``combine(rows, sizes, params) -> {name: flat change}`` over every accepted client's dense change
        (``sizes``: each tensor's element count); None: the streaming example-weighted mean (FedAvg).
    """

    name: str
    help: str
    combine: Callable[[Rows, dict[str, int], RuleParams], dict[str, np.ndarray]] | None = None

    @property
    def streams(self) -> bool:
        """Combines as changes arrive (weighted sums), which central DP's clipped, noised sum needs."""
        return self.combine is None


_RULES: Registry[AggregationRule] = Registry("aggregation rule")


def register(rule: AggregationRule) -> AggregationRule:
    """Add ``rule`` (a name taken twice is a bug)."""
    return _RULES.add(rule.name, rule)


def rule_named(name: str) -> AggregationRule:
    """The rule called ``name`` (the scenario checked it is one)."""
    return _RULES.get(name)


def rule_names() -> tuple[str, ...]:
    """Every registered rule's name, in registration order."""
    return _RULES.names()


# ---------------------------------------------------------------- the built-in rules


def _matrix(rows: Rows, name: str, size: int) -> np.ndarray:
    """Clients x elements of one tensor (NaN: the client did not train it)."""
    return np.stack([d.get(name, np.full(size, np.nan)) for _, d in rows])


def _weighted_mean(rows: Rows, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Example-weighted mean per element over the clients that trained it (0 where nobody did)."""
    n = np.array([e for e, _ in rows], np.float64)[:, None]
    out = {}
    for name, size in sizes.items():
        m = _matrix(rows, name, size)
        trained = ~np.isnan(m)
        w = np.where(trained, n, 0.0)
        out[name] = np.divide((np.where(trained, m, 0.0) * n).sum(0), w.sum(0), out=np.zeros(size), where=w.sum(0) > 0)
    return out


def _median(rows: Rows, sizes: dict[str, int], params: RuleParams) -> dict[str, np.ndarray]:
    """Element-wise median over the clients that trained the element (unweighted, as Flower's FedMedian)."""
    out = {}
    for name, size in sizes.items():
        m = _matrix(rows, name, size)
        count = (~np.isnan(m)).sum(0)
        with np.errstate(all="ignore"):
            out[name] = np.where(count > 0, np.nanmedian(np.where(count > 0, m, 0.0), axis=0), 0.0)
    return out


def _trimmed_mean(rows: Rows, sizes: dict[str, int], params: RuleParams) -> dict[str, np.ndarray]:
    """Element-wise mean without the ``trim_fraction`` smallest and largest values (Flower's FedTrimmedAvg)."""
    out = {}
    for name, size in sizes.items():
        m = _matrix(rows, name, size)
        count = (~np.isnan(m)).sum(0)
        cut = np.floor(params.trim_fraction * count).astype(np.int64)
        order = np.sort(m, axis=0)  # NaN (untrained) sort last
        rank = np.arange(len(m))[:, None]
        keep = (rank >= cut) & (rank < count - cut)
        out[name] = np.divide(np.where(keep, order, 0.0).sum(0), keep.sum(0), out=np.zeros(size), where=keep.sum(0) > 0)
    return out


def _krum(rows: Rows, sizes: dict[str, int], params: RuleParams) -> dict[str, np.ndarray]:
    """The ``krum_selected`` changes closest to their ``n - f - 2`` nearest neighbours, example-weighted."""
    # Distances over everything: an element a client did not train counts as no change.
    flat = np.stack([np.concatenate([np.nan_to_num(d.get(n, np.zeros(sizes[n]))) for n in sizes]) for _, d in rows])
    sq = (flat * flat).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    closest = max(1, len(rows) - params.krum_byzantine - 2)
    scores = np.sort(dist, axis=1)[:, 1 : closest + 1].sum(1)
    chosen = sorted(np.argsort(scores, kind="stable")[: max(1, min(params.krum_selected, len(rows)))])
    return _weighted_mean([rows[i] for i in chosen], sizes)


register(AggregationRule("fedavg", "the example-weighted mean (FedAvg)"))
register(AggregationRule("median", "element-wise median, robust to a minority of bad clients", _median))
register(
    AggregationRule(
        "trimmed-mean", "element-wise mean without the trim_fraction smallest and largest values", _trimmed_mean
    )
)
register(
    AggregationRule(
        "krum",
        "the change (krum_selected > 1: the weighted mean of the changes) closest to its "
        "n - f - 2 nearest neighbours, f = krum_byzantine",
        _krum,
    )
)
