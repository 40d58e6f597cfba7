"""One client's round, free of Flower: decode the global model, train locally, encode the update.

The Flower ClientApp, the device emulator and the benchmarks' bare loop all call
:func:`local_round`, so the work they time and test is the same.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedtiny.budget.schemes import ResolvedScheme
from fedtiny.compress.dense import Spec, dense_nbytes
from fedtiny.compress.downlink import FULL, apply_downlink
from fedtiny.devices import DeviceProfile, Radio, compute_cycles, compute_seconds, round_cost
from fedtiny.federated import messages as msg
from fedtiny.federated.client_state import load_client_state, save_client_state
from fedtiny.federated.faults import draw_fault, inject_fault, poison, remember_update
from fedtiny.federated.sampling import malicious_clients
from fedtiny.federated.task import Task, client_profile, client_radio, limit_threads, make_task, with_scheme
from fedtiny.federated.train import evaluate, seeded, train_local
from fedtiny.int8.prefix import PrefixStore, without_prefixes
from fedtiny.models import load_arrays, wire_arrays
from fedtiny.privacy.dp import DP_STREAM, add_noise, clip_change
from fedtiny.privacy.policy import clip_weight_change, saturation_refusal, scheme_refusal
from fedtiny.scenario import Scenario, scenario_from_json

__all__ = [
    "LocalResult",
    "local_round",
    "privatize",
    "client_round",
    "client_task",
    "ClientJob",
    "run_jobs",
    "steps_in_time",
    "read_later",
]

GLOBAL_PREFIX = "global/"  # a client state's copy of the model it received


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
    device_ram_bytes: int = 0
    sram_bytes: int = 0
    refusal: str = ""
    trained_round: int = 0
    macs: int = 0
    compute_s: float = 0.0
    radio_s: float = 0.0
    energy_mj: float = 0.0
    radio: str = ""
    fault: str = ""

    def metrics(self) -> dict[str, float | int]:
        """Scalar metrics for the reply message."""
        return {
            msg.NUM_EXAMPLES: self.num_examples,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "steps": self.steps,
            "peak_sram_bytes": self.peak_sram_bytes,
            "device_ram_bytes": self.device_ram_bytes,
            "sram_bytes": self.sram_bytes,
            msg.REFUSED: int(bool(self.refusal)),
            msg.TRAINED_ROUND: self.trained_round,
            "macs": self.macs,
            "compute_s": self.compute_s,
            "radio_s": self.radio_s,
            "energy_mj": self.energy_mj,
        }

    def info(self) -> dict[str, str]:
        """Text facts for the reply message (``fault``: the simulation's record of an injected fault)."""
        return {"device": self.device, "refusal": self.refusal, "radio": self.radio, "fault": self.fault}


@functools.lru_cache(maxsize=1)
def _full_model(payload: bytes, spec: tuple[tuple[str, tuple[int, ...], str], ...]) -> dict[str, np.ndarray]:
    return apply_downlink(FULL, payload, list(spec), None)


def _received(kind: str, downlink: bytes, spec: Spec, base: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The model a client holds after its downlink (:func:`~fedtiny.compress.downlink.apply_downlink`).

    A full model is decoded once per distinct payload: every client of a cohort receives the same
    bytes, and decoding them per client took 0.5-1 ms of a float client's round (bench peers). Each
    client gets its own copies of the arrays, as a decode of its own would give it.
    """
    if kind != FULL or not isinstance(downlink, bytes):
        return apply_downlink(kind, downlink, spec, base)
    return {n: a.copy() for n, a in _full_model(downlink, tuple(spec)).items()}


@functools.lru_cache(maxsize=2)
def _task(scenario_json: str) -> Task:
    limit_threads()
    return make_task(scenario_from_json(scenario_json))


def client_task(scenario: Scenario, scheme: ResolvedScheme | None = None) -> Task:
    """The client's task for ``scenario`` under the server's resolved ``scheme`` (the model is built once per process)."""
    return with_scheme(_task(scenario.to_json()), scheme)


def local_round(
    scenario: Scenario,
    partition_id: int,
    server_round: int,
    downlink: bytes,
    *,
    kind: str = FULL,
    scheme: ResolvedScheme | None = None,
    state: dict[str, np.ndarray] | None = None,
    profile: DeviceProfile | None = None,
    data=None,
    tamper: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> tuple[LocalResult, dict[str, np.ndarray]]:
    """Run client ``partition_id``'s round ``server_round``; return its reply and its new persistent state.

    The client applies the downlink (the full model, or the change since the model
    it holds in ``state``), checks that one training step of its scheme fits its
    device (if not, and ``device.enforce``, it does not train and says why), trains,
    and encodes its update: the trained tensors (dense uplink) or their change,
    sparsified with error feedback (sparse uplink; the residual lives in ``state``).
    ``data`` (an :class:`~fedtiny.data.sources.ImageSet`) replaces the partition's training
    images: an attack harness runs its target images through this same path. ``tamper(trained,
    received)`` changes the trained tensors before they are encoded: the fleet simulation's poisoned
    clients (:func:`client_round`); a device's round (the bridge's emulator, the firmware's) is honest.

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
    base = {n: state[GLOBAL_PREFIX + n] for n in names} if all(GLOBAL_PREFIX + n in state for n in names) else None
    received = _received(kind, downlink, task.downlink_spec, base)
    state.update({GLOBAL_PREFIX + n: a for n, a in received.items()})
    train, test = task.federation.client_data(partition_id)
    if data is not None:  # an attack harness's target images stand in for the partition's training data
        train = data
    profile = profile or client_profile(scenario, partition_id)
    radio = client_radio(scenario, profile)
    report = task.memory(profile)
    whole = task.device_memory(profile, len(train))
    facts = {
        "device": profile.name,
        "sram_bytes": profile.sram_bytes,
        "radio": radio.name,
        "peak_sram_bytes": report.peak_sram_bytes if report else 0,
        "device_ram_bytes": whole.device_ram_bytes if whole else 0,
        "trained_round": server_round,
    }
    # device.fit: the whole client across a round (default), or one step (the publication's count)
    verdict = whole if scenario.device.fit == "device" else report
    if verdict is not None and not verdict.fits and scenario.device.enforce:
        return LocalResult(b"", len(train), refusal=verdict.reason(), **facts), state
    d = scenario.device
    refusal = scheme_refusal(task.model, d.policy_frozen_first) if task.scheme is not None else ""
    # The model's tensors, looked up once for the round (a state dict costs 0.1-0.2 ms): training
    # changes them in place, so after it they hold what the client trained.
    tensors = task.model.state_dict()
    load_arrays(task.model, received, tensors)
    if not refusal and task.scheme is not None:
        refusal = saturation_refusal(task.model, torch.from_numpy(train.x), d.policy_max_saturation)
    if refusal:
        return LocalResult(b"", len(train), refusal=refusal, **facts), state
    t, fleet = scenario.train, scenario.fleet
    fwd, bwd = task.sample_macs(profile)
    work = task.sample_work(profile)
    max_steps = None
    if fleet.partial_work and fleet.deadline_s > 0:
        max_steps = steps_in_time(
            fleet.deadline_s, profile, radio, work, t.batch_size, len(downlink), dense_nbytes(task.uplink_spec)
        )
    # The frozen prefix's int8 outputs for this client's samples, kept in its state between rounds
    # (the simulator's saving: the same numbers, and the device's time still counts every op)
    prefixes = PrefixStore.from_state(state)
    fit = train_local(
        task.model,
        train,
        epochs=t.local_epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        optimizer=t.optimizer,
        momentum=t.momentum,
        rounding=t.weight_rounding,
        gen=seeded(scenario.run.seed, server_round, partition_id),
        max_steps=max_steps or None,
        gradients=t.gradients,
        engine=t.engine,
        shuffle=t.shuffle,
        prefixes=prefixes,
    )
    _, test_acc = evaluate(task.model, test, prefixes=prefixes)
    state = {**without_prefixes(state), **prefixes.to_state()}
    trained = clip_weight_change(wire_arrays(tensors, task.uplink_spec), received, d.policy_max_change_lsb)
    if scenario.privacy.dp == "local":
        trained = privatize(
            task, trained, received, np.random.default_rng((scenario.run.seed, server_round, partition_id, DP_STREAM))
        )
    if tamper is not None:
        trained = tamper(trained, received)
    update, carried = task.uplink.encode(trained, received, server_round, state)
    state.update(carried)
    cost = round_cost(profile, radio, compute_cycles(profile, work, fit.samples, fit.steps), len(downlink), len(update))
    # A client cut short by the deadline weighs by the samples it trained on.
    examples = fit.num_examples if max_steps is None else min(fit.num_examples, fit.samples)
    return LocalResult(
        update,
        examples,
        fit.loss,
        fit.accuracy,
        test_acc,
        fit.steps,
        macs=(fwd + bwd) * fit.samples,
        compute_s=cost.compute_s,
        radio_s=cost.radio_s,
        energy_mj=cost.energy_mj,
        **facts,
    ), state


def privatize(
    task: Task, trained: dict[str, np.ndarray], received: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Local DP: the trained tensors whose change since ``received`` is clipped and noised (``[privacy]``).

    Only the scheme's slices change, so only they get noise; everything the encoder does
    afterwards (top-k, error feedback, quantization) works on the noised tensors.
    """
    p, slices = task.scenario.privacy, task.slices
    change = {n: (trained[n].astype(np.float64) - received[n].astype(np.float64)).ravel()[slices[n]] for n in slices}
    units = {n: task.units[n][slices[n]] for n in slices}
    clipped, _ = clip_change(change, units, p.clip_norm)
    noised = add_noise(clipped, units, p.noise_multiplier * p.clip_norm, rng)
    out = {}
    for name, shape, _ in task.uplink_spec:
        full = received[name].astype(np.float64).ravel()
        full[slices[name]] += noised[name]
        out[name] = full.reshape(shape)  # the uplink puts it in the wire's dtype
    return out


def steps_in_time(
    deadline_s: float,
    profile: DeviceProfile,
    radio: Radio,
    work,
    batch_size: int,
    downlink_bytes: int,
    uplink_bound: int,
) -> int:
    """Training steps a client can take and still send before the deadline (0: not even one).

    Radio time is reserved for the downlink it received and for ``uplink_bound`` bytes up
    (the dense size of its trained tensors, which bounds the sparse formats below density 1).
    """
    radio_s = round_cost(profile, radio, 0, downlink_bytes, uplink_bound).radio_s
    per_step = compute_seconds(profile, compute_cycles(profile, work, batch_size, 1))
    return max(0, math.floor((deadline_s - radio_s) / per_step)) if per_step > 0 else 0


def client_round(
    scenario: Scenario, job: "ClientJob", server_round: int, state: dict[str, np.ndarray]
) -> tuple[LocalResult, dict[str, np.ndarray]]:
    """A client's round as the fleet simulation runs it: :func:`local_round` (poisoned, for the fleet's malicious
    clients), then the fault it has this round, if any.

    Raises
    ------
    fedtiny.federated.faults.ClientCrash
        When the client crashes this round (it sends nothing and keeps no new state).
    """
    fleet = scenario.fleet
    tamper = None
    if job.partition_id in malicious_clients(scenario.run.seed, scenario.run.clients, fleet.malicious_fraction):

        def tamper(trained, received):  # a poisoned client of the simulated fleet
            return poison(trained, received, fleet.malicious_kind, fleet.malicious_scale)

    result, state = local_round(
        scenario,
        job.partition_id,
        server_round,
        job.downlink,
        kind=job.kind,
        scheme=job.scheme,
        state=state,
        tamper=tamper,
    )
    rates = dict(fleet.faults)
    if rates:
        honest = result
        fault = draw_fault(rates, scenario.run.seed, server_round, job.partition_id)
        result = inject_fault(fault, result, state, scenario.run.seed, server_round, job.partition_id)
        if rates.get("stale") and not honest.refusal:
            remember_update(state, honest, server_round)
    return result, state


@dataclass(frozen=True)
class ClientJob:
    """What the server sent one client for a round: the downlink, its kind and the client's scheme."""

    partition_id: int
    downlink: bytes
    kind: str = FULL
    scheme: ResolvedScheme | None = None


def read_later(scenario: Scenario, state: dict[str, np.ndarray]) -> bool:
    """Whether a later round of the client reads anything of its new ``state``.

    The model it received (``global/...``) is read only as the base of a change the server sends
    (``compression.downlink = "delta"``); a full downlink replaces it. A float client with a dense
    uplink and no faults keeps nothing else, so it needs no state file (writing one took about
    1 ms of its round, bench peers).
    """
    return scenario.compression.downlink != FULL or any(not k.startswith(GLOBAL_PREFIX) for k in state)


def run_jobs(
    scenario: Scenario, server_round: int, jobs: list[ClientJob], state_dir: str
) -> list[tuple[int, LocalResult | str]]:
    """Run a cohort of clients' rounds one after another, each with its own state on disk.

    A client that has no state yet and whose new state no later round reads (:func:`read_later`)
    writes none. Returns ``(partition_id, result)`` per job in the order given; a client whose round
    fails gets the error's text instead of a result, and the others go on (one virtual
    client's fault must not take its cohort down). The Flower ClientApp and the
    benchmarks' bare loop both call this, so what they time is the same work.
    """
    out: list[tuple[int, LocalResult | str]] = []
    for job in jobs:
        try:
            held = load_client_state(state_dir, job.partition_id, server_round)
            result, state = client_round(scenario, job, server_round, held)
            if held or read_later(scenario, state):
                save_client_state(state_dir, job.partition_id, server_round, state)
            out.append((job.partition_id, result))
        except Exception as exc:  # noqa: BLE001 - reported per client, as Flower reports a failed ClientApp call
            out.append((job.partition_id, f"{type(exc).__name__}: {exc}"))
    return out
