"""``fedtiny device firmware``: a scenario's client as C source for the Cortex-M firmware (device/firmware).

The firmware trains one partition of one scenario. Everything it must agree on with the server is
computed here, from the same code the simulator runs, and written as C:

- the model as the server starts it (:func:`fedtiny.server_setup.server_task`: the model file, the
  scheme the server sends this partition's device profile, the learning rate), laid out as the C
  step's ``ft_op`` array by :class:`~fedtiny.int8.cstep.CStep` itself; frozen tensors ``const`` (flash),
  trained weights and biases and the momentum buffers in RAM;
- the memory planner's arena plans (:mod:`fedtiny.budget.arena`) for a step of one sample and of more;
- the downlink layout (where each dense tensor of a TRAIN frame goes, or the CRC-32 a frozen one must
  have) and the uplink (the dense trained tensors, in order);
- the partition's training samples, quantized to int8 as the simulated client quantizes them (a few
  hundred 8x8 images, or 16 of MCUNet's 3x128x128: compiled in, so the device needs no enrolment
  exchange and the samples are the simulator's by construction).

In three stages: :func:`check` (what the scenario asks that the firmware cannot do, before any slow
work), :func:`~fedtiny.tools.firmware_plan.plan` (every value the files say, as a
:class:`~fedtiny.tools.firmware_plan.FirmwarePlan`) and :func:`~fedtiny.tools.firmware_emit.emit` (the
plan as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtiny.bridge.protocol import model_hash
from fedtiny.compress.dense import pack_dense
from fedtiny.compress.uplink import uplink_codec
from fedtiny.compress.values import value_type, value_type_names
from fedtiny.errors import ScenarioError
from fedtiny.federated.client import client_task
from fedtiny.federated.task import client_profile, limit_threads
from fedtiny.federated.train import round_seed
from fedtiny.int8.optimizers import optimizer_kind, optimizer_names
from fedtiny.scenario import Scenario, load_scenario
from fedtiny.server_setup import server_task
from fedtiny.tools.firmware_emit import emit, summary
from fedtiny.tools.firmware_plan import FirmwarePlan, plan

__all__ = ["BridgedClient", "FirmwarePlan", "bridged_client", "check", "emit", "generate", "plan"]


@dataclass
class BridgedClient:
    """A scenario's client as the server sees it when a device trains it: the task, the scheme the server
    resolved for its profile, the client's task and the server's starting model as the full downlink."""

    task: Any
    scheme: Any
    client: Any
    downlink: bytes
    partition: int

    def train_meta(self, server_round: int) -> dict:
        """The TRAIN message's metadata for a round (the scenario, the scheme, the round's seed)."""
        return {
            "round": server_round,
            "scenario": self.task.scenario.to_json(),
            "scheme": self.scheme.to_json(),
            "downlink": "full",
            "seed": round_seed(self.task.scenario.run.seed, server_round, self.partition),
        }

    def model_hash(self) -> str:
        return model_hash(self.client.downlink_spec)


def bridged_client(scenario_path: str, partition_id: int, overrides: dict | None = None) -> BridgedClient:
    """:class:`BridgedClient` of ``partition_id`` (the server's start-up with its one intra-op thread, as
    server/server_app.py runs it)."""
    limit_threads()
    task, initial, _, schemes = server_task(load_scenario(scenario_path, overrides), progress=None)
    scheme = schemes.by_profile[client_profile(task.scenario, partition_id).name]
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    return BridgedClient(task, scheme, client, down, partition_id)


def generate(
    scenario_path: str, partition_id: int, out_dir: str | Path, progress=None, overrides: dict | None = None
) -> dict:
    """Write ``firmware_model.c``, ``firmware_model.h``, ``firmware_memory.ld`` and ``firmware.mk`` (and
    ``summary.json``, ``ops.json``) into ``out_dir``; return the summary. A client that does not fit its
    profile (the whole device, :mod:`fedtiny.budget.device_memory`) is refused, with the figure, before
    anything is built."""
    scenario = check(scenario_path, partition_id, overrides)
    firmware = plan(scenario, scenario_path, partition_id, overrides, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in emit(firmware).items():
        (out_dir / name).write_text(text)
    return summary(firmware)


def check(scenario_path: str, partition_id: int, overrides: dict | None = None) -> Scenario:
    """The scenario, if the firmware can train its partition ``partition_id``; else a ScenarioError naming
    every key (and the value it must have) the firmware does not run. Reads the scenario only: the checks
    that need the server's start-up (the whole device fits its profile) are the plan's."""
    scenario = load_scenario(scenario_path, overrides)
    problems = _problems(scenario, partition_id)
    if problems:
        raise ScenarioError(f"{scenario_path}: the firmware needs " + "; ".join(problems))
    return scenario


def _problems(scenario: Scenario, partition_id: int) -> list[str]:
    """What the firmware needs of the scenario that it does not have, one phrase each."""
    t, cmp = scenario.train, scenario.compression
    problems = []
    if scenario.model.precision != "int8" or t.gradients != "exact":
        problems.append('model.precision = "int8" and train.gradients = "exact"')
    if t.shuffle != "hash":
        problems.append('train.shuffle = "hash" (the order a device can compute)')
    if cmp.downlink != "full":
        problems.append('compression.downlink = "full" (the whole model each round)')
    if uplink_codec(cmp.uplink).quantizes and (
        not value_type(cmp.values).firmware or cmp.topk != "tensor" or cmp.momentum_correction or cmp.warmup_rounds
    ):
        sent = ", ".join(f'"{n}"' for n in value_type_names() if value_type(n).firmware)
        problems.append(
            f'a sparse uplink with values = {sent}, topk = "tensor", no momentum_correction and warmup_rounds = 0'
        )
    if scenario.device.micro_batch != 1:
        problems.append("device.micro_batch = 1 (the C step trains one sample at a time)")
    if not optimizer_kind(t.optimizer).exact or scenario.privacy.dp != "none" or t.batch_size > 64:
        exact = ", ".join(n for n in optimizer_names() if optimizer_kind(n).exact)
        problems.append(f'train.optimizer one of {exact}, privacy.dp = "none", train.batch_size <= 64')
    if not 0 <= partition_id < scenario.run.clients:
        problems.append(f"a partition in 0..{scenario.run.clients - 1} (got {partition_id})")
    return problems
