"""FedTiny strategy: seeded sampling by partition id, validated aggregation in a fixed order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients.wire import bytes_record, record_bytes
import numpy as np

from fedtiny.federated.aggregate import ClientUpdate, Decoded, GlobalModel, Rejection, aggregate
from fedtiny.attack.fleet import targets_of
from fedtiny.compress.codec import CodecError, decode
from fedtiny.compress.downlink import DownlinkPlanner
from fedtiny.compress.dense import PayloadError, pack_dense, unpack_dense
from fedtiny.federated.sampling import sample_clients
from fedtiny.federated.task import Task

__all__ = ["FedTinyStrategy"]


class FedTinyStrategy(Strategy):
    """Federated averaging of client updates with fedtiny's payloads and bookkeeping.

    Parameters
    ----------
    task
        The scenario's task (model, wire specs).
    node_of
        Flower node id of each partition id (from the discovery query).
    global_model
        The server's global model (master weights and the state it sends).

    Notes
    -----
    ``arrays`` passed between rounds is the downlink payload record (what every
    sampled client receives). After each round, :attr:`last_round` holds the
    per-client metrics, byte counts and rejections for the run log.
    """

    def __init__(self, task: Task, node_of: dict[int, int], global_model: GlobalModel) -> None:
        self.task = task
        self.global_model = global_model
        self.downlink = DownlinkPlanner(task.downlink_spec, task.scenario.compression.downlink)
        self.observed: list[dict[str, Any]] = []  # updates the server attacks (an [attack] section)
        self._attack_ids, self._attack_rounds = targets_of(task.scenario.attack) if task.scenario.attack.enabled \
            else (set(), set())
        self._down: dict[int, tuple[str, int]] = {}
        self.scenario = task.scenario
        self.node_of = node_of
        self.partition_of = {n: p for p, n in node_of.items()}
        self.last_round: dict[str, Any] = {}

    def summary(self) -> None:
        """Flower logs this at start; fedtiny's run log says what matters."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        s = self.scenario
        pids = sample_clients(s.run.seed, server_round, s.run.clients, s.clients_per_round)
        scheme = self.task.scheme.to_json() if self.task.scheme is not None else ""
        messages, self._down = [], {}
        for p in pids:
            kind, payload = self.downlink.payload(p, server_round, self.global_model.state)
            self._down[p] = (kind, len(payload))
            cfg = ConfigRecord({"scenario": s.to_json(), "server-round": server_round, "scheme": scheme,
                                "downlink": kind})
            messages.append(Message(RecordDict({"global": bytes_record(payload), "config": cfg}),
                                    dst_node_id=self.node_of[p], message_type=MessageType.TRAIN))
        return messages

    def _decode(self, payload: bytes) -> Decoded:
        """A client's change, validated against the model and the scheme's trainable slices."""
        state, task = self.global_model.state, self.task
        if task.scenario.compression.uplink == "dense":
            return {n: (np.arange(a.size), a.astype(np.float64).ravel() - state[n].astype(np.float64).ravel())
                    for n, a in unpack_dense(payload, task.uplink_spec).items()}
        out: Decoded = {}
        for t in decode(payload, task.uplink_spec).tensors:
            name = task.uplink_spec[t.tensor_id][0]
            if t.replace:
                raise CodecError(f"tensor {name}: an update must carry changes, not replacement values")
            if not np.isin(t.indices, task.slices[name], assume_unique=True).all():
                raise CodecError(f"tensor {name}: changes elements outside the scheme's trainable slice")
            out[name] = (t.indices, t.values)
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, clients, rejected, refused = [], {}, [], []
        for msg in replies:
            pid = self.partition_of.get(msg.metadata.src_node_id, -1)
            if msg.has_error():
                rejected.append(Rejection(pid, f"client error: {msg.error.reason}"))
                continue
            try:
                payload = record_bytes(msg.content.array_records.get("update"))
                m = msg.content.metric_records.get("metrics") or MetricRecord()
                n = m.get("num-examples")
            except PayloadError as exc:
                rejected.append(Rejection(pid, str(exc)))
                continue
            info = msg.content.config_records.get("info") or {}
            if m.get("refused"):
                self.downlink.received(pid, server_round)
                # The client's training step does not fit its device: it sent no update, by design.
                refused.append({"partition_id": pid, "device": str(info.get("device", "")),
                                "reason": str(info.get("refusal", ""))[:300],
                                "peak_sram_bytes": int(m.get("peak_sram_bytes", 0)),
                                "sram_bytes": int(m.get("sram_bytes", 0))})
                continue
            updates.append(ClientUpdate(pid, payload, n if isinstance(n, int) else -1))
            self.downlink.received(pid, server_round)
            clients[pid] = {"partition_id": pid, "uplink_bytes": len(payload), "downlink_bytes": self._down[pid][1],
                            "downlink_kind": self._down[pid][0],
                            **{k: v for k, v in m.items() if k != "num-examples"}, "num_examples": n}
        result = aggregate(updates, self._decode, {n: tuple(sh) for n, sh, _ in self.task.uplink_spec})
        if server_round in self._attack_rounds:
            for u in sorted(updates, key=lambda u: u.partition_id):
                if u.partition_id in self._attack_ids and u.partition_id in result.accepted:
                    self.observed.append({"round": server_round, "partition_id": u.partition_id,
                                          "changes": self._decode(u.payload),
                                          "state": {k: v.copy() for k, v in self.global_model.state.items()}})
        rejected += result.rejected
        accepted = [clients[p] for p in sorted(result.accepted)]
        self.last_round = {
            "clients": accepted,
            "rejected": [{"partition_id": r.partition_id, "reason": r.reason}
                         for r in sorted(rejected, key=lambda r: r.partition_id)],
            "refused": sorted(refused, key=lambda r: r["partition_id"]),
            # Bytes that crossed the radio, refused or not.
            "uplink_bytes": sum(c["uplink_bytes"] for c in clients.values()),
            "downlink_bytes": sum(n for _, n in self._down.values()),
        }
        if result.arrays is None:
            return None, None
        self.global_model.apply_delta(result.arrays)
        n_total = sum(c["num_examples"] for c in accepted)
        metrics = MetricRecord({
            "train_loss": sum(float(c.get("train_loss", 0.0)) * c["num_examples"] for c in accepted) / n_total,
            "train_accuracy": sum(float(c.get("train_accuracy", 0.0)) * c["num_examples"] for c in accepted) / n_total,
        })
        return bytes_record(pack_dense(self.global_model.state, self.task.downlink_spec)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation round: clients report local test accuracy with their update."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
