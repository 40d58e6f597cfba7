"""``fedtiny bench peers``: the shared workload, the peers' client step, and real runs of the runners."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtiny.compress.dense import pack_dense
from fedtiny.federated.client import local_round
from fedtiny.federated.task import cloud_model, make_task
from fedtiny.federated.train import seeded
from fedtiny.models import build_model, model_arrays
from fedtiny.scenario import scenario_from_dict
from fedtiny.tools import bench_peers as bp

sys.path.insert(0, str(bp.PEERS_DIR))
import peer_model  # noqa: E402 - the peers' standalone copy of tiny-ir (no fedtiny import)

# Batches of 32: a client of the test's fleet (about 100 samples) takes 3-4 steps, as one of the bench's
# 1,000 takes 1-2. With batch 1 (100 steps), SGD amplifies the last bit of FedAvg's float32 sums in the
# order each simulator adds them: a replay then differs by up to 15 test images (measured), not by FedAvg.
SMALL = bp.Workload(clients=12, clients_per_round=4, rounds=2, workers=1, seed=1, batch_size=32)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("peers")
    data, init = bp.prepare(SMALL, folder)
    return folder, data, init


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_peer_model_is_fedtiny_tiny_ir_with_frozen_batchnorm(tmp_path, channels, size):
    """The peers' network computes what fedtiny's fp32 clients train: tiny-ir with BatchNorm in eval mode,
    also when a framework puts it in train mode."""
    ours = build_model("tiny-ir", channels, 10, width=8, image_size=size, seed=5)
    for m in ours.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    np.savez(tmp_path / "init.npz", **model_arrays(ours))
    peer = peer_model.TinyIR(channels, 10, 8, size)
    peer_model.load_npz_state(peer, str(tmp_path / "init.npz"))
    x = torch.rand(5, channels, size, size)
    ours.eval()
    peer.train()
    with torch.no_grad():
        assert torch.allclose(peer(x), ours(x), atol=1e-6)


def test_load_npz_state_names_what_does_not_fit(tmp_path):
    np.savez(tmp_path / "bad.npz", **{"stem.0.weight": np.zeros((3, 1, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="not this model's state"):
        peer_model.load_npz_state(peer_model.TinyIR(), str(tmp_path / "bad.npz"))


def test_every_simulator_gets_fedtiny_clients_data_and_start(shared):
    """The data file holds exactly each client's samples as fedtiny's clients see them, the server's test set,
    and the initial state fedtiny's server starts from."""
    _, data, init = shared
    task = make_task(scenario_from_dict(SMALL.scenario_dict()))
    fed = task.federation
    with np.load(data, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    slices = peer_model.client_slices(d)
    assert len(slices) == SMALL.clients
    for pid, (lo, hi) in enumerate(slices):
        train, test = fed.client_data(pid)
        assert len(test) == 0  # client_test_fraction = 0: every sample trains
        np.testing.assert_array_equal(d["x_train"][lo:hi], train.x)
        np.testing.assert_array_equal(d["y_train"][lo:hi], train.y)
    np.testing.assert_array_equal(d["x_test"], fed.test.x)
    np.testing.assert_array_equal(d["y_test"], fed.test.y)
    initial, _ = cloud_model(task)
    with np.load(init, allow_pickle=False) as z:
        assert set(z.files) == set(initial)
        for k in z.files:
            np.testing.assert_array_equal(z[k], initial[k])
    # the workload is a float task with the dense uplink: every parameter trains and is sent
    assert not hasattr(task.model, "nodes")
    assert [n for n, *_ in task.uplink_spec] == [n for n, p in task.model.named_parameters() if p.requires_grad]


def test_peers_client_step_is_fedtiny_client_step(shared):
    """A client's round through fedtiny's local_round and through the peers' train_client give the same model."""
    _, data, _ = shared
    scenario = scenario_from_dict(SMALL.scenario_dict())
    task = make_task(scenario)
    initial, _ = cloud_model(task)
    pid, server_round = 3, 2
    result, _ = local_round(scenario, pid, server_round, pack_dense(initial, task.downlink_spec))
    decoded = task.uplink.decode(result.update, initial)

    spec = {"in_channels": 1, "num_classes": 10, "width": SMALL.width, "image_size": 8, "init": str(shared[2])}
    peer = peer_model.build(spec)
    d = dict(np.load(data, allow_pickle=False))
    lo, hi = peer_model.client_slices(d)[pid]
    steps = peer_model.train_client(
        peer,
        d["x_train"][lo:hi],
        d["y_train"][lo:hi],
        epochs=SMALL.local_epochs,
        batch_size=SMALL.batch_size,
        lr=SMALL.lr,
        momentum=SMALL.momentum,
        gen=seeded(SMALL.seed, server_round, pid),
    )
    assert steps == result.steps and hi - lo == result.num_examples
    state = peer.state_dict()
    for name in peer_model.parameter_names(peer):
        idx, change = decoded[name]
        ours = initial[name].astype(np.float64).ravel()
        ours[idx] += change
        np.testing.assert_allclose(state[name].numpy().ravel(), ours, atol=1e-6)


def test_tree_memory_counts_the_whole_process_tree():
    """A grandchild's memory counts: the simulators' work happens in Ray's or pfl's worker processes."""
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'b = bytearray(80_000_000); b[::4096] = b\"x\" * len(b[::4096]); import time; time.sleep(2)'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with bp.TreeMemory(proc.pid, interval=0.05) as mem:
        proc.wait()
    assert mem.peak_processes >= 2
    assert mem.peak_rss_kb > 80_000_000 / 1024
    assert 0 < mem.peak_pss_kb <= mem.peak_rss_kb


def _run(name: str, shared, **kw) -> bp.RunResult:
    folder, data, init = shared
    return bp.run_peer(name, bp.worker_spec(SMALL, data, init, folder), **kw)


def _check(run: bp.RunResult, name: str, shared) -> None:
    assert run.simulator == name and run.seed == SMALL.seed
    assert len(run.accuracy) == SMALL.rounds + 1 and all(0.0 <= a <= 1.0 for a in run.accuracy)
    assert len(run.round_s) == SMALL.rounds and all(s > 0 for s in run.round_s)
    assert run.clients_trained == [SMALL.clients_per_round] * SMALL.rounds
    assert run.startup_s > 0 and run.wall_s >= run.startup_s + sum(run.round_s)
    assert 0 < run.peak_pss_mb <= run.peak_rss_mb
    assert run.client_rounds_per_s(SMALL.clients_per_round) > 0
    # the run computed FedAvg: its sampled clients, replayed with the shared client step, give its accuracies
    assert [len(c) for c in run.cohorts] == [SMALL.clients_per_round] * SMALL.rounds
    folder, data, init = shared
    replay = bp.replay_fedavg(bp.worker_spec(SMALL, data, init, folder), run.cohorts, shuffled=run.shuffled)
    with np.load(data) as z:
        one_image = 1 / len(z["y_test"])
    assert replay == pytest.approx(run.accuracy, abs=1.01 * one_image)  # at most one borderline test image


def test_fedtiny_and_flower_runners_report_the_same_figures(shared):
    """Two rounds of 4 clients in fedtiny and in Flower's plain simulation: the same figures, measured the same
    way; both start from the same model on the same test set (the same round-0 accuracy)."""
    runs = [_run("fedtiny", shared), _run("flower", shared)]
    for run, name in zip(runs, ("fedtiny", "flower")):
        _check(run, name, shared)
    assert runs[0].accuracy[0] == runs[1].accuracy[0]
    summary = bp.summarize(runs, SMALL)
    assert summary["fastest_peer"] == "flower"
    rates = {k: v["client_rounds_per_s"] for k, v in summary["simulators"].items()}
    assert summary["fedtiny_vs_fastest_peer"] == pytest.approx(rates["fedtiny"] / rates["flower"], rel=2e-3)
    assert "fedtiny / fastest peer (flower)" in bp.table(summary)


def test_pfl_runner(shared):
    try:
        python = bp.ensure_pfl_env(install=False)
    except bp.PeerEnvError as exc:
        pytest.skip(f"{exc} (it needs the package index)")
    run = _run("pfl", shared, pfl_python=python)
    _check(run, "pfl", shared)


def test_summary_takes_the_fastest_peer_and_leaves_round_one_out():
    def run(name: str, seed: int, rounds: list[float], acc: float) -> bp.RunResult:
        return bp.RunResult(name, seed, "v", "t", "p", 1.0, rounds, 10.0, 100.0, 200.0, [0.1, acc])

    w = bp.Workload(clients=10, clients_per_round=5, rounds=3)
    runs = [
        run("fedtiny", 0, [9.0, 1.0, 1.0], 0.5),
        run("fedtiny", 1, [9.0, 1.0, 1.0], 0.6),
        run("flower", 0, [1.0, 2.0, 2.0], 0.5),
        run("pfl", 0, [1.0, 0.5, 0.5], 0.55),
    ]
    s = bp.summarize(runs, w)
    assert s["simulators"]["fedtiny"]["client_rounds_per_s"] == 5.0  # round 1's 9 s is start-up work
    assert s["fastest_peer"] == "pfl"
    assert s["fedtiny_vs_fastest_peer"] == 0.5
    assert s["simulators"]["fedtiny"]["accuracy"] == [0.1, 0.55]
