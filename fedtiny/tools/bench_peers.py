"""``fedtiny bench peers``: one float FedAvg workload in fedtiny, in Flower's plain simulation and in pfl-research.

The workload (:class:`Workload`) is defined once: tiny-ir fp32 on scikit-learn's digits as fedtiny's
``digits`` source prepares them (8x8, one channel, pixels in [0, 1], no sensor shift), cloud-pretrained
on the server's public split, an iid partition of ``clients`` clients made by fedtiny (seeded),
``clients_per_round`` sampled per round, one local epoch of plain SGD at scenarios/quickstart.toml's batch
size, learning rate and momentum, FedAvg weighted by examples, the global model scored on the same
held-out test set after every round. The bench writes the partition and the test set to one ``.npz`` and
the initial weights (fedtiny's server's, from the seed) to another (plain arrays, read with
``allow_pickle=False``), so that every simulator trains the same clients from the same start.

Each simulator runs as its own process tree, one after the other, seeds interleaved:

* fedtiny: its normal run path (:func:`fedtiny.tools.sim.simulate`: the ServerApp and the ClientApp on
  Flower's simulation with the Ray backend) of the workload as a scenario: ``model.precision = "fp32"``,
  ``train.optimizer = "sgd"``, scheme ``full``, dense fp32 uplink, full downlink, ``run.num_cpus`` =
  workers, cohorts of virtual clients (one per worker and round);
* flower: ``fedtiny/tools/peers/flower_worker.py``: ``run_simulation`` with ``FedAvg`` and a ClientApp
  training the same torch model, one virtual SuperNode per client, ``workers`` Ray CPUs;
* pfl: ``fedtiny/tools/peers/pfl_worker.py`` in its own virtual environment (created on first use under
  ``.bench-envs/pfl``; pfl's pins are not fedtiny's): ``FederatedAveraging`` on a ``PyTorchModel``,
  ``workers`` processes over torch.distributed.

Equal parallelism: ``--workers`` CPU workers each (Ray CPUs, or pfl processes), one torch thread per
worker and in the server. Measured per run, by this process: the wall time from launch to the
evaluation of the initial model (start-up: imports, data, fedtiny's pretraining, pfl's process group;
Flower's and fedtiny's Ray starts in round 1), each round's time (clients, aggregation and the test-set
evaluation, stamped by the simulator's server at the end of each round), and the peak
memory of the whole process tree (the sum of its processes' proportional set sizes, PSS, which counts
shared pages once, and their resident sizes, RSS, sampled every 0.2 s). Client-rounds per second are
``clients_per_round`` x rounds over the rounds' time from round 2 on: round 1 also carries one-time
work (Ray starts, its workers import the client code and load the data), reported apart as
``first_round_s``. Each run's accuracies are checked against :func:`replay_fedavg` of the clients it
sampled: a gap of 0 (or one borderline test image) says the simulator computed FedAvg of the workload.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedtiny.errors import FedtinyError
from fedtiny.progress import left, say

__all__ = [
    "Workload",
    "RunResult",
    "PeerEnvError",
    "PeersError",
    "PEERS",
    "prepare",
    "run_peer",
    "summarize",
    "bench_peers",
    "ensure_pfl_env",
    "TreeMemory",
    "profile_fedtiny",
    "replay_fedavg",
    "workload_from_scenario",
]

PROJECT = Path(__file__).resolve().parents[2]
PEERS_DIR = Path(__file__).resolve().parent / "peers"
ENVS_DIR = PROJECT / ".bench-envs"
PEERS = ("fedtiny", "flower", "pfl")
PFL_VERSION = "0.6.0"
RESULT_TAG = "PEER-RESULT "


class PeersError(FedtinyError):
    """What a user can get wrong with ``bench peers`` (an option's value); the message says which."""


class PeerEnvError(PeersError):
    """A peer's environment could not be created (pip failed, no network to the package index)."""


@dataclass(frozen=True)
class Workload:
    """The float FedAvg workload every simulator runs.

    Attributes
    ----------
    clients, clients_per_round, rounds
        The fleet, the clients sampled per round, the rounds.
    local_epochs, batch_size, lr, momentum
        Each client's plain SGD (scenarios/quickstart.toml's: :func:`workload_from_scenario`). scale.toml's
        rate (0.02, momentum 0.9, batch 16), set for the int8 step, makes the float network with frozen
        BatchNorm fall to chance in five rounds in every simulator alike.
    width
        tiny-ir's width.
    public_fraction, pretrain_epochs, pretrain_lr
        The server's public split of the digits and its cloud pretraining on it, fedtiny's usual start (a
        network from scratch would not move in a few rounds of one step per client, and the rounds'
        accuracy would say nothing). The pretrained state is every simulator's initial model.
    test_fraction
        The digits the server holds out as the global test set (the rest is shared among the clients).
    seed
        Partition, initial weights, sampling and local shuffling.
    workers
        CPU workers of each simulator.
    """

    clients: int = 1000
    clients_per_round: int = 100
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 1
    lr: float = 0.005
    momentum: float = 0.0
    width: int = 16
    public_fraction: float = 0.1
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    test_fraction: float = 0.2
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.clients_per_round <= self.clients:
            raise PeersError(
                f"bench peers: --clients {self.clients_per_round} per round of --fleet {self.clients}; "
                "expected 1 <= clients per round <= fleet"
            )
        if self.rounds < 1 or self.workers < 1:
            raise PeersError(f"bench peers: --rounds ({self.rounds}) and --workers ({self.workers}) must be >= 1")

    def scenario_dict(self) -> dict[str, Any]:
        """The workload as a fedtiny scenario: what ``fedtiny run`` would be given in a TOML file."""
        return {
            "run": {
                "name": "bench-peers",
                "seed": self.seed,
                "rounds": self.rounds,
                "clients": self.clients,
                "clients_per_round": self.clients_per_round,
                "num_cpus": self.workers,
                # fedtiny's way with large fleets (scenarios/scale.toml): cohorts of virtual clients, one per worker
                "cohort_size": -(-self.clients_per_round // self.workers),
            },
            "data": {
                "source": "digits",
                "partition": "iid",
                # the rest of the digits go to the clients: 1,000 clients need at least one each
                "public_fraction": self.public_fraction,
                "test_fraction": self.test_fraction,
                "client_test_fraction": 0.0,
            },
            "model": {
                "name": "tiny-ir",
                "width": self.width,
                "precision": "fp32",
                "pretrain_epochs": self.pretrain_epochs,
                "pretrain_lr": self.pretrain_lr,
            },
            "train": {
                "optimizer": "sgd",
                "scheme": "full",
                "lr": self.lr,
                "momentum": self.momentum,
                "local_epochs": self.local_epochs,
                "batch_size": self.batch_size,
                "shuffle": "torch",
            },
            "compression": {"uplink": "dense", "error_feedback": False, "downlink": "full"},
        }


def workload_from_scenario(path: str | Path = PROJECT / "scenarios" / "quickstart.toml", **fields: Any) -> Workload:
    """A :class:`Workload` with the local SGD and cloud pretraining settings of scenario ``path``."""
    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.scenario import load_scenario

    s = load_scenario(path)
    t, m = s.train, s.model
    return Workload(
        **{
            "local_epochs": t.local_epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "momentum": t.momentum,
            "pretrain_epochs": m.pretrain_epochs,
            "pretrain_lr": m.pretrain_lr,
            **fields,
        }
    )


@dataclass
class RunResult:
    """One simulator's run of the workload at one seed, as measured here and reported by its server."""

    simulator: str
    seed: int
    version: str
    torch: str
    parallelism: str
    startup_s: float
    round_s: list[float]
    wall_s: float
    peak_pss_mb: float
    peak_rss_mb: float
    accuracy: list[float]
    clients_trained: list[int | None] = field(default_factory=list)
    cohorts: list[list[int]] = field(default_factory=list)
    shuffled: bool = True
    replay_accuracy: list[float] | None = None

    @property
    def first_round_s(self) -> float:
        return self.round_s[0]

    def client_rounds_per_s(self, clients_per_round: int) -> float:
        """Rounds 2.. (round 1 carries one-time work; with one round, round 1)."""
        steady = self.round_s[1:] or self.round_s
        return clients_per_round * len(steady) / sum(steady)

    @property
    def replay_gap(self) -> float | None:
        """The largest gap between the reported accuracies and those of the FedAvg replay (None: not replayed)."""
        if self.replay_accuracy is None:
            return None
        return max(abs(a - b) for a, b in zip(self.accuracy, self.replay_accuracy))

    def record(self, clients_per_round: int) -> dict[str, Any]:
        mine = asdict(self)
        del mine["cohorts"]  # the replay stands for them
        return {
            **mine,
            "replay_gap": self.replay_gap,
            "round_s": [round(s, 4) for s in self.round_s],
            "first_round_s": round(self.first_round_s, 4),
            "client_rounds_per_s": round(self.client_rounds_per_s(clients_per_round), 3),
            "client_rounds_per_s_all_rounds": round(clients_per_round * len(self.round_s) / sum(self.round_s), 3),
        }


# ---------------------------------------------------------------------------------------------------------------
# The shared inputs


def prepare(workload: Workload, folder: Path) -> tuple[Path, Path]:
    """Write the workload's data and initial weights for ``workload.seed``; return their paths.

    ``data.npz``: ``x_train``/``y_train`` (every client's training samples, client after client, as
    fedtiny's clients see them), ``offsets`` (client ``i`` holds rows ``offsets[i]:offsets[i+1]``),
    ``x_test``/``y_test`` (the server's test set). ``init.npz``: the initial model state by state-dict
    name, as fedtiny's server starts from it.
    """
    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.federated.task import cloud_model, limit_threads, make_task

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.scenario import scenario_from_dict

    folder.mkdir(parents=True, exist_ok=True)
    task = make_task(scenario_from_dict(workload.scenario_dict(), where="bench peers workload"))
    fed = task.federation
    # fedtiny's server pretrains on one thread: so here, for the very same floats (each runner checks
    # the start by the round-0 accuracy, which must be equal everywhere)
    limit_threads()
    initial, _ = cloud_model(task)
    parts = [fed.client_data(i)[0] for i in range(workload.clients)]
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    data, init = folder / f"data-seed{workload.seed}.npz", folder / f"init-seed{workload.seed}.npz"
    np.savez(
        data,
        x_train=np.concatenate([p.x for p in parts]).astype(np.float32),
        y_train=np.concatenate([p.y for p in parts]).astype(np.int64),
        offsets=offsets,
        x_test=fed.test.x.astype(np.float32),
        y_test=fed.test.y.astype(np.int64),
    )
    np.savez(init, **{k: np.asarray(v) for k, v in initial.items()})
    return data, init


def worker_spec(workload: Workload, data: Path, init: Path, out: Path) -> dict[str, Any]:
    """The JSON every runner reads: the workload, the shared files, the network's shape."""
    with np.load(data, allow_pickle=False) as z:
        c, h = int(z["x_test"].shape[1]), int(z["x_test"].shape[2])
        classes = int(max(z["y_train"].max(), z["y_test"].max())) + 1
    return {
        **asdict(workload),
        "data": str(data),
        "init": str(init),
        "out": str(out),
        "in_channels": c,
        "image_size": h,
        "num_classes": classes,
        "scenario": workload.scenario_dict(),
    }


def replay_fedavg(spec: dict[str, Any], cohorts: list[list[int]], *, shuffled: bool = True) -> list[float]:
    """Test-set accuracy after each round of plain FedAvg of ``cohorts`` (one list of clients per round).

    The same client step as the peers' runners (:mod:`fedtiny/tools/peers/peer_model.py`), weighted by
    examples, in float64, in this process: a run whose reported accuracies these reproduce computed
    FedAvg of the workload over the clients it sampled. ``shuffled``: each client's samples in the order
    fedtiny draws (seeded by seed, round and client), or in order (pfl); with one step per client, as in
    the workload at its size, the order does not matter.
    """
    # deferred: torch only in the runners that train (the bench's parent process never does)
    import torch

    if str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))
    # deferred: a file beside the worker, importable once its folder is on the path
    import peer_model

    with np.load(spec["data"], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    slices = peer_model.client_slices(data)
    model = peer_model.build(spec)
    names = peer_model.parameter_names(model)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = [peer_model.evaluate(model, data["x_test"], data["y_test"])]
    for server_round, cohort in enumerate(cohorts, start=1):
        total = {k: torch.zeros_like(current[k], dtype=torch.float64) for k in names}
        examples = 0
        for pid in cohort:
            model.load_state_dict(current)
            n = peer_model.client_round(model, data, slices, pid, spec, server_round, shuffled)
            trained = model.state_dict()
            for k in names:
                total[k] += (trained[k].double() - current[k].double()) * n
            examples += n
        current = {**current, **{k: (current[k].double() + total[k] / examples).float() for k in names}}
        model.load_state_dict(current)
        accuracy.append(peer_model.evaluate(model, data["x_test"], data["y_test"]))
    return accuracy


# ---------------------------------------------------------------------------------------------------------------
# Environments


def _base_torch() -> str:
    # deferred: torch only in the runners that train (the bench's parent process never does)
    import torch

    return torch.__version__.split("+")[0]


def pfl_requirements() -> list[str]:
    """What pfl's environment installs: pfl, and the torch fedtiny runs (the same kernels for the same model)."""
    return [f"pfl=={PFL_VERSION}", f"torch=={_base_torch()}", "scikit-learn", "numpy"]


def _pip_progress(line: str) -> str | None:
    """The lines of pip's output worth a progress line."""
    line = line.strip()
    return line if line.startswith(("Collecting ", "Installing collected", "Successfully installed", "ERROR")) else None


def ensure_pfl_env(envs: Path = ENVS_DIR, *, install: bool = True) -> Path:
    """The Python of pfl's virtual environment, created (``python -m venv``, ``pip install``) on first use.

    The folder holds a ``.gitignore`` of its own, so the environments never reach git. An environment
    whose recorded requirements differ from :func:`pfl_requirements` is created anew.

    Raises
    ------
    PeerEnvError
        When it does not exist and ``install`` is false, or when venv or pip fails.
    """
    env = envs / "pfl"
    python = env / "bin" / "python"
    marker = env / "fedtiny-requirements.txt"
    wanted = "\n".join(pfl_requirements()) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if not install:
        raise PeerEnvError(f"bench peers: pfl's environment {env} is not there (fedtiny bench peers creates it)")
    envs.mkdir(parents=True, exist_ok=True)
    (envs / ".gitignore").write_text("# virtual environments of fedtiny bench peers\n*\n")
    say(f"bench peers: creating pfl's environment in {env} ({', '.join(pfl_requirements())}); once, a few minutes")
    made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], capture_output=True, text=True)
    if made.returncode != 0:
        raise PeerEnvError(f"bench peers: python -m venv {env} failed: {made.stderr.strip()[-800:]}")
    cmd = [str(python), "-m", "pip", "install", "--progress-bar", "off", *pfl_requirements()]
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
        for line in pip.stdout:
            tail = (tail + [line.rstrip()])[-15:]
            shown = _pip_progress(line)
            if shown:
                say(f"bench peers: pip: {shown if shown.startswith('ERROR') else shown[:160]}")
    if pip.returncode != 0:
        raise PeerEnvError(
            f"bench peers: pip install {' '.join(pfl_requirements())} into {env} failed (exit {pip.returncode}); "
            "is the package index reachable? Without pfl: --peers fedtiny,flower. pip's last lines:\n" + "\n".join(tail)
        )
    marker.write_text(wanted)
    return python


