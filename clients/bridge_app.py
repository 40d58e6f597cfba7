"""The device bridge: relays a round to a microcontroller over the bridge protocol (docs/protocol.md).

``clients.client_app:app`` calls :func:`relay` for a node whose node config has
``device-address = "HOST:PORT"`` (deployment) or whose partition the scenario's
``bridge.devices`` maps to a device (simulation); ``clients.bridge_app:app`` always relays.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.wire import bytes_record, record_bytes
from fedtiny.bridge.device import model_hash
from fedtiny.bridge.relay import relay_round
from fedtiny.federated.client import client_task
from fedtiny.scenario import scenario_from_json
from fedtiny.budget.schemes import ResolvedScheme

app = ClientApp()


def relay(msg: Message, address: str, timeout: float) -> Message:
    """Relay a train message to the device at ``address``; protocol failures raise (an error reply)."""
    config = msg.content["config"]
    scenario = scenario_from_json(str(config["scenario"]))
    scheme = str(config.get("scheme", ""))
    task = client_task(scenario, ResolvedScheme.from_json(scheme) if scheme else None)
    meta = {"round": int(config["server-round"]), "scenario": str(config["scenario"]), "scheme": scheme,
            "downlink": str(config.get("downlink", "full"))}
    reply = relay_round(address, model_hash(task), meta, record_bytes(msg.content["global"]), timeout=timeout)
    metrics = {**reply.metrics, "num-examples": reply.num_examples}
    return Message(RecordDict({"update": bytes_record(reply.update), "metrics": MetricRecord(metrics),
                               "info": ConfigRecord(reply.info)}), reply_to=msg)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    from clients.client_app import hello as local_hello

    return local_hello(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return relay(msg, str(context.node_config["device-address"]), float(context.node_config.get("device-timeout", 120)))
