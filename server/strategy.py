"""FedTiny strategy: seeded sampling by partition id, validated aggregation in a fixed order."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.wire import bytes_record, parse_reply, train_content
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.compress.dense import pack_dense
from fedtiny.compress.downlink import DownlinkPlanner
from fedtiny.federated.aggregate import GlobalModel, Rule, aggregate, central_dp
from fedtiny.federated.client import ClientJob
from fedtiny.federated.rounds import Reply, RoundCallback, RoundOutcome, client_updates, round_stats, screen
from fedtiny.federated.sampling import awake_clients, sample_clients
from fedtiny.federated.task import Task, client_profile, with_scheme
from fedtiny.server_setup import FleetSchemes

__all__ = ["FedTinyStrategy", "parse_reply", "cohorts"]


def cohorts(pids: list[int], workers: list[int], size: int) -> list[tuple[int, list[int]]]:
    """Split a round's sampled partitions into cohorts of about ``size``, at most one per worker node."""
    count = min(len(workers), max(1, -(-len(pids) // size)))
    return [(workers[i], pids[i::count]) for i in range(count) if pids[i::count]]


class FedTinyStrategy(Strategy):
    """Federated averaging of client updates with fedtiny's payloads and bookkeeping.

    Parameters
    ----------
    task
        The scenario's task (model, wire specs), under the union of the fleet's schemes.
    schemes
        The scheme of each device profile (None: a fp32 model, every client trains everything).
    node_of
        Flower node id of each partition id (from the discovery query); empty in cohort mode.
    global_model
        The server's global model (master weights and the state it sends).
    on_round
        Called with each round's :class:`~fedtiny.federated.rounds.RoundOutcome` before the
        global model moves (the run log, the attack recorder).
    workers
        Cohort mode (``run.cohort_size > 1``): the nodes that run cohorts of virtual clients.
    state_dir
        Where simulated clients keep their state (sent with each train message; empty:
        each node keeps its client's state in its context, as a device does).
    first_round
        The round Flower's round 1 is (a resumed run starts after its checkpoint).

    Notes
    -----
    ``arrays`` passed between rounds is the downlink payload record (what every
    sampled client receives).
    """

    def __init__(
        self,
        task: Task,
        node_of: dict[int, int],
        global_model: GlobalModel,
        on_round: Iterable[RoundCallback] = (),
        schemes: FleetSchemes | None = None,
        *,
        workers: list[int] | None = None,
        state_dir: str = "",
        first_round: int = 1,
    ) -> None:
        self.task = task
        self.workers = sorted(workers or [])
        self.state_dir = state_dir
        self.round_offset = first_round - 1
        self.schemes = schemes
        self._scheme_of: dict[int, ResolvedScheme | None] = {}  # this round's scheme of each sampled client
        self._key_of: dict[int, str] = {}  # ...and its JSON text
        self._views: dict[str, Task] = {}
        self.scenario = task.scenario
        self.global_model = global_model
        self.on_round = list(on_round)
        self.downlink = DownlinkPlanner(task.downlink_spec, task.scenario.compression.downlink)
        self.node_of = node_of
        self._sent: dict[int, list[int]] = {}  # this round: node id -> partition ids sent to it
        self._down: dict[int, tuple[str, int]] = {}  # this round's downlink: partition id -> (kind, bytes)
        self._awake = 0  # clients awake this round
        v = task.scenario.server
        self.rule = Rule(v.aggregation, v.trim_fraction, v.krum_byzantine, v.krum_selected)

    def summary(self) -> None:
        """Flower logs this at start; fedtiny's run log says what matters."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        s = self.scenario
        awake = (
            None
            if s.fleet.availability == "always"
            else awake_clients(s.fleet, s.run.seed, server_round, s.run.clients)
        )
        self._awake = s.run.clients if awake is None else len(awake)
        pids = sample_clients(s.run.seed, server_round, s.run.clients, s.clients_per_round, awake)
        jobs, self._down, self._scheme_of, self._key_of = {}, {}, {}, {}
        texts: dict[int, str] = {}  # one JSON text per scheme object (static schemes are shared by a profile)
        for p in pids:
            kind, payload = self.downlink.payload(p, server_round, self.global_model.state)
            self._down[p] = (kind, len(payload))
            scheme = (
                self.schemes.for_client(client_profile(s, p).name, p, server_round)
                if self.schemes is not None
                else None
            )
            self._scheme_of[p] = scheme
            if scheme is not None:
                if id(scheme) not in texts:
                    texts[id(scheme)] = scheme.to_json()
                self._key_of[p] = texts[id(scheme)]
            jobs[p] = ClientJob(p, payload, kind, scheme)
        cohort = bool(self.workers)
        groups = cohorts(pids, self.workers, s.run.cohort_size) if cohort else [(self.node_of[p], [p]) for p in pids]
        self._sent = {node: group for node, group in groups}
        return [
            Message(
                train_content(
                    s.to_json(),
                    server_round,
                    [jobs[p] for p in group],
                    cohort=cohort,
                    state_dir=self.state_dir,
                    scheme_texts=self._key_of,
                ),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node, group in groups
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        parsed = sorted((r for m in replies for r in parse_reply(m, self._sent)), key=lambda r: r.partition_id)
        answered = {r.partition_id for r in parsed}
        parsed += [
            Reply(p, error="no reply (timed out or lost)")
            for group in self._sent.values()
            for p in group
            if p not in answered
        ]
        parsed.sort(key=lambda r: r.partition_id)
        self.downlink.received([r.partition_id for r in parsed if not r.error], server_round)
        deadline = self.scenario.fleet.deadline_s
        parsed, stragglers = screen(parsed, server_round, deadline)
        sent = dict(self.global_model.state)  # apply_delta replaces arrays, never writes into them

        def decode(partition_id: int, payload: bytes):
            return self.client_view(partition_id).uplink.decode(payload, sent)

        updates = client_updates(parsed)
        result = aggregate(
            updates,
            decode,
            {n: tuple(sh) for n, sh, _ in self.task.uplink_spec},
            coverage=lambda p: self.client_view(p).slices,
            rule=self.rule,
            dp=central_dp(self.task, server_round, len(self._down)),
        )
        stats = round_stats(parsed, result, self._down, stragglers=stragglers, deadline_s=deadline, awake=self._awake)
        accepted = {u.partition_id: u.payload for u in updates if u.partition_id in set(result.accepted)}
        outcome = RoundOutcome(server_round, stats, accepted, sent, decode, result.arrays)
        for callback in self.on_round:
            callback(outcome)
        if result.arrays is None:
            return None, None
        self.global_model.apply_delta(result.arrays)
        return (
            bytes_record(pack_dense(self.global_model.state, self.task.downlink_spec)),
            MetricRecord(stats.train_metrics()),
        )

    def client_view(self, partition_id: int) -> Task:
        """The task under the scheme client ``partition_id`` was sent this round (its uplink and slices)."""
        scheme = self._scheme_of.get(partition_id)
        if scheme is None:
            return self.task
        key = self._key_of[partition_id]
        if key not in self._views:
            if len(self._views) > 64:  # dynamic channels: a view per client and round; keep the last few
                self._views.clear()
            self._views[key] = with_scheme(self.task, scheme)
        return self._views[key]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation round: clients report local test accuracy with their update."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