# ---------------------------------------------------------------------------------------------------------------
# Measuring a process tree


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name in parentheses may hold spaces
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _memory_kb(pid: int) -> tuple[int, int]:
    """``(pss, rss)`` of one process in kB (0, 0 once it is gone)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled in a thread (Linux /proc).

    PSS (proportional set size) splits each shared page among the processes that map it, so the tree's
    sum counts torch's libraries and Ray's shared object store once; RSS sums count them in every process.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_pss_kb = self.peak_rss_kb = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        kids = _children()
        tree, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += kids.get(p, [])
        sizes = [_memory_kb(p) for p in tree]
        self.peak_pss_kb = max(self.peak_pss_kb, sum(s[0] for s in sizes))
        self.peak_rss_kb = max(self.peak_rss_kb, sum(s[1] for s in sizes))
        self.peak_processes = max(self.peak_processes, sum(1 for s in sizes if s[1]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# ---------------------------------------------------------------------------------------------------------------
# Running one simulator


def peer_command(name: str, spec: dict[str, Any], *, pfl_python: Path | None = None) -> list[str]:
    """The command that runs simulator ``name`` on ``spec`` (its own Python, a worker script or module)."""
    text = json.dumps(spec)
    if name == "fedtiny":
        return [sys.executable, "-m", "fedtiny.tools.bench_peers", "fedtiny-worker", text]
    if name == "flower":
        return [sys.executable, str(PEERS_DIR / "flower_worker.py"), text]
    if name == "pfl":
        if pfl_python is None:
            raise PeerEnvError("bench peers: pfl needs its environment's python (ensure_pfl_env)")
        return [str(pfl_python), str(PEERS_DIR / "pfl_worker.py"), text]
    raise ValueError(f"bench peers: unknown simulator {name!r}; expected one of {', '.join(PEERS)}")


def _relay(stream, log: list[str], label: str) -> None:
    """Keep a child's stderr; pass its progress lines on (the runners tag theirs; fedtiny's say [fedtiny])."""
    for line in stream:
        line = line.rstrip("\n")
        log.append(line)
        if line.startswith(("[fedtiny]", "[flower]", "[pfl]")):
            say(f"bench peers: {label}: {line.split('] ', 1)[-1]}")


def run_peer(name: str, spec: dict[str, Any], *, pfl_python: Path | None = None, env: dict | None = None) -> RunResult:
    """Run simulator ``name`` on the workload ``spec`` in a child process tree; measure and return it.

    Raises
    ------
    RuntimeError
        When the child fails or reports no result (the message holds the end of its log).
    """
    cmd = peer_command(name, spec, pfl_python=pfl_python)
    child_env = {
        **os.environ,
        **(env or {}),
        # one thread per worker everywhere (torch reads these when it starts, in every process of the tree)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PEERS_DIR), str(PROJECT), os.environ.get("PYTHONPATH")) if p),
    }
    log: list[str] = []
    t_launch = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env, cwd=PROJECT)
    relay = threading.Thread(target=_relay, args=(proc.stderr, log, f"{name} seed {spec['seed']}"), daemon=True)
    relay.start()
    with TreeMemory(proc.pid) as mem:
        # stdout here, stderr in the relay thread only (communicate() would read and close it under the thread)
        out = proc.stdout.read()
        proc.wait()
    t_exit = time.time()
    relay.join(timeout=5)
    proc.stdout.close()
    proc.stderr.close()
    tagged = [line[len(RESULT_TAG) :] for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not tagged:
        tail = "\n".join(log[-25:])
        raise RuntimeError(f"bench peers: {name} (seed {spec['seed']}) failed (exit {proc.returncode}):\n{tail}")
    rep = json.loads(tagged[-1])
    ends = [rep["t_ready"], *rep["round_end"]]
    if len(ends) != spec["rounds"] + 1 or len(rep["accuracy"]) != spec["rounds"] + 1:
        raise RuntimeError(f"bench peers: {name} reported {len(ends) - 1} of {spec['rounds']} rounds")
    return RunResult(
        simulator=name,
        seed=spec["seed"],
        version=rep["version"],
        torch=rep["torch"],
        parallelism=rep["parallelism"],
        startup_s=rep["t_ready"] - t_launch,
        round_s=[b - a for a, b in zip(ends, ends[1:])],
        wall_s=t_exit - t_launch,
        peak_pss_mb=mem.peak_pss_kb / 1024,
        peak_rss_mb=mem.peak_rss_kb / 1024,
        accuracy=[float(a) for a in rep["accuracy"]],
        clients_trained=list(rep.get("clients_trained") or []),
        cohorts=[sorted(int(p) for p in c) for c in rep.get("cohorts") or []],
        shuffled=bool(rep.get("shuffled", True)),
    )


def fedtiny_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """fedtiny's runner, in a child process: ``fedtiny run`` of the workload's scenario; the rounds' times.

    The run log's rounds (round 0: the initial model's evaluation) are timestamped as fedtiny's server
    writes them, after each round's aggregation and test-set evaluation.
    """
    # deferred: torch only in the runners that train (the bench's parent process never does)
    import torch

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.report import runlog

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.report.runlog import read_metrics

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.scenario import scenario_from_dict

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.tools.sim import profile_server, simulate

    stamps: dict[int, float] = {}
    add_round = runlog.RunLog.add_round

    def stamped(self, record: dict[str, Any]) -> None:
        add_round(self, record)
        stamps[record["round"]] = time.time()

    runlog.RunLog.add_round = stamped  # the run log is where the server says a round is done
    if spec.get("profile"):
        profile_server(spec["profile"])
    scenario = scenario_from_dict(spec["scenario"], where="bench peers workload")
    run_dir = Path(spec["out"]) / f"fedtiny-seed{spec['seed']}"
    simulate(scenario, run_dir)
    recs = {r["round"]: r for r in read_metrics(run_dir)}
    rounds = range(1, spec["rounds"] + 1)
    # deferred: Flower only for the runner that uses it
    import flwr

    return {
        "simulator": "fedtiny",
        "version": f"fedtiny on flwr {flwr.__version__}",
        "torch": torch.__version__,
        "parallelism": (
            f"{scenario.run.num_cpus} Ray workers (1 CPU per ClientApp), cohorts of {scenario.run.cohort_size} "
            "virtual clients, 1 torch thread each"
        ),
        "t_ready": stamps[0],
        "round_end": [stamps[r] for r in rounds],
        "accuracy": [recs[r]["global_accuracy"] for r in range(0, spec["rounds"] + 1)],
        "clients_trained": [len(recs[r].get("clients", [])) for r in rounds],
        "cohorts": [sorted(c["partition_id"] for c in recs[r].get("clients", [])) for r in rounds],
    }


# ---------------------------------------------------------------------------------------------------------------
# Where fedtiny's time goes


def _top(stats, total_s: float, top: int, per: int) -> list[dict[str, Any]]:
    """The ``top`` functions by cumulative time, with their share of ``total_s`` and time per client."""
    rows = []
    for (file, line, func), (_, calls, own, cum, _) in stats.stats.items():
        short = file.split("site-packages/")[-1].split(str(PROJECT) + "/")[-1]
        rows.append(
            {
                "function": f"{short}:{line}({func})",
                "calls": calls,
                "cumulative_s": round(cum, 4),
                "own_s": round(own, 4),
                "share": round(cum / total_s, 4) if total_s else 0.0,
                "ms_per_client": round(1000 * cum / per, 3),
            }
        )
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:top]


def profile_fedtiny(workload: Workload, folder: Path, *, top: int = 30) -> dict[str, Any]:
    """cProfile of fedtiny's clients and server on the workload: where a round's time goes.

    Clients: one cohort (``clients_per_round / workers`` virtual clients) of round 2, after a round 1 that
    warms the process up, through :func:`fedtiny.federated.client.run_jobs` in this process: the very
    function each Ray worker's ClientApp calls with its cohort (states on disk included), without Ray.
    Server: a real run of the workload (``fedtiny-worker``) with its ServerApp thread profiled (start-up,
    every round's sampling, decoding, aggregation, checkpoint and test-set evaluation, and the waits for
    the clients, which show as time in Flower's grid).
    """
    # deferred: the profiler only for --profile
    import cProfile
    import pstats

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.compress.dense import pack_dense

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.federated.client import ClientJob, run_jobs

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.federated.sampling import sample_clients

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.scenario import scenario_from_dict

    # deferred: the simulator loads only in the runner's child process (its start-up is what is timed)
    from fedtiny.server_setup import server_task

    limit = -(-workload.clients_per_round // workload.workers)
    scenario = scenario_from_dict(workload.scenario_dict(), where="bench peers workload")
    task, initial, _, _ = server_task(scenario, progress=None)
    scenario = task.scenario
    payload = pack_dense(initial, task.downlink_spec)
    states = str(folder / "profile-client-state")
    cohorts = {
        r: sample_clients(scenario.run.seed, r, scenario.run.clients, scenario.clients_per_round)[:limit]
        for r in (1, 2)
    }
    run_jobs(scenario, 1, [ClientJob(p, payload) for p in cohorts[1]], states)  # imports, data, model: round 1
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    out = prof.runcall(run_jobs, scenario, 2, [ClientJob(p, payload) for p in cohorts[2]], states)
    client_s = time.perf_counter() - t0
    failed = [r for _, r in out if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"bench peers: profiling fedtiny's clients: {failed[0]}")
    clients = _top(pstats.Stats(prof), client_s, top, len(cohorts[2]))
    say(f"bench peers: profile: a cohort of {len(cohorts[2])} fedtiny clients in {client_s:.2f} s in-process")

    data, init = prepare(workload, folder)
    spec = {**worker_spec(workload, data, init, folder), "profile": str(folder / "server.prof")}
    run = run_peer("fedtiny", spec)
    server = pstats.Stats(spec["profile"])
    server_s = server.total_tt
    return {
        "clients_profiled": len(cohorts[2]),
        "client_cohort_s": round(client_s, 4),
        "client_ms_per_client": round(1000 * client_s / len(cohorts[2]), 3),
        "client_top": clients,
        "server_run": run.record(workload.clients_per_round),
        "server_profiled_s": round(server_s, 3),
        "server_top": _top(server, server_s, top, workload.clients_per_round * workload.rounds),
    }


def profile_table(profile: dict[str, Any], rows: int = 18) -> str:
    """The profile's top functions, clients and server."""
    out = [
        f"fedtiny's clients: a cohort of {profile['clients_profiled']} in {profile['client_cohort_s']:.2f} s "
        f"({profile['client_ms_per_client']:.1f} ms per client, in-process, no Ray); cumulative time:"
    ]
    out += [
        f"  {r['ms_per_client']:8.2f} ms/client {100 * r['share']:5.1f}%  {r['function']}"
        for r in profile["client_top"][:rows]
    ]
    out.append(
        f"fedtiny's server thread over the whole run ({profile['server_profiled_s']:.1f} s profiled); cumulative time:"
    )
    out += [
        f"  {r['cumulative_s']:8.2f} s {100 * r['share']:5.1f}%  {r['function']}" for r in profile["server_top"][:rows]
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Summary


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[RunResult], workload: Workload) -> dict[str, Any]:
    """Each simulator's figures over its seeds, the fastest peer and fedtiny's ratio to it."""
    n = workload.clients_per_round
    sims: dict[str, Any] = {}
    for name in dict.fromkeys(r.simulator for r in runs):
        mine = [r for r in runs if r.simulator == name]
        rate, rate_sd = _mean_sd([r.client_rounds_per_s(n) for r in mine])
        acc = np.array([r.accuracy for r in mine])
        final, final_sd = _mean_sd([r.accuracy[-1] for r in mine])
        sims[name] = {
            "version": mine[0].version,
            "torch": mine[0].torch,
            "parallelism": mine[0].parallelism,
            "seeds": [r.seed for r in mine],
            "client_rounds_per_s": round(rate, 3),
            "client_rounds_per_s_sd": round(rate_sd, 3),
            "startup_s": round(statistics.fmean(r.startup_s for r in mine), 3),
            "first_round_s": round(statistics.fmean(r.first_round_s for r in mine), 3),
            "steady_round_s": round(n / rate, 4),
            "wall_s": round(statistics.fmean(r.wall_s for r in mine), 3),
            "peak_pss_mb": round(max(r.peak_pss_mb for r in mine), 1),
            "peak_rss_mb": round(max(r.peak_rss_mb for r in mine), 1),
            "accuracy": [round(float(a), 4) for a in acc.mean(axis=0)],
            "accuracy_sd": [round(float(a), 4) for a in (acc.std(axis=0, ddof=1) if len(mine) > 1 else 0 * acc[0])],
            "final_accuracy": round(final, 4),
            "final_accuracy_sd": round(final_sd, 4),
            # FedAvg of the run's own cohorts replayed with the shared client step: 0 = the same algorithm
            "replay_gap": max((r.replay_gap for r in mine if r.replay_gap is not None), default=None),
            "runs": [r.record(n) for r in mine],
        }
    peers = {k: v for k, v in sims.items() if k != "fedtiny"}
    fastest = max(peers, key=lambda k: peers[k]["client_rounds_per_s"]) if peers else None
    out: dict[str, Any] = {"workload": asdict(workload), "simulators": sims, "fastest_peer": fastest}
    # the same start everywhere: at each seed, every simulator's initial model scores the same on the test set
    starts = {}
    for r in runs:
        starts.setdefault(r.seed, set()).add(r.accuracy[0])
    out["same_initial_accuracy"] = all(len(v) == 1 for v in starts.values())
    if fastest and "fedtiny" in sims:
        f, p = sims["fedtiny"], peers[fastest]
        out["fedtiny_vs_fastest_peer"] = round(f["client_rounds_per_s"] / p["client_rounds_per_s"], 3)
        out["fedtiny_vs_fastest_peer_memory"] = round(f["peak_pss_mb"] / p["peak_pss_mb"], 3)
        # the same accuracy: final accuracies apart by no more than the larger spread over seeds
        out["final_accuracy_gap"] = {k: round(f["final_accuracy"] - v["final_accuracy"], 4) for k, v in peers.items()}
        out["accuracy_within_seed_spread"] = (
            {
                k: abs(f["final_accuracy"] - v["final_accuracy"]) <= max(f["final_accuracy_sd"], v["final_accuracy_sd"])
                for k, v in peers.items()
            }
            if len(f["seeds"]) > 1
            else None
        )
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
        mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 2**20, 1), "python": sys.version.split()[0]}


