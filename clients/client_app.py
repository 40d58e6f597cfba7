"""The simulated MCU client: a ClientApp that runs :func:`fedtiny.federated.client.client_round`.

A node whose node config has ``device-address`` (or whose partition the scenario's
``bridge.devices`` maps to a device) relays its rounds to that device instead
(:mod:`clients.bridge`); ``device-timeout`` in the node config overrides ``bridge.timeout_s`` (the idle
timeout) and ``device-round-timeout`` overrides ``bridge.round_timeout_s``.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from clients.bridge import relay
from clients.wire import node_content, reply_content, train_header, train_jobs
from fedtiny.federated import messages as msg
from fedtiny.federated.client import client_round, run_jobs
from fedtiny.scenario import scenario_from_json

__all__ = ["app"]

app = ClientApp()
STATE = "fedtiny-client-state"


def _partition_id(context: Context) -> int:
    if msg.PARTITION_ID not in context.node_config:
        raise KeyError(
            f"this SuperNode has no {msg.PARTITION_ID!r} in its node config "
            "(start it with --node-config 'partition-id=N num-partitions=M')"
        )
    return int(context.node_config[msg.PARTITION_ID])


@app.query()
def hello(message: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(node_content(_partition_id(context)), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Apply the global model, train on the local partition(s), reply with the encoded update(s).

    A cohort message (simulation) runs each of its virtual clients in turn, with their
    states on disk; a single-client message trains the node's own partition, whose state
    stays in the node's context unless the server named a state folder.
    """
    header = train_header(message.content)
    scenario = scenario_from_json(header.scenario_json)
    server_round = header.server_round
    if header.cohort:
        jobs = train_jobs(message.content, None)
        results = run_jobs(scenario, server_round, jobs, header.state_dir)
        return Message(reply_content(results, cohort=True), reply_to=message)
    address = str(context.node_config.get("device-address", "")) or scenario.device_address(_partition_id(context))
    if address:  # this partition is a real device behind the bridge
        node = context.node_config
        return relay(
            message,
            address,
            float(node.get("device-timeout", scenario.bridge.timeout_s)),
            _partition_id(context),
            float(node.get("device-round-timeout", scenario.bridge.round_timeout_s)),
        )
    (job,) = train_jobs(message.content, _partition_id(context))
    if header.state_dir:
        results = run_jobs(scenario, server_round, [job], header.state_dir)
        return Message(reply_content(results, cohort=False), reply_to=message)
    kept = {k: a.numpy() for k, a in context.state[STATE].items()} if STATE in context.state else {}
    result, kept = client_round(scenario, job, server_round, kept)
    # The model it holds and its error-feedback residual stay on the device between rounds.
    context.state[STATE] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    return Message(reply_content([(job.partition_id, result)], cohort=False), reply_to=message)
