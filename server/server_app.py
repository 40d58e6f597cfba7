"""The fedtiny ServerApp: pretrain in the cloud, then federate the fine-tuning."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.wire import bytes_record, node_partition, record_bytes
from fedtiny.attack.fleet import ObservationRecorder, attack_observed, privacy_figures
from fedtiny.compress.dense import pack_dense, unpack_dense
from fedtiny.federated.aggregate import GlobalModel
from fedtiny.federated.checkpoint import CHECKPOINT_DIR, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedtiny.federated.rounds import RoundOutcome
from fedtiny.federated.task import limit_threads, make_task, with_scheme
from fedtiny.federated.train import evaluate
from fedtiny.int8.prefix import server_prefixes
from fedtiny.models import load_arrays
from fedtiny.report.runlog import RunLog, new_run_dir, write_scenario
from fedtiny.scenario import Scenario, load_scenario, parse_overrides
from fedtiny.server_setup import server_task
from server.strategy import FedTinyStrategy

__all__ = ["app", "make_server_app", "run_server", "discover_partitions", "wait_for_nodes", "cohort_nodes"]

APP_DIR = Path(__file__).resolve().parents[1]
CLIENT_STATE_DIR = "client-state"


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 120.0) -> list[int]:
    """The connected node ids, once ``expected`` have connected or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    return sorted(nodes)


def discover_partitions(grid: Grid, expected: int, timeout: float = 120.0) -> dict[int, int]:
    """Ask every node for its partition id; return ``{partition_id: node_id}``.

    Waits up to ``timeout`` seconds for ``expected`` nodes to connect (deployment
    SuperNodes may join late) and fails with a clear error when partitions are missing.
    """
    nodes = wait_for_nodes(grid, expected, timeout)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            continue
        pid = node_partition(reply.content)
        node_of.setdefault(pid, reply.metadata.src_node_id)
    missing = sorted(set(range(expected)) - set(node_of))
    if missing:
        raise RuntimeError(
            f"run.clients = {expected} but no connected node holds partition(s) {missing[:10]}"
            f" ({len(nodes)} nodes connected)"
        )
    return node_of