def table(summary: dict[str, Any]) -> str:
    """The side-by-side table printed by the bench."""
    w = summary["workload"]
    sims = summary["simulators"]
    head = (
        f"bench peers: tiny-ir fp32 on digits, {w['clients']:,} clients, {w['clients_per_round']} per round, "
        f"{w['rounds']} rounds, {w['local_epochs']} local epoch (batch {w['batch_size']}, lr {w['lr']:g}, "
        f"momentum {w['momentum']:g}), {w['workers']} workers, seeds {next(iter(sims.values()))['seeds']}"
    )
    rows = [
        head,
        f"  {'simulator':10} {'client-rounds/s':>17} {'round s':>8} {'start-up s':>10} {'round 1 s':>9} "
        f"{'peak PSS MB':>11} {'peak RSS MB':>11} {'final acc':>14}",
    ]
    for name, s in sims.items():
        rate = f"{s['client_rounds_per_s']:.1f} ± {s['client_rounds_per_s_sd']:.1f}"
        acc = f"{s['final_accuracy']:.4f} ± {s['final_accuracy_sd']:.4f}"
        rows.append(
            f"  {name:10} {rate:>17} {s['steady_round_s']:>8.3f} {s['startup_s']:>10.1f} {s['first_round_s']:>9.2f} "
            f"{s['peak_pss_mb']:>11.0f} {s['peak_rss_mb']:>11.0f} {acc:>14}"
        )
    rows.append("  accuracy after each round (mean over seeds; round 0: the initial model):")
    for name, s in sims.items():
        rows.append(f"  {name:10} " + " ".join(f"{a:.4f}" for a in s["accuracy"]))
    if summary.get("fedtiny_vs_fastest_peer") is not None:
        rows.append(
            f"  fedtiny / fastest peer ({summary['fastest_peer']}): {summary['fedtiny_vs_fastest_peer']:.3f}x the "
            f"client-rounds per second, {summary['fedtiny_vs_fastest_peer_memory']:.2f}x the peak memory (PSS)"
        )
    gaps = {k: v["replay_gap"] for k, v in sims.items() if v.get("replay_gap") is not None}
    if gaps:
        rows.append(
            "  FedAvg of each run's sampled clients replayed with one client step, largest accuracy gap: "
            + ", ".join(f"{k} {v:.4f}" for k, v in gaps.items())
        )
    if not summary.get("same_initial_accuracy", True):
        rows.append(
            "  WARNING: the simulators' initial models score differently: they did not start from the same state"
        )
    for name, why in summary.get("skipped", {}).items():
        rows.append(f"  {name}: not run: {why}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# The bench


def _peers_wanted(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PEERS]
    if unknown or not names:
        raise PeersError(f"--peers: unknown simulator(s) {unknown or text!r}; expected a list of {', '.join(PEERS)}")
    return names


def bench_peers(args: argparse.Namespace) -> dict[str, Any]:
    """fedtiny, Flower's plain simulation and pfl-research on one float FedAvg workload, at equal parallelism.

    ``--rounds`` rounds, ``--seeds`` seeds from 0, ``--workers`` CPU workers each, ``--clients`` clients
    per round of ``--fleet`` clients, ``--peers`` which simulators. Prints the side-by-side table and
    returns its figures (``fedtiny_vs_fastest_peer``: fedtiny's client-rounds per second over the
    fastest peer's).
    """
    names = _peers_wanted(getattr(args, "peers", ",".join(PEERS)))
    if args.seeds < 1:
        raise PeersError(f"bench peers: --seeds {args.seeds}: at least one seed")
    if getattr(args, "overrides", None):
        raise PeersError(
            "bench peers: --set does not apply: the workload is fixed but for --fleet, --clients, --rounds, "
            "--workers and --seeds"
        )
    base = workload_from_scenario(
        rounds=args.rounds,
        clients=args.fleet,
        clients_per_round=args.clients or 100,
        workers=args.workers,
    )
    skipped: dict[str, str] = {}
    pfl_python = None
    if "pfl" in names:
        try:
            pfl_python = ensure_pfl_env()
        except PeerEnvError as exc:
            if names != ["pfl"] and getattr(args, "skip_missing", False):
                skipped["pfl"] = str(exc)
                names.remove("pfl")
                say(f"bench peers: going on without pfl: {exc}")
            else:
                raise
    runs: list[RunResult] = []
    planned, t0 = len(names) * args.seeds, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtiny-bench-peers-") as tmp:
        for seed in range(args.seeds):
            workload = replace(base, seed=seed)
            say(f"bench peers: seed {seed}: writing the partition and the initial weights")
            data, init = prepare(workload, Path(tmp))
            spec = worker_spec(workload, data, init, Path(tmp))
            for name in names:  # seeds outermost: a busy spell of the machine spreads over every simulator
                say(f"bench peers: seed {seed}: {name} ...")
                run = run_peer(name, spec, pfl_python=pfl_python)
                if all(len(c) == workload.clients_per_round for c in run.cohorts):
                    run.replay_accuracy = replay_fedavg(spec, run.cohorts, shuffled=run.shuffled)
                runs.append(run)
                pace = left(len(runs), planned, time.perf_counter() - t0)
                say(
                    f"bench peers: seed {seed}: {name}: {run.client_rounds_per_s(workload.clients_per_round):.1f} "
                    f"client-rounds/s, start-up {run.startup_s:.1f} s, peak {run.peak_pss_mb:.0f} MB PSS, final "
                    f"accuracy {run.accuracy[-1]:.4f}" + (f" | {pace}" if pace else "")
                )
        summary = summarize(runs, base)
        if getattr(args, "profile", False) and "fedtiny" in names:
            say("bench peers: profiling fedtiny (seed 0) ...")
            summary["fedtiny_profile"] = profile_fedtiny(replace(base, seed=0), Path(tmp) / "profile")
    summary["machine"] = machine()
    if skipped:
        summary["skipped"] = skipped
    print("\n" + table(summary))
    if "fedtiny_profile" in summary:
        print("\n" + profile_table(summary["fedtiny_profile"]))
    return summary


def main(argv: list[str]) -> int:
    """``python -m fedtiny.tools.bench_peers fedtiny-worker SPEC_JSON``: fedtiny's runner (the bench starts it)."""
    if len(argv) != 3 or argv[1] != "fedtiny-worker":
        print("usage: python -m fedtiny.tools.bench_peers fedtiny-worker SPEC_JSON", file=sys.stderr)
        return 2
    result = fedtiny_worker(json.loads(argv[2]))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
