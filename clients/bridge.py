"""The device bridge: relays a round to a microcontroller over the bridge protocol (docs/protocol.md).

``clients.client_app:app`` calls :func:`relay` for a node whose node config has
``device-address`` (deployment: ``"HOST:PORT"``, ``"serial:HOST:PORT"``, ``"serial:/dev/ttyACM0@115200"``)
or whose partition the scenario's ``bridge.devices`` maps to a device (simulation).

A failed exchange (any :class:`~fedtiny.errors.ProtocolError`: a bad address, a port that does not
open, a device that resets, stalls or sends garbage) is an error reply for this client: the server
counts it in the round's ``rejected`` list with the reason, and the round goes on.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from clients.wire import bytes_record, record_bytes
from fedtiny.bridge.protocol import model_hash
from fedtiny.bridge.relay import relay_round
from fedtiny.errors import ProtocolError
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.federated import messages as msg
from fedtiny.federated.client import client_task
from fedtiny.federated.train import round_seed
from fedtiny.scenario import scenario_from_json

__all__ = ["relay"]


def relay(message: Message, address: str, timeout: float, partition_id: int, round_timeout: float = 0.0) -> Message:
    """Relay a train message to the device at ``address``.

    ``timeout`` is the idle timeout (seconds without a byte from the device), ``round_timeout`` the
    limit of the whole exchange (0: none). A protocol failure becomes a reply whose info record
    carries the error (the server's ``client error: bridged device ...`` rejection).
    """
    config = message.content[msg.CONFIG]
    scenario = scenario_from_json(str(config[msg.SCENARIO]))
    scheme = str(config.get(msg.SCHEME, ""))
    task = client_task(scenario, ResolvedScheme.from_json(scheme) if scheme else None)
    meta = {"round": int(config[msg.SERVER_ROUND]), "scenario": str(config[msg.SCENARIO]), "scheme": scheme,
            "downlink": str(config.get(msg.DOWNLINK, "full")),
            "seed": round_seed(scenario.run.seed, int(config[msg.SERVER_ROUND]), partition_id)}
    try:
        reply = relay_round(address, model_hash(task.downlink_spec), meta, record_bytes(message.content[msg.GLOBAL]),
                            timeout=timeout, round_timeout=round_timeout)
    except ProtocolError as exc:
        logging.getLogger("fedtiny.bridge").warning("partition %d, round %d: %s", partition_id, meta["round"], exc)
        return Message(RecordDict({msg.INFO: ConfigRecord({msg.ERROR: f"bridged device: {exc}"})}), reply_to=message)
    metrics = {**reply.metrics, msg.NUM_EXAMPLES: reply.num_examples}
    return Message(RecordDict({msg.UPDATE: bytes_record(reply.update), msg.METRICS: MetricRecord(metrics),
                               msg.INFO: ConfigRecord(reply.info)}), reply_to=message)
