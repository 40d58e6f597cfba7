"""pfl-research's simulation of the peers workload, with its FederatedAveraging: run by ``fedtiny bench peers``.

Usage: ``python pfl_worker.py SPEC_JSON`` with the Python of the pfl environment the bench creates
(``pfl`` and torch; no fedtiny). Prints progress on stderr and, last, one line ``PEER-RESULT {json}``
on stdout (rank 0).

What runs is pfl's documented PyTorch set-up: a :class:`pfl.model.pytorch.PyTorchModel` (local SGD
created per user, central SGD with learning rate 1 applying the averaged difference, i.e. FedAvg),
:class:`pfl.algorithm.FederatedAveraging`, a :class:`pfl.data.federated_dataset.FederatedDataset` of the
bench's partition (one user per client, sampled without replacement in a seeded order by
``MinimizeReuseUserSampler``), :class:`pfl.aggregate.simulate.SimulatedBackend` with
:class:`~pfl.aggregate.weighting.WeightByDatapoints` (FedAvg's weighting by examples). Two deviations
from pfl's defaults keep the work equal to the other simulators': the per-user evaluation pfl runs before
and after local training in evaluation rounds is switched off (no other runner does it), and the test-set
accuracy is computed by a callback after every round (in rank 0, one torch thread), which also timestamps
the rounds. Parallelism: ``workers`` processes, torch.distributed over gloo (pfl's native multi-process
simulation: ``PFL_WORKER_ADDRESSES``/``PFL_WORKER_RANK``), one torch thread each; rank 0 starts the other
ranks as its children, so the whole simulation is one process tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_ranks(argv: list[str], workers: int) -> list[subprocess.Popen]:
    """Rank 0 (this process) starts ranks 1..workers-1 of the same script with pfl's worker variables."""
    ports = _free_ports(workers)
    os.environ["PFL_WORKER_ADDRESSES"] = ",".join(f"127.0.0.1:{p}" for p in ports)
    os.environ["PFL_WORKER_RANK"] = "0"
    procs = []
    for rank in range(1, workers):
        env = {**os.environ, "PFL_WORKER_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL))
    return procs


def run(spec: dict, rank: int) -> dict:
    # deferred: the worker imports numpy once its environment is set
    import numpy as np
    import peer_model
    import pfl
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend

    # deferred: pfl exists only in the peer's own environment
    from pfl.aggregate.weighting import WeightByDatapoints

    # deferred: pfl exists only in the peer's own environment
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams

    # deferred: pfl exists only in the peer's own environment
    from pfl.callback.base import TrainingProcessCallback

    # deferred: pfl exists only in the peer's own environment
    from pfl.data.dataset import Dataset

    # deferred: pfl exists only in the peer's own environment
    from pfl.data.federated_dataset import FederatedDataset

    # deferred: pfl exists only in the peer's own environment
    from pfl.data.sampling import MinimizeReuseUserSampler

    # deferred: pfl exists only in the peer's own environment
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams

    # deferred: pfl exists only in the peer's own environment
    from pfl.metrics import Weighted

    # deferred: pfl exists only in the peer's own environment
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(1)
    np.random.seed(spec["seed"])  # the same on every rank: pfl's samplers must agree across workers
    torch.manual_seed(spec["seed"])
    data = dict(np.load(spec["data"], allow_pickle=False))
    slices = peer_model.client_slices(data)

    class Net(peer_model.TinyIR):
        """tiny-ir with the two methods pfl's PyTorchModel calls."""

        def loss(self, x, y, eval=False):  # noqa: A002 - pfl's signature
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):  # noqa: A002 - pfl's signature
            self.eval()
            out = self(x)
            n = len(y)
            return {
                "loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), n),
                "accuracy": Weighted(float((out.argmax(1) == y).sum()), n),
            }

    net = Net(spec["in_channels"], spec["num_classes"], spec["width"], spec["image_size"])
    peer_model.load_npz_state(net, spec["init"])
    model = PyTorchModel(
        model=net,
        local_optimizer_create=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=spec["momentum"]),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )

    # tensors, not arrays: pfl turns NumPy arrays into float32 tensors, labels included
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])

    seen: list[int] = []  # the users this rank trained since the last round

    def make_user(uid: int) -> Dataset:
        seen.append(uid)
        lo, hi = slices[uid]
        return Dataset((x_train[lo:hi], y_train[lo:hi]), user_id=str(uid))

    order = [int(u) for u in np.random.default_rng([spec["seed"], 257]).permutation(spec["clients"])]
    federated = FederatedDataset(make_user, MinimizeReuseUserSampler(order))
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=[WeightByDatapoints()])

    class FedAvgNoUserEval(FederatedAveraging):
        """pfl's FederatedAveraging without its per-user evaluation before and after local training."""

        def get_next_central_contexts(self, *args, **kwargs):
            contexts, mdl, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, mdl, metrics

    out: dict = {"accuracy": [], "round_end": [], "clients_trained": [], "cohorts": []}

    class Timing(TrainingProcessCallback):
        """The test-set accuracy of the global model and the time, before round 1 and after every round."""

        def _evaluate(self) -> float:
            return peer_model.evaluate(net, data["x_test"], data["y_test"])

        def on_train_begin(self, *, model):
            if rank == 0:
                out["accuracy"].append(self._evaluate())
                out["t_ready"] = time.time()
            return pfl.metrics.Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            out["cohorts"].append(sorted(seen))
            seen.clear()
            if rank == 0:
                out["accuracy"].append(self._evaluate())
                out["round_end"].append(time.time())
                users = [v for k, v in aggregate_metrics.to_simple_dict().items() if "number of devices" in k]
                out["clients_trained"].append(int(round(users[0])) if users else None)
                print(
                    f"[pfl] round {central_iteration + 1}/{spec['rounds']}: accuracy {out['accuracy'][-1]:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
            return False, pfl.metrics.Metrics()

    FedAvgNoUserEval().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=spec["rounds"],
            evaluation_frequency=spec["rounds"] + 1,
            train_cohort_size=spec["clients_per_round"],
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=spec["lr"],
            local_num_epochs=spec["local_epochs"],
            local_batch_size=spec["batch_size"],
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=512),
        callbacks=[Timing()],
        send_metrics_to_platform=False,
    )
    # deferred: only the runner that needs it loads it
    from importlib.metadata import version

    if rank > 0:  # rank 0 gathers every rank's users into the rounds' cohorts
        Path(spec["out"], f"pfl-rank{rank}-cohorts.json").write_text(json.dumps(out["cohorts"]))
    return {
        "simulator": "pfl",
        "version": f"pfl {version('pfl')}",
        "torch": torch.__version__,
        "parallelism": f"{spec['workers']} processes (torch.distributed, gloo), 1 torch thread each",
        "shuffled": False,  # pfl's Dataset.iter goes through a user's samples in order
        **out,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: pfl_worker.py SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    children = []
    if "PFL_WORKER_RANK" not in os.environ and spec["workers"] > 1:
        children = _start_ranks(argv, spec["workers"])
    rank = int(os.environ.get("PFL_WORKER_RANK", "0"))
    if rank == 0:
        print(f"[pfl] {spec['clients']} users, {spec['workers']} worker process(es)", file=sys.stderr, flush=True)
    try:
        result = run(spec, rank)
    except BaseException:
        for proc in children:  # a rank left alone would wait for its peers' collectives forever
            proc.kill()
        raise
    for proc in children:
        proc.wait(timeout=300)
    bad = [p.returncode for p in children if p.returncode]
    if bad:
        print(f"pfl_worker: a worker rank exited with status {bad[0]}", file=sys.stderr)
        return 1
    if rank == 0:
        for other in range(1, spec["workers"]):
            theirs = json.loads(Path(spec["out"], f"pfl-rank{other}-cohorts.json").read_text())
            result["cohorts"] = [sorted(a + b) for a, b in zip(result["cohorts"], theirs)]
        print("PEER-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
