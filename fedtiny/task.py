"""What a scenario trains: its model, the tensors on the wire, and the cloud-pretrained start."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtiny.data import Federation, load_federation
from fedtiny.models import array_spec, build_model, model_arrays, trainable_names
from fedtiny.scenario import Scenario
from fedtiny.train import TrainResult, pretrain

__all__ = ["Task", "make_task", "pretrained_arrays"]

Spec = list[tuple[str, tuple[int, ...]]]


@dataclass
class Task:
    """A scenario's federation, a model instance and its wire specs.

    Attributes
    ----------
    downlink_spec
        Tensors the server sends (all floating-point state, incl. frozen BN statistics).
    uplink_spec
        Tensors a client sends back (the ones it trains).
    """

    scenario: Scenario
    federation: Federation
    model: nn.Module
    downlink_spec: Spec
    uplink_spec: Spec


def make_task(scenario: Scenario) -> Task:
    """Build the federation (cached per process) and a fresh model for ``scenario``."""
    fed = load_federation(scenario)
    c, h, _ = fed.image_shape
    m = scenario.model
    model = build_model(m.name, c, fed.num_classes, width=m.width, image_size=h, seed=scenario.run.seed)
    return Task(scenario, fed, model, array_spec(model), array_spec(model, trainable_names(model)))


def pretrained_arrays(task: Task) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Cloud-pretrain ``task.model`` on the server's public split; return its state and the fit."""
    m = task.scenario.model
    result = pretrain(task.model, task.federation.public, epochs=m.pretrain_epochs, lr=m.pretrain_lr,
                      batch_size=m.pretrain_batch_size, seed=task.scenario.run.seed)
    return model_arrays(task.model), result


def limit_threads() -> None:
    """One intra-op thread: the simulation runs one client per core, and it keeps results repeatable."""
    torch.set_num_threads(1)
