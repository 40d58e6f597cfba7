"""A round on the server, free of Flower: the clients' replies, what was accepted, the round's stats.

The strategy parses each reply message into a :class:`Reply`, aggregates the updates
(:func:`fedtiny.federated.aggregate.aggregate`), and hands a :class:`RoundOutcome` to
the callbacks the ServerApp registered (the run log, the attack recorder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedtiny.compress.uplink import Decoded
from fedtiny.federated import messages as msg
from fedtiny.federated.aggregate import AggregateResult, ClientUpdate

__all__ = [
    "Reply",
    "RoundStats",
    "RoundOutcome",
    "RoundCallback",
    "round_stats",
    "client_updates",
    "screen",
    "client_seconds",
]


@dataclass(frozen=True)
class Reply:
    """One client's reply to a train message.

    Attributes
    ----------
    partition_id
        The client's partition (-1 when the sender is not a known node).
    payload
        The encoded update (empty when the client refused or the reply is unreadable).
    metrics, info
        The reply's scalar metrics and text facts, as sent.
    error
        Why the reply could not be used (a client error, a malformed record); empty otherwise.
    """

    partition_id: int
    payload: bytes = b""
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def num_examples(self) -> Any:
        """The claimed example count, unchecked (the aggregation validates it)."""
        return self.metrics.get(msg.NUM_EXAMPLES)

    @property
    def refused(self) -> bool:
        """The client's training step does not fit its device: it sent no update, by design."""
        return not self.error and bool(self.metrics.get(msg.REFUSED))


@dataclass(frozen=True)
class RoundStats:
    """What the run log records of a round: per-client facts, rejections, refusals, bytes, faults and time.

    ``round_time_s`` is the simulated time of the round: the slowest client that counted, or
    the deadline when the server dropped a straggler at it. ``faults`` lists the clients of
    each injected fault kind (the simulation's record; the server judged their replies on
    their contents alone).
    """

    clients: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    uplink_bytes: int
    downlink_bytes: int
    stragglers: list[dict[str, Any]] = field(default_factory=list)
    faults: dict[str, list[int]] = field(default_factory=dict)
    round_time_s: float = 0.0
    awake_clients: int = 0
    sampled_clients: int = 0

    def record(self) -> dict[str, Any]:
        """The round's entries of a ``metrics.jsonl`` line."""
        return {
            "clients": self.clients,
            "rejected": self.rejected,
            "refused": self.refused,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "stragglers": self.stragglers,
            "faults": self.faults,
            "round_time_s": self.round_time_s,
            "awake_clients": self.awake_clients,
            "sampled_clients": self.sampled_clients,
        }

    def train_metrics(self) -> dict[str, float]:
        """Example-weighted mean training loss and accuracy of the accepted clients."""
        n = sum(c["num_examples"] for c in self.clients)
        return {
            k: sum(float(c.get(k, 0.0)) * c["num_examples"] for c in self.clients) / n
            for k in ("train_loss", "train_accuracy")
        }


@dataclass(frozen=True)
class RoundOutcome:
    """A finished round as the callbacks see it.

    Attributes
    ----------
    server_round
        The round number (1-based).
    stats
        The round's stats.
    accepted
        Payload of every accepted update, by partition id.
    sent
        The global state the clients received this round (before the round's aggregate).
    decode
        The uplink decoder: (partition id, payload) -> change against ``sent``.
    aggregate
        The round's combined change the global model moves by (None when nothing was accepted):
        all an observer behind secure aggregation would see.
    """

    server_round: int
    stats: RoundStats
    accepted: dict[int, bytes]
    sent: dict[str, np.ndarray]
    decode: Callable[[int, bytes], Decoded]
    aggregate: dict[str, np.ndarray] | None = None

    def change(self, partition_id: int) -> Decoded:
        """The decoded change an accepted client sent."""
        return self.decode(partition_id, self.accepted[partition_id])


RoundCallback = Callable[[RoundOutcome], None]


def client_updates(replies: list[Reply]) -> list[ClientUpdate]:
    """The updates to aggregate: replies that are neither unreadable nor refusals."""
    return [
        ClientUpdate(r.partition_id, r.payload, r.num_examples if isinstance(r.num_examples, int) else -1)
        for r in replies
        if not r.error and not r.refused
    ]


