"""Client optimizers, registered by name: what each does and keeps, looked up instead of compared by name.

The scenario's ``train.optimizer`` choices, the memory model's optimizer state, the exact step, the C step
and the float models' torch optimizer all ask an :class:`OptimizerKind`. (No torch import here: the scenario
reads the names.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fedtiny.registry import Registry

__all__ = ["OptimizerKind", "register", "optimizer_kind", "optimizer_names"]


@dataclass(frozen=True)
class OptimizerKind:
    """One optimizer.

    Attributes
    ----------
    name
        ``train.optimizer``'s value.
    help
        One line for the scenario reference.
    qas
        Scales each int8 tensor's gradient by its quantization (QAS, Lin et al. 2022): int8 models only.
    moments
        fp32 values kept per trained element besides momentum: 2 for Adam's two moments, 0 for SGD.
    exact
        The exact step (and with it the C step and the firmware) runs it.
    torch
        ``torch(params, lr, momentum)``: its torch optimizer (the float update of an int8 model's tensors and of a
        float model), or None when it exists for int8 models only.
    """

    name: str
    help: str
    qas: bool = False
    moments: int = 0
    exact: bool = True
    torch: Callable[[Any, float, float], Any] | None = None

    def state_slots(self, momentum: float) -> int:
        """fp32 values kept per trained element: Adam's moments, SGD's momentum buffer, or none."""
        return self.moments or (1 if momentum > 0 else 0)


_KINDS: Registry[OptimizerKind] = Registry("optimizer")


def register(kind: OptimizerKind) -> OptimizerKind:
    return _KINDS.add(kind.name, kind)


def optimizer_kind(name: str) -> OptimizerKind:
    """The optimizer called ``name`` (the scenario checked it is one)."""
    return _KINDS.get(name)


def optimizer_names() -> tuple[str, ...]:
    return _KINDS.names()


def _sgd(params, lr: float, momentum: float):
    import torch  # the scenario reads this module's names without torch

    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _adam(params, lr: float, momentum: float):
    import torch  # the scenario reads this module's names without torch

    return torch.optim.Adam(params, lr=lr)


register(OptimizerKind("sgd", "SGD (with train.momentum)", torch=_sgd))
register(OptimizerKind("sgd+qas", "SGD with quantization-aware scaling (int8 only)", qas=True, torch=_sgd))
register(
    OptimizerKind(
        "adam",
        "Adam (two fp32 moments per trained element; not in the exact step)",
        moments=2,
        exact=False,
        torch=_adam,
    )
)
