"""FedTiny strategy: seeded sampling by partition id, validated aggregation in a fixed order."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.wire import bytes_record, record_bytes
from fedtiny.compress.dense import pack_dense
from fedtiny.compress.downlink import DownlinkPlanner
from fedtiny.errors import UpdateError
from fedtiny.federated import messages as msg
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.federated.aggregate import GlobalModel, aggregate
from fedtiny.federated.fleet import FleetSchemes
from fedtiny.federated.rounds import Reply, RoundCallback, RoundOutcome, client_updates, round_stats
from fedtiny.federated.sampling import sample_clients
from fedtiny.federated.task import Task, client_profile, with_scheme

__all__ = ["FedTinyStrategy", "parse_reply"]


def parse_reply(message: Message, partition_of: dict[int, int]) -> Reply:
    """A train reply as a :class:`Reply`; an error reply or a malformed record becomes ``Reply.error``."""
    pid = partition_of.get(message.metadata.src_node_id, -1)
    if message.has_error():
        return Reply(pid, error=f"client error: {message.error.reason}")
    try:
        payload = record_bytes(message.content.array_records.get(msg.UPDATE))
    except UpdateError as exc:
        return Reply(pid, error=str(exc))
    metrics = message.content.metric_records.get(msg.METRICS) or {}
    info = message.content.config_records.get(msg.INFO) or {}
    return Reply(pid, payload, dict(metrics.items()), dict(info.items()))


class FedTinyStrategy(Strategy):
    """Federated averaging of client updates with fedtiny's payloads and bookkeeping.

    Parameters
    ----------
    task
        The scenario's task (model, wire specs), under the union of the fleet's schemes.
    schemes
        The scheme of each device profile (None: a fp32 model, every client trains everything).
    node_of
        Flower node id of each partition id (from the discovery query).
    global_model
        The server's global model (master weights and the state it sends).
    on_round
        Called with each round's :class:`~fedtiny.federated.rounds.RoundOutcome` before the
        global model moves (the run log, the attack recorder).

    Notes
    -----
    ``arrays`` passed between rounds is the downlink payload record (what every
    sampled client receives).
    """

    def __init__(self, task: Task, node_of: dict[int, int], global_model: GlobalModel,
                 on_round: Iterable[RoundCallback] = (), schemes: FleetSchemes | None = None) -> None:
        self.task = task
        self.schemes = schemes
        self._scheme_of: dict[int, ResolvedScheme | None] = {}  # this round's scheme of each sampled client
        self._views: dict[str, Task] = {}
        self.scenario = task.scenario
        self.global_model = global_model
        self.on_round = list(on_round)
        self.downlink = DownlinkPlanner(task.downlink_spec, task.scenario.compression.downlink)
        self.node_of = node_of
        self.partition_of = {n: p for p, n in node_of.items()}
        self._down: dict[int, tuple[str, int]] = {}  # this round's downlink: partition id -> (kind, bytes)

    def summary(self) -> None:
        """Flower logs this at start; fedtiny's run log says what matters."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        s = self.scenario
        pids = sample_clients(s.run.seed, server_round, s.run.clients, s.clients_per_round)
        messages, self._down, self._scheme_of = [], {}, {}
        for p in pids:
            kind, payload = self.downlink.payload(p, server_round, self.global_model.state)
            self._down[p] = (kind, len(payload))
            scheme = (self.schemes.for_client(client_profile(s, p).name, p, server_round)
                      if self.schemes is not None else None)
            self._scheme_of[p] = scheme
            cfg = ConfigRecord({msg.SCENARIO: s.to_json(), msg.SERVER_ROUND: server_round,
                                msg.SCHEME: scheme.to_json() if scheme is not None else "", msg.DOWNLINK: kind})
            messages.append(Message(RecordDict({msg.GLOBAL: bytes_record(payload), msg.CONFIG: cfg}),
                                    dst_node_id=self.node_of[p], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed = sorted((parse_reply(m, self.partition_of) for m in replies), key=lambda r: r.partition_id)
        for r in parsed:
            if not r.error:
                self.downlink.received(r.partition_id, server_round)
        sent = dict(self.global_model.state)  # apply_delta replaces arrays, never writes into them

        def decode(partition_id: int, payload: bytes):
            return self.client_view(partition_id).uplink.decode(payload, sent)

        updates = client_updates(parsed)
        result = aggregate(updates, decode, {n: tuple(sh) for n, sh, _ in self.task.uplink_spec},
                           coverage=lambda p: self.client_view(p).slices)
        stats = round_stats(parsed, result, self._down)
        accepted = {u.partition_id: u.payload for u in updates if u.partition_id in set(result.accepted)}
        outcome = RoundOutcome(server_round, stats, accepted, sent, decode)
        for callback in self.on_round:
            callback(outcome)
        if result.arrays is None:
            return None, None
        self.global_model.apply_delta(result.arrays)
        return (bytes_record(pack_dense(self.global_model.state, self.task.downlink_spec)),
                MetricRecord(stats.train_metrics()))

    def client_view(self, partition_id: int) -> Task:
        """The task under the scheme client ``partition_id`` was sent this round (its uplink and slices)."""
        scheme = self._scheme_of.get(partition_id)
        if scheme is None:
            return self.task
        key = scheme.to_json()
        if key not in self._views:
            if len(self._views) > 64:  # dynamic channels: a view per client and round; keep the last few
                self._views.clear()
            self._views[key] = with_scheme(self.task, scheme)
        return self._views[key]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation round: clients report local test accuracy with their update."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
