"""The simulated MCU client: a ClientApp that runs :func:`fedtiny.federated.client.local_round`.

A node whose node config has ``device-address`` (or whose partition the scenario's
``bridge.devices`` maps to a device) relays its rounds to that device instead
(:mod:`clients.bridge`); ``device-timeout`` in the node config overrides ``bridge.timeout_s``.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.bridge import relay
from clients.wire import bytes_record, record_bytes
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.federated import messages as msg
from fedtiny.federated.client import local_round
from fedtiny.scenario import scenario_from_json

__all__ = ["app"]

app = ClientApp()
STATE = "fedtiny-client-state"


def _partition_id(context: Context) -> int:
    if msg.PARTITION_ID not in context.node_config:
        raise KeyError(f"this SuperNode has no {msg.PARTITION_ID!r} in its node config "
                       "(start it with --node-config 'partition-id=N num-partitions=M')")
    return int(context.node_config[msg.PARTITION_ID])


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    node = ConfigRecord({msg.PARTITION_ID: _partition_id(context)})
    return Message(RecordDict({msg.NODE: node}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Apply the global model, train on the local partition, reply with the encoded update."""
    config = message.content[msg.CONFIG]
    scenario = scenario_from_json(str(config[msg.SCENARIO]))
    address = str(context.node_config.get("device-address", "")) or scenario.device_address(_partition_id(context))
    if address:  # this partition is a real device behind the bridge
        return relay(message, address, float(context.node_config.get("device-timeout", scenario.bridge.timeout_s)))
    scheme = str(config.get(msg.SCHEME, ""))
    kept = {k: a.numpy() for k, a in context.state[STATE].items()} if STATE in context.state else {}
    result, kept = local_round(scenario, _partition_id(context),
                               int(config[msg.SERVER_ROUND]), record_bytes(message.content[msg.GLOBAL]),
                               kind=str(config.get(msg.DOWNLINK, "full")),
                               scheme=ResolvedScheme.from_json(scheme) if scheme else None, state=kept)
    # The model it holds and its error-feedback residual stay on the device between rounds.
    context.state[STATE] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    content = RecordDict({msg.UPDATE: bytes_record(result.update), msg.METRICS: MetricRecord(result.metrics()),
                          msg.INFO: ConfigRecord(result.info())})
    return Message(content, reply_to=message)
