"""One client's round, free of Flower: decode the global model, train locally, encode the update.

The Flower ClientApp, the device emulator and the benchmarks' bare loop all call
:func:`local_round`, so the work they time and test is the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedtiny.budget.profiles import DeviceProfile
from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.compress.downlink import FULL, apply_downlink
from fedtiny.federated import messages as msg
from fedtiny.federated.client_state import load_client_state, save_client_state
from fedtiny.federated.task import Task, client_profile, limit_threads, make_task, with_scheme
from fedtiny.federated.train import evaluate, seeded, train_local
from fedtiny.models import load_arrays, model_arrays
from fedtiny.scenario import Scenario, scenario_from_json

__all__ = ["LocalResult", "local_round", "client_task", "ClientJob", "run_jobs"]


@dataclass(frozen=True)
class LocalResult:
    """A client's reply: the encoded update and its training metrics, or why it refused to train."""

    update: bytes
    num_examples: int
    train_loss: float = 0.0
    train_accuracy: float = 0.0
    test_accuracy: float = 0.0
    steps: int = 0
    device: str = ""
    peak_sram_bytes: int = 0
    sram_bytes: int = 0
    refusal: str = ""

    def metrics(self) -> dict[str, float | int]:
        """Scalar metrics for the reply message."""
        return {msg.NUM_EXAMPLES: self.num_examples, "train_loss": self.train_loss,
                "train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy, "steps": self.steps,
                "peak_sram_bytes": self.peak_sram_bytes, "sram_bytes": self.sram_bytes,
                msg.REFUSED: int(bool(self.refusal))}

    def info(self) -> dict[str, str]:
        """Text facts for the reply message."""
        return {"device": self.device, "refusal": self.refusal}


@functools.lru_cache(maxsize=2)
def _task(scenario_json: str) -> Task:
    limit_threads()
    return make_task(scenario_from_json(scenario_json))


def client_task(scenario: Scenario, scheme: ResolvedScheme | None = None) -> Task:
    """The client's task for ``scenario`` under the server's resolved ``scheme`` (the model is built once per process)."""
    return with_scheme(_task(scenario.to_json()), scheme)


def local_round(scenario: Scenario, partition_id: int, server_round: int, downlink: bytes, *, kind: str = FULL,
                scheme: ResolvedScheme | None = None, state: dict[str, np.ndarray] | None = None,
                profile: DeviceProfile | None = None) -> tuple[LocalResult, dict[str, np.ndarray]]:
    """Run client ``partition_id``'s round ``server_round``; return its reply and its new persistent state.

    The client applies the downlink (the full model, or the change since the model
    it holds in ``state``), checks that one training step of its scheme fits its
    device (if not, and ``device.enforce``, it does not train and says why), trains,
    and encodes its update: the trained tensors (dense uplink) or their change,
    sparsified with error feedback (sparse uplink; the residual lives in ``state``).

    Raises
    ------
    fedtiny.compress.dense.PayloadError, fedtiny.compress.codec.CodecError
        When the downlink does not match the model.
    IndexError
        When ``partition_id`` is not a partition of the scenario.
    """
    state = dict(state or {})
    task = client_task(scenario, scheme)
    names = [n for n, *_ in task.downlink_spec]
    base = {n: state[f"global/{n}"] for n in names} if all(f"global/{n}" in state for n in names) else None
    received = apply_downlink(kind, downlink, task.downlink_spec, base)
    state.update({f"global/{n}": a for n, a in received.items()})
    train, test = task.federation.client_data(partition_id)
    profile = profile or client_profile(scenario, partition_id)
    report = task.memory(profile)
    mem = {"device": profile.name, "sram_bytes": profile.sram_bytes,
           "peak_sram_bytes": report.peak_sram_bytes if report else 0}
    if report is not None and not report.fits and scenario.device.enforce:
        return LocalResult(b"", len(train), refusal=report.reason(), **mem), state
    load_arrays(task.model, received)
    t = scenario.train
    fit = train_local(task.model, train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                      optimizer=t.optimizer, momentum=t.momentum, rounding=t.weight_rounding,
                      gen=seeded(scenario.run.seed, server_round, partition_id))
    _, test_acc = evaluate(task.model, test)
    trained = model_arrays(task.model, [n for n, *_ in task.uplink_spec])
    update, carried = task.uplink.encode(trained, received, server_round, state)
    state.update(carried)
    return LocalResult(update, fit.num_examples, fit.loss, fit.accuracy, test_acc, fit.steps, **mem), state


@dataclass(frozen=True)
class ClientJob:
    """What the server sent one client for a round: the downlink, its kind and the client's scheme."""

    partition_id: int
    downlink: bytes
    kind: str = FULL
    scheme: ResolvedScheme | None = None


def run_jobs(scenario: Scenario, server_round: int, jobs: list[ClientJob],
             state_dir: str) -> list[tuple[int, LocalResult | str]]:
    """Run a cohort of clients' rounds one after another, each with its own state on disk.

    Returns ``(partition_id, result)`` per job in the order given; a client whose round
    fails gets the error's text instead of a result, and the others go on (one virtual
    client's fault must not take its cohort down). The Flower ClientApp and the
    benchmarks' bare loop both call this, so what they time is the same work.
    """
    out: list[tuple[int, LocalResult | str]] = []
    for job in jobs:
        try:
            state = load_client_state(state_dir, job.partition_id, server_round)
            result, state = local_round(scenario, job.partition_id, server_round, job.downlink, kind=job.kind,
                                        scheme=job.scheme, state=state)
            save_client_state(state_dir, job.partition_id, server_round, state)
            out.append((job.partition_id, result))
        except Exception as exc:  # noqa: BLE001 - reported per client, as Flower reports a failed ClientApp call
            out.append((job.partition_id, f"{type(exc).__name__}: {exc}"))
    return out
