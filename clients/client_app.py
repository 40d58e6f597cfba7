"""The simulated MCU client: a ClientApp that runs :func:`fedtiny.client.local_round`."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.wire import bytes_record, record_bytes
from fedtiny.client import local_round
from fedtiny.scenario import scenario_from_json
from fedtiny.sparse import ResolvedScheme

app = ClientApp()


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
    scheme = str(config.get("scheme", ""))
    result = local_round(scenario_from_json(str(config["scenario"])), _partition_id(context),
                         int(config["server-round"]), record_bytes(msg.content["global"]),
                         ResolvedScheme.from_json(scheme) if scheme else None)
    content = RecordDict({"update": bytes_record(result.update), "metrics": MetricRecord(result.metrics()),
                          "info": ConfigRecord(result.info())})
    return Message(content, reply_to=msg)
