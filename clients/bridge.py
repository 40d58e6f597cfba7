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

from flwr.app import Message

from clients.wire import error_content, scheme_text, train_header, train_jobs, update_content
from fedtiny.bridge.protocol import model_hash
from fedtiny.bridge.relay import relay_round
from fedtiny.errors import ProtocolError
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
    header = train_header(message.content)
    (job,) = train_jobs(message.content, partition_id)
    scenario = scenario_from_json(header.scenario_json)
    task = client_task(scenario, job.scheme)
    meta = {
        "round": header.server_round,
        "scenario": header.scenario_json,
        "scheme": scheme_text(message.content),
        "downlink": job.kind,
        "seed": round_seed(scenario.run.seed, header.server_round, partition_id),
    }
    try:
        reply = relay_round(
            address, model_hash(task.downlink_spec), meta, job.downlink, timeout=timeout, round_timeout=round_timeout
        )
    except ProtocolError as exc:
        logging.getLogger("fedtiny.bridge").warning("partition %d, round %d: %s", partition_id, meta["round"], exc)
        return Message(error_content(f"bridged device: {exc}"), reply_to=message)
    return Message(update_content(reply.update, reply.metrics, reply.num_examples, reply.info), reply_to=message)
