"""The simulated MCU client: a ClientApp that runs :func:`fedtiny.federated.client.local_round`."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.wire import bytes_record, record_bytes
from fedtiny.federated.client import local_round
from fedtiny.scenario import scenario_from_json
from fedtiny.budget.schemes import ResolvedScheme

app = ClientApp()
STATE = "fedtiny-client-state"


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise KeyError("this SuperNode has no 'partition-id' in its node config "
                       "(start it with --node-config 'partition-id=N num-partitions=M')")
    return int(context.node_config["partition-id"])


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(RecordDict({"node": ConfigRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the global model, train on the local partition, reply with the encoded update."""
    config = msg.content["config"]
    scenario = scenario_from_json(str(config["scenario"]))
    address = str(context.node_config.get("device-address", "")) or scenario.device_address(_partition_id(context))
    if address:  # this partition is a real device behind the bridge
        from clients.bridge_app import relay

        return relay(msg, address, scenario.bridge.timeout_s)
    scheme = str(config.get("scheme", ""))
    kept = {k: a.numpy() for k, a in context.state[STATE].items()} if STATE in context.state else {}
    result, kept = local_round(scenario, _partition_id(context),
                               int(config["server-round"]), record_bytes(msg.content["global"]),
                               kind=str(config.get("downlink", "full")),
                               scheme=ResolvedScheme.from_json(scheme) if scheme else None, state=kept)
    # The model it holds and its error-feedback residual stay on the device between rounds.
    context.state[STATE] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    content = RecordDict({"update": bytes_record(result.update), "metrics": MetricRecord(result.metrics()),
                          "info": ConfigRecord(result.info())})
    return Message(content, reply_to=msg)