def run_server(
    grid: Grid, scenario: Scenario, run_dir: Path, *, state_dir: str = "", resume: bool = False
) -> dict[str, Any]:
    """Run a whole federation on ``grid`` and write its run folder; return the summary.

    ``state_dir``: where simulated clients keep their state (empty: in each node's context).
    ``resume``: go on from the run folder's checkpoint (:mod:`fedtiny.federated.checkpoint`).
    """
    limit_threads()
    # The simulation's in-memory grid sleeps 0.1 s between pulls of the replies, a quarter of a round of
    # 100 float clients on 2 cores; its replies come from this process's own state, so pulling every
    # 10 ms costs nothing measurable (a deployment's grid has no such attribute and keeps its own).
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = min(float(grid.pull_interval), 0.01)
    ck = load_checkpoint(run_dir) if resume else None
    if ck is not None and ck.scenario_json != scenario.to_json():
        raise CheckpointError(
            f"{run_dir}: the checkpoint was written by another scenario; resume with the run "
            "folder's own scenario.toml and no new --set"
        )
    log = RunLog(run_dir, scenario, resume=(ck.server_round, ck.elapsed_s) if ck else None)
    task, initial, cloud, schemes = server_task(scenario)
    by_device = {}
    if schemes is not None:
        for device, scheme in schemes.by_profile.items():
            by_device[device] = {"scheme": scheme.summary(), **scheme.to_dict(), **schemes.found.get(device, {})}
            log.note(
                f"{device}: scheme {scheme.summary()}" + (", channels redrawn each round" if schemes.dynamic else "")
            )
    log.note(
        f"cloud model: fp32 accuracy {cloud.fp32_accuracy:.4f}"
        + (f", after int8 PTQ {cloud.ptq_accuracy:.4f}" if cloud.ptq_accuracy is not None else "")
    )
    global_model = GlobalModel(initial, [n for n, *_ in task.uplink_spec])
    prefixes = server_prefixes(task.model, [n for n, *_ in task.uplink_spec])  # the test split's frozen prefix
    recorder = ObservationRecorder(scenario.attack)
    if scenario.run.cohort_size > 1:  # nodes are workers; the server places cohorts of virtual clients on them
        node_of, workers = {}, wait_for_nodes(grid, cohort_nodes(scenario))
    else:
        node_of, workers = discover_partitions(grid, scenario.run.clients), None
    strategy = FedTinyStrategy(
        task,
        node_of,
        global_model,
        on_round=[],
        schemes=schemes,
        workers=workers,
        state_dir=state_dir,
        first_round=ck.server_round + 1 if ck else 1,
    )
    if ck is not None:
        log.note(f"resuming after round {ck.server_round} from {run_dir / CHECKPOINT_DIR}")
        global_model.state, global_model.master = ck.state, ck.master
        strategy.downlink.history, strategy.downlink.last_seen = ck.downlink_history, ck.downlink_last_seen
        recorder.observed = ck.observed

    def log_round(outcome: RoundOutcome) -> None:
        log.add_round_stats(outcome.server_round, outcome.stats.record())

    def evaluate_global(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if ck is not None and flower_round == 0:
            return None  # the model the resumed run starts from was evaluated before it stopped
        server_round = flower_round + strategy.round_offset
        load_arrays(task.model, unpack_dense(record_bytes(arrays), task.downlink_spec))
        loss, acc = evaluate(task.model, task.federation.test, prefixes=prefixes)
        log.add_evaluation(server_round, acc, loss)
        if server_round > 0:
            save_checkpoint(
                run_dir,
                Checkpoint(
                    server_round,
                    log.elapsed(),
                    global_model.state,
                    global_model.master,
                    strategy.downlink.history,
                    strategy.downlink.last_seen,
                    recorder.observed,
                    scenario.to_json(),
                ),
            )
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy.on_round = [log_round, recorder]
    remaining = scenario.run.rounds - (ck.server_round if ck else 0)
    if remaining > 0:
        strategy.start(
            grid,
            bytes_record(pack_dense(global_model.state, task.downlink_spec)),
            num_rounds=remaining,
            evaluate_fn=evaluate_global,
        )
    privacy = {}
    task = with_scheme(task, task.scheme)  # the clients' views moved the shared model's trainable set
    if recorder.observed:
        log.note(f"attacking {len(recorder.observed)} observed update(s) ({scenario.attack.method})")
        report = attack_observed(task, recorder.observed, scenario.attack, run_dir)
        privacy = privacy_figures(report)
    return log.finish(
        pretrain_train_accuracy=cloud.pretrain_train_accuracy,
        cloud_fp32_accuracy=cloud.fp32_accuracy,
        cloud_ptq_accuracy=cloud.ptq_accuracy,
        precision=scenario.model.precision,
        lr=cloud.lr,
        lr_source=cloud.lr_source,
        optimizer=scenario.train.optimizer,
        scheme=task.scheme.summary() if task.scheme else "full",
        schemes_by_device=by_device,
        channels=scenario.train.channels,
        model_parameters=sum(p.numel() for p in task.model.parameters()),
        **compression_ratios(task, log.records),
        **privacy,
    )


def cohort_nodes(scenario: Scenario) -> int:
    """Nodes a cohort-mode simulation starts: one per cohort of a round."""
    return max(1, -(-scenario.clients_per_round // scenario.run.cohort_size))


def compression_ratios(task, records) -> dict[str, Any]:
    """Uplink totals against sending the dense model each time: fp32 (4 bytes per parameter) and int8
    (the int8 graph's on-device dtypes: int8 weights, int32 biases)."""
    uploads = sum(len(r.get("clients", [])) + len(r.get("rejected", [])) for r in records)
    params = sum(p.numel() for p in task.model.parameters())
    int8_task = (
        task
        if task.scenario.model.precision == "int8"
        else make_task(
            dataclasses.replace(
                task.scenario,
                model=dataclasses.replace(task.scenario.model, precision="int8"),
                train=dataclasses.replace(task.scenario.train, optimizer="sgd+qas", scheme="full"),
            )
        )
    )
    dense_int8 = sum(
        int(np.prod(shape)) * np.dtype(dt).itemsize
        for name, shape, dt in int8_task.downlink_spec
        if name.endswith((".weight", ".bias"))
    )
    up = sum(r.get("uplink_bytes", 0) for r in records)
    return {
        "uploads": uploads,
        "dense_fp32_bytes_per_upload": 4 * params,
        "dense_int8_bytes_per_upload": dense_int8,
        "uplink_ratio_vs_dense_fp32": round(uploads * 4 * params / up, 2) if up else None,
        "uplink_ratio_vs_dense_int8": round(uploads * dense_int8 / up, 2) if up else None,
        "uplink_bytes_per_upload": round(up / uploads, 1) if uploads else None,
    }


def make_server_app(scenario: Scenario, run_dir: Path, *, resume: bool = False) -> ServerApp:
    """A ServerApp bound to a resolved scenario (``fedtiny run`` uses this with run_simulation).

    Simulated clients keep their state in ``run_dir/client-state`` so that a run can resume.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, scenario, run_dir, state_dir=str(Path(run_dir) / CLIENT_STATE_DIR), resume=resume)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the scenario comes from the run config."""
    cfg = context.run_config
    path = Path(str(cfg.get("scenario", "scenarios/quickstart.toml")))
    scenario = load_scenario(
        path if path.is_absolute() else APP_DIR / path, parse_overrides(str(cfg.get("overrides", "")))
    )
    run_dir = new_run_dir(scenario, str(cfg.get("run-dir", "")) or None)
    write_scenario(scenario, run_dir)
    # Cohorts of virtual clients move between nodes: their states live in the run folder (one machine).
    run_server(
        grid, scenario, run_dir, state_dir=str(run_dir / CLIENT_STATE_DIR) if scenario.run.cohort_size > 1 else ""
    )
