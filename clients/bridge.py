"""The device bridge: relays a round to a microcontroller over the bridge protocol (docs/protocol.md).

``clients.client_app:app`` calls :func:`relay` for a node whose node config has
``device-address = "HOST:PORT"`` (deployment) or whose partition the scenario's
``bridge.devices`` maps to a device (simulation).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from clients.wire import bytes_record, record_bytes
from fedtiny.bridge.protocol import model_hash
from fedtiny.bridge.relay import relay_round
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.federated import messages as msg
from fedtiny.federated.client import client_task
from fedtiny.federated.train import round_seed
from fedtiny.scenario import scenario_from_json

__all__ = ["relay"]


def relay(message: Message, address: str, timeout: float, partition_id: int) -> Message:
    """Relay a train message to the device at ``address``; protocol failures raise (an error reply)."""
    config = message.content[msg.CONFIG]
    scenario = scenario_from_json(str(config[msg.SCENARIO]))
    scheme = str(config.get(msg.SCHEME, ""))
    task = client_task(scenario, ResolvedScheme.from_json(scheme) if scheme else None)
    meta = {"round": int(config[msg.SERVER_ROUND]), "scenario": str(config[msg.SCENARIO]), "scheme": scheme,
            "downlink": str(config.get(msg.DOWNLINK, "full")),
            "seed": round_seed(scenario.run.seed, int(config[msg.SERVER_ROUND]), partition_id)}
    reply = relay_round(address, model_hash(task.downlink_spec), meta, record_bytes(message.content[msg.GLOBAL]),
                        timeout=timeout)
    metrics = {**reply.metrics, msg.NUM_EXAMPLES: reply.num_examples}
    return Message(RecordDict({msg.UPDATE: bytes_record(reply.update), msg.METRICS: MetricRecord(metrics),
                               msg.INFO: ConfigRecord(reply.info)}), reply_to=message)
