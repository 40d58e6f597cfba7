"""Flower's own simulation of the peers workload, with its plain FedAvg: run by ``fedtiny bench peers``.

Usage: ``python flower_worker.py SPEC_JSON`` (the workload as JSON, see ``fedtiny/tools/bench_peers.py``).
Prints progress on stderr and, last, one line ``PEER-RESULT {json}`` on stdout.

What runs is a textbook Flower 1.x app: ``flwr.simulation.run_simulation`` (Ray backend) with one
virtual SuperNode per client (``partition-id`` from the node config), ``flwr.serverapp.strategy.FedAvg``
sampling ``clients_per_round`` of them per round and averaging the replied parameters weighted by
``num-examples``, and a ClientApp that loads the global parameters into the torch model, runs plain
local SGD and replies with its parameters. Parallelism: ``workers`` Ray CPUs, one CPU per ClientApp,
one torch thread each. The global model is evaluated on the test set after every round by the
strategy's ``evaluate_fn`` (in the driver, one torch thread), which also timestamps the rounds.
Nothing here imports fedtiny.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Ray's workers import peer_model by reference: give them this folder on their path (they inherit the environment).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import numpy as np  # noqa: E402
import peer_model  # noqa: E402
import torch  # noqa: E402


def _say(text: str) -> None:
    print(f"[flower] {text}", file=sys.stderr, flush=True)


def make_apps(spec: dict, out: dict):
    """The ClientApp and the ServerApp of the workload; the server fills ``out`` with its figures."""
    # deferred: Flower only for the runner that uses it
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

    # deferred: Flower only for the runner that uses it
    from flwr.clientapp import ClientApp

    # deferred: Flower only for the runner that uses it
    from flwr.serverapp import Grid, ServerApp

    # deferred: Flower only for the runner that uses it
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one client per Ray CPU
        data = peer_model.cached("data:" + spec["data"], lambda: dict(np.load(spec["data"], allow_pickle=False)))
        model = peer_model.cached("model", lambda: peer_model.build(spec))
        slices = peer_model.cached("slices", lambda: peer_model.client_slices(data))
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        n = peer_model.client_round(model, data, slices, pid, spec, server_round)
        names = set(peer_model.parameter_names(model))
        arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k in names})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "partition-id": pid})})
        return Message(content=content, reply_to=msg)

    class CountingFedAvg(FedAvg):
        """Flower's FedAvg, counting the replies it aggregates (a failed client must not go unnoticed)."""

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out.setdefault("clients_trained", []).append(sum(not m.has_error() for m in replies))
            out.setdefault("cohorts", []).append(
                sorted(int(m.content["metrics"]["partition-id"]) for m in replies if not m.has_error())
            )
            errors = [m.error.reason for m in replies if m.has_error()]
            if errors:
                out.setdefault("errors", []).append(errors[0])
            return super().aggregate_train(server_round, replies)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        random.seed(spec["seed"])  # FedAvg samples nodes with the random module
        data = dict(np.load(spec["data"], allow_pickle=False))
        model = peer_model.build(spec)
        names = set(peer_model.parameter_names(model))
        initial = ArrayRecord({k: v for k, v in model.state_dict().items() if k in names})
        out["accuracy"], out["round_end"] = [], []

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            acc = peer_model.evaluate(model, data["x_test"], data["y_test"])
            now = time.time()
            out["accuracy"].append(acc)
            if server_round == 0:
                out["t_ready"] = now
            else:
                out["round_end"].append(now)
                _say(f"round {server_round}/{spec['rounds']}: accuracy {acc:.4f}")
            return MetricRecord({"accuracy": acc})

        strategy = CountingFedAvg(
            fraction_train=spec["clients_per_round"] / spec["clients"],
            fraction_evaluate=0.0,
            min_train_nodes=spec["clients_per_round"],
            min_available_nodes=spec["clients"],
        )
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=spec["rounds"],
            train_config=ConfigRecord({"lr": spec["lr"]}),
            evaluate_fn=central,
        )

    return client_app, server_app


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: flower_worker.py SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    # deferred: Flower only for the runner that uses it
    import flwr
    from flwr.common.logger import update_console_handler

    # deferred: Flower only for the runner that uses it
    from flwr.simulation import run_simulation

    update_console_handler(level=logging.ERROR)  # Flower's and Ray's INFO lines are not the benchmark's output
    out: dict = {}
    client_app, server_app = make_apps(spec, out)
    _say(f"{spec['clients']} virtual SuperNodes, {spec['workers']} Ray workers")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=spec["clients"],
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": spec["workers"]},
        },
    )
    if len(out.get("round_end", [])) != spec["rounds"]:
        print(f"flower_worker: the simulation ended after {len(out.get('round_end', []))} rounds", file=sys.stderr)
        return 1
    result = {
        "simulator": "flower",
        "version": f"flwr {flwr.__version__}",
        "torch": torch.__version__,
        "parallelism": f"{spec['workers']} Ray workers (1 CPU per ClientApp), 1 torch thread each",
        **out,
    }
    print("PEER-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
