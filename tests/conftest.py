import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models" / "tiny-training"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``fedtiny`` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "fedtiny.tools.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def build_c_library(target: str) -> None:
    """Build ``device/c/<target>`` with the system compiler (skip the test when there is none)."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip(f"no C compiler: device/c/{target} cannot be built")
    subprocess.run(["make", "-s", "-C", str(ROOT / "device" / "c"), target], check=True)


def env_with_capability(capability: str | None) -> dict:
    """This process's environment with ``ATEN_CPU_CAPABILITY`` set (None: PyTorch's best kernels)."""
    import os

    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def client_replies(strategy, messages, results):
    """Reply messages of one-client-per-node train messages, for the clients in ``results``."""
    from flwr.app import Message

    from clients.wire import reply_content

    pid_of = {node: pid for pid, node in strategy.node_of.items()}
    return [
        Message(
            reply_content([(pid_of[m.metadata.dst_node_id], results[pid_of[m.metadata.dst_node_id]])], cohort=False),
            reply_to=m,
        )
        for m in messages
        if pid_of[m.metadata.dst_node_id] in results
    ]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def flower_task_identity():
    """Flower stamps messages with the running task's identity; outside a run, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def strategy_round(scenario, on_round=()):
    """One round of ``scenario``'s clients through the server's strategy, the clients' real rounds in
    process: returns the task, the strategy, the trained tensors before the round and each client's result."""
    from clients.wire import bytes_record, train_jobs
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.federated.client import local_round
    from fedtiny.server_setup import server_task
    from server.strategy import FedTinyStrategy

    task, initial, _, schemes = server_task(scenario, progress=None)
    trained = [n for n, *_ in task.uplink_spec]
    strategy = FedTinyStrategy(
        task,
        {p: 100 + p for p in range(scenario.run.clients)},
        GlobalModel(initial, trained),
        on_round=on_round,
        schemes=schemes,
    )
    before = {n: strategy.global_model.master[n].copy() for n in trained}
    sent = list(strategy.configure_train(1, bytes_record(pack_dense(initial, task.downlink_spec)), None, None))
    results = {}
    for m in sent:
        pid = m.metadata.dst_node_id - 100
        (job,) = train_jobs(m.content, pid)
        results[pid], _ = local_round(scenario, pid, 1, job.downlink, kind=job.kind, scheme=job.scheme, state={})
    strategy.aggregate_train(1, client_replies(strategy, sent, results))
    return task, strategy, before, results


def attack_one_client(scenario):
    """The server's side of one round of ``scenario`` with client 0's update attacked in-simulation:
    ``(task, report)`` (``fedtiny.attack.fleet.attack_observed`` on what client 0 really sent)."""
    from fedtiny.attack.fleet import attack_observed
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import local_round
    from fedtiny.server_setup import server_task

    task, initial, _, _ = server_task(scenario, progress=None)
    result, _ = local_round(scenario, 0, 1, pack_dense(initial, task.downlink_spec), scheme=task.scheme)
    assert not result.refusal, result.refusal
    observed = [
        {"round": 1, "partition_id": 0, "changes": task.uplink.decode(result.update, initial), "state": initial}
    ]
    return task, attack_observed(task, observed, scenario.attack)