def client_seconds(metrics: dict[str, Any]) -> float:
    """A client's simulated round time (compute + radio) as it reported it (0 when it did not)."""
    return float(metrics.get("compute_s", 0.0)) + float(metrics.get("radio_s", 0.0))


def screen(replies: list[Reply], server_round: int, deadline_s: float) -> tuple[list[Reply], list[Reply]]:
    """Judge what the codec cannot: the round an update was trained in, and the deadline.

    Returns the replies to aggregate (a replayed update from an earlier round becomes an
    error reply) and the stragglers: replies whose simulated compute + radio time exceeds
    ``deadline_s`` (0: no deadline), which the server never waits for.
    """
    kept, late = [], []
    for r in replies:
        tag = r.metrics.get(msg.TRAINED_ROUND)
        if not r.error and not r.refused and tag is not None and int(tag) != server_round:
            r = Reply(
                r.partition_id,
                r.payload,
                r.metrics,
                r.info,
                error=f"stale update: trained from round {int(tag)}'s model in round {server_round}",
            )
        if deadline_s > 0 and not r.error and not r.refused and client_seconds(r.metrics) > deadline_s:
            late.append(r)
            continue
        kept.append(r)
    return kept, late


def round_stats(
    replies: list[Reply],
    result: AggregateResult,
    downlink: dict[int, tuple[str, int]],
    *,
    stragglers: list[Reply] = (),
    deadline_s: float = 0.0,
    awake: int = 0,
) -> RoundStats:
    """The round's stats from its replies, the aggregation's verdicts and the downlink sent.

    ``downlink`` maps each sampled partition id to ``(kind, bytes)`` of what it received.
    Uplink bytes count every update that crossed the radio, accepted or rejected (a
    straggler's never arrives).
    """
    sent_updates = [r for r in replies if not r.error and not r.refused]
    unsent = ("", 0)  # a reply from a client this round did not sample
    clients = {
        r.partition_id: {
            "partition_id": r.partition_id,
            "uplink_bytes": len(r.payload),
            "downlink_bytes": downlink.get(r.partition_id, unsent)[1],
            "downlink_kind": downlink.get(r.partition_id, unsent)[0],
            **{k: v for k, v in r.metrics.items() if k != msg.NUM_EXAMPLES},
            "num_examples": r.num_examples,
        }
        for r in sent_updates
    }
    rejected = [(r.partition_id, r.error) for r in replies if r.error]
    rejected += [(x.partition_id, x.reason) for x in result.rejected]
    refused = [
        {
            "partition_id": r.partition_id,
            "device": str(r.info.get("device", "")),
            "reason": str(r.info.get("refusal", ""))[:300],
            "peak_sram_bytes": int(r.metrics.get("peak_sram_bytes", 0)),
            "device_ram_bytes": int(r.metrics.get("device_ram_bytes", 0)),
            "sram_bytes": int(r.metrics.get("sram_bytes", 0)),
        }
        for r in replies
        if r.refused
    ]
    faults: dict[str, list[int]] = {}
    for r in [*replies, *stragglers]:
        kind = "crash" if "ClientCrash" in r.error else str(r.info.get("fault", ""))
        if kind:
            faults.setdefault(kind, []).append(r.partition_id)
    late = [
        {
            "partition_id": r.partition_id,
            "seconds": round(client_seconds(r.metrics), 3),
            "energy_mj": float(r.metrics.get("energy_mj", 0.0)),
        }
        for r in stragglers
    ]
    counted = [client_seconds(clients[p]) for p in result.accepted]
    round_time = deadline_s if stragglers else max(counted, default=0.0)
    return RoundStats(
        clients=[clients[p] for p in sorted(result.accepted)],
        rejected=[{"partition_id": p, "reason": why} for p, why in sorted(rejected, key=lambda x: x[0])],
        refused=sorted(refused, key=lambda x: x["partition_id"]),
        uplink_bytes=sum(len(r.payload) for r in sent_updates),
        downlink_bytes=sum(n for _, n in downlink.values()),
        stragglers=sorted(late, key=lambda x: x["partition_id"]),
        faults={k: sorted(v) for k, v in sorted(faults.items())},
        round_time_s=round(round_time, 6),
        awake_clients=awake,
        sampled_clients=len(downlink),
    )
