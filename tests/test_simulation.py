"""End-to-end: real Flower simulations (Ray backend) of a few clients and rounds, run as a user would."""

import json

import numpy as np
import pytest
from conftest import ROOT

from fedtiny.compress.dense import dense_nbytes, pack_dense
from fedtiny.federated.task import make_task
from fedtiny.report.runlog import TIMING_KEYS, read_metrics
from fedtiny.scenario import load_scenario, parse_overrides

SMALL = [
    "--set",
    "run.clients=4",
    "--set",
    "run.clients_per_round=3",
    "--set",
    "run.rounds=2",
    "--set",
    "model.pretrain_epochs=5",
    "--set",
    "run.name=small",
]
# Exact byte counts need the fixed-size payload: the dense int8 update of the scheme's tensors.
DENSE = ["--set", "compression.uplink=dense", "--set", "compression.downlink=full"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import run_cli

    out = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"run{i}")
        proc = run_cli("run", str(ROOT / "scenarios" / "quickstart.toml"), *SMALL, *DENSE, "--out", str(d), "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append((d, proc))
    return out


def test_run_folder_and_summary(two_runs):
    d, proc = two_runs[0]
    summary = json.loads(proc.stdout)  # --json: stdout is the JSON alone
    for key in (
        "final_accuracy",
        "rounds",
        "num_clients",
        "uplink_bytes_total",
        "downlink_bytes_total",
        "wall_time_s",
        "run_dir",
    ):
        assert key in summary
    assert summary == json.loads((d / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["num_clients"] == 4 and summary["run_dir"] == str(d)
    for name in ("scenario.toml", "metrics.jsonl", "accuracy.png", "bytes.png"):
        assert (d / name).stat().st_size > 0
    resolved = load_scenario(d / "scenario.toml")
    assert resolved.run.clients == 4 and resolved.run.rounds == 2
    # --json: stdout's last line is the summary and the progress lines stay quiet.
    assert proc.stderr.count("[fedtiny] round") == 0


def test_round_progress_lines_say_time_left(tmp_path):
    """Without --json a run prints one line per round on stderr, with the time left at the rounds' pace."""
    import io
    import time

    from fedtiny.progress import quiet, set_quiet
    from fedtiny.report.runlog import RunLog

    scenario = load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(["run.rounds=4"]))
    stream, was = io.StringIO(), quiet()
    set_quiet(False)
    try:
        log = RunLog(tmp_path, scenario, progress=stream)
        for r in range(5):
            time.sleep(0.02)  # the pace is measured on the clock
            log.add_round(
                {"round": r, "global_accuracy": 0.5, "global_loss": 1.0, "uplink_bytes": 10, "downlink_bytes": 10}
            )
    finally:
        set_quiet(was)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and all(line.startswith("[fedtiny] round") for line in lines)
    assert "left" in lines[1] and "left" not in lines[-1]  # nothing is left after the last round
    set_quiet(True)
    try:
        log.add_round({"round": 5, "global_accuracy": 0.5, "global_loss": 1.0})
    finally:
        set_quiet(was)
    assert len(stream.getvalue().splitlines()) == 5


def test_metrics_per_round_and_byte_counts(two_runs):
    d, _ = two_runs[0]
    recs = read_metrics(d)
    assert [r["round"] for r in recs] == [0, 1, 2]
    from fedtiny.federated.task import cloud_model
    from fedtiny.server_setup import resolve_scheme

    task = make_task(load_scenario(d / "scenario.toml"))
    task = resolve_scheme(task, cloud_model(task)[0])  # the sparse scheme decides what is sent back
    up, down = dense_nbytes(task.uplink_spec), dense_nbytes(task.downlink_spec)
    assert up < dense_nbytes(make_task(task.scenario).uplink_spec)
    for r in recs[1:]:
        assert len(r["clients"]) == 3 and r["rejected"] == []
        assert [c["partition_id"] for c in r["clients"]] == sorted(c["partition_id"] for c in r["clients"])
        for c in r["clients"]:
            assert c["uplink_bytes"] == up and c["downlink_bytes"] == down
            assert c["num_examples"] > 0 and 0 <= c["train_accuracy"] <= 1
        assert r["uplink_bytes"] == 3 * up and r["downlink_bytes"] == 3 * down
        assert 0 <= r["global_accuracy"] <= 1 and np.isfinite(r["global_loss"])
    summary = json.loads((d / "summary.json").read_text())
    assert summary["uplink_bytes_total"] == 2 * 3 * up
    # Federated fine-tuning adapts the pretrained model to the shifted sensors.
    assert recs[-1]["global_accuracy"] > recs[0]["global_accuracy"]


def test_same_seed_same_metrics(two_runs):
    a, b = (read_metrics(d) for d, _ in two_runs)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]  # noqa: E731
    assert strip(a) == strip(b)


def test_strategy_rejects_and_counts_bad_updates(flower_task_identity):
    """Real Flower reply messages with broken payloads: counted, never aggregated, round goes on."""
    from flwr.app import Message, MetricRecord, RecordDict

    from clients.wire import bytes_record, record_bytes
    from fedtiny.compress.dense import unpack_dense
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.models import model_arrays
    from fedtiny.models.state import to_wire
    from server.strategy import FedTinyStrategy

    scenario = load_scenario(
        ROOT / "scenarios" / "quickstart.toml", parse_overrides(["run.clients=3", "compression.uplink=dense"])
    )
    task = make_task(scenario)
    state = model_arrays(task.model)
    outcomes = []
    strategy = FedTinyStrategy(
        task,
        {0: 100, 1: 101, 2: 102},
        GlobalModel(state, [n for n, *_ in task.uplink_spec]),
        on_round=[outcomes.append],
    )
    global_record = bytes_record(pack_dense(state, task.downlink_spec))
    sent = list(strategy.configure_train(1, global_record, None, None))
    assert sorted(m.metadata.dst_node_id for m in sent) == [100, 101, 102]

    good = {
        k: to_wire(v.astype(np.float64) + 1.0, v.dtype)
        for k, v in model_arrays(task.model, [n for n, *_ in task.uplink_spec]).items()
    }
    good_bytes = pack_dense(good, task.uplink_spec)
    # node 101: truncated payload; node 102: a valid payload with an impossible example count.
    payloads = {100: (good_bytes, 10), 101: (good_bytes[:17], 10), 102: (good_bytes, -5)}
    replies = []
    for m in sent:
        data, n = payloads[m.metadata.dst_node_id]
        replies.append(
            Message(
                RecordDict(
                    {
                        "update": bytes_record(data),
                        "metrics": MetricRecord(
                            {"num-examples": n, "train_loss": 0.5, "train_accuracy": 0.5, "test_accuracy": 0.5}
                        ),
                    }
                ),
                reply_to=m,
            )
        )
    new, metrics = strategy.aggregate_train(1, replies)
    (outcome,) = outcomes
    stats = outcome.stats
    assert [c["partition_id"] for c in stats.clients] == [0] and list(outcome.accepted) == [0]
    assert [r["partition_id"] for r in stats.rejected] == [1, 2]
    assert "17 bytes" in stats.rejected[0]["reason"]
    assert "num-examples" in stats.rejected[1]["reason"]
    assert stats.uplink_bytes == 2 * len(good_bytes) + 17  # every update that crossed the radio
    assert metrics["train_loss"] == 0.5
    merged = unpack_dense(record_bytes(new), task.downlink_spec)
    for name in good:
        np.testing.assert_allclose(merged[name], good[name])
    # Frozen tensors (quantization scales) pass through unchanged.
    frozen = next(k for k in state if k.endswith("w_scales"))
    np.testing.assert_array_equal(merged[frozen], state[frozen])


def test_sparse_exchange_end_to_end(tmp_path, cli):
    """Sparse uplink with error feedback and delta downlink through Flower: client state survives rounds."""
    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=2",
        "--set",
        "run.rounds=3",
        "--set",
        "model.pretrain_epochs=3",
        "--set",
        "compression.uplink=sparse",
        "--set",
        "compression.density=0.02",
        "--set",
        "compression.downlink=delta",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = read_metrics(tmp_path)
    assert summary["rejected_updates_total"] == 0
    assert [c["downlink_kind"] for c in recs[1]["clients"]] == ["full", "full"]
    assert all(c["downlink_kind"] == "delta" for r in recs[2:] for c in r["clients"])
    assert recs[2]["downlink_bytes"] < recs[1]["downlink_bytes"] / 3
    assert summary["uplink_ratio_vs_dense_fp32"] > 30


def test_strategy_rejects_sparse_updates_outside_the_scheme(flower_task_identity):
    from flwr.app import Message, MetricRecord, RecordDict

    from clients.wire import bytes_record
    from fedtiny.compress.codec import SparseTensor, SparseUpdate, encode
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.federated.task import cloud_model
    from fedtiny.server_setup import resolve_scheme
    from server.strategy import FedTinyStrategy

    scenario = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        parse_overrides(["run.clients=2", "model.pretrain_epochs=1", "compression.uplink=sparse"]),
    )
    task = make_task(scenario)
    state, _ = cloud_model(task)
    task = resolve_scheme(task, state)
    outcomes = []
    strategy = FedTinyStrategy(
        task, {0: 100, 1: 101}, GlobalModel(state, [n for n, *_ in task.uplink_spec]), on_round=[outcomes.append]
    )
    sent = list(strategy.configure_train(1, None, None, None))
    tid, (name, shape, _) = next(
        (i, s) for i, s in enumerate(task.uplink_spec) if len(task.slices[s[0]]) < np.prod(s[1])
    )
    frozen = np.setdiff1d(np.arange(int(np.prod(shape))), task.slices[name])[:1]
    ok = SparseUpdate([SparseTensor(tid, shape, task.slices[name][:1], np.array([1.0]), "int8", 1.0)])
    bad = SparseUpdate([SparseTensor(tid, shape, frozen, np.array([1.0]), "int8", 1.0)])
    payloads = {100: encode(ok), 101: encode(bad)}
    replies = [
        Message(
            RecordDict(
                {"update": bytes_record(payloads[m.metadata.dst_node_id]), "metrics": MetricRecord({"num-examples": 5})}
            ),
            reply_to=m,
        )
        for m in sent
    ]
    strategy.aggregate_train(1, replies)
    assert [c["partition_id"] for c in outcomes[0].stats.clients] == [0]
    (rej,) = outcomes[0].stats.rejected
    assert rej["partition_id"] == 1 and "outside the scheme" in rej["reason"]
