"""Gradient-matching attack methods, each an :class:`AttackMethod` in ``fedtiny.variants.ATTACK_METHODS``.

A method is its matching loss (how far the attacker's simulated update is from the observed one, per
target) and its search (the optimizer that lowers it from a random start), plus what it needs from the
threat model. :func:`fedtiny.attack.attacks.reconstruct` and the in-simulation attack look the method
up by name; a method that works on the simulation's observations as a whole (the malicious server's
imprint, :mod:`fedtiny.attack.fleet`) gives ``observed`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedtiny.attack.optim import batched_lbfgs, batched_signed_adam
from fedtiny.errors import ScenarioError
from fedtiny.variants import ATTACK_METHODS

__all__ = ["AttackMethod", "attack_method", "tv"]

Updates = dict[str, torch.Tensor]
Observation = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AttackMethod:
    """One way of rebuilding a client's images.

    Attributes
    ----------
    loss
        ``(simulated updates, observation, images, config, intervals) -> per-target loss [B]``.
    search
        ``(f_and_grad, x shape [R*B, b, C, H, W], generator, config, progress) -> (images, loss)``.
    needs_intervals
        The loss needs each sent integer's rounding interval (an int8 model and the client's steps).
    observed
        ``(task, [(observation, images)], results, grids)``: the method attacks a simulation's
        observations itself instead of matching updates (``loss``/``search`` unused).
    """

    name: str
    loss: Callable[[Updates, Observation, torch.Tensor, Any, Any], torch.Tensor] | None = None
    search: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    needs_intervals: bool = False
    observed: Callable[..., None] | None = None


def attack_method(name: str) -> AttackMethod:
    """The method called ``name``; :class:`ScenarioError` naming the known ones otherwise."""
    try:
        return ATTACK_METHODS.get(name)
    except ValueError as exc:
        raise ScenarioError(f"attack.method: {exc}") from None


def tv(x: torch.Tensor) -> torch.Tensor:
    """Total variation per target (mean absolute difference of neighbours)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(2).mean(-1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(2).mean(-1)
    return (dx + dy).flatten(1).sum(1)


def _l2(upd: Updates, obs: Observation, x: torch.Tensor, cfg, intervals) -> torch.Tensor:
    return sum((((upd[k] - v) * m) ** 2).flatten(1).sum(1) for k, (v, m) in obs.items())


def _cosine(upd: Updates, obs: Observation, x: torch.Tensor, cfg, intervals) -> torch.Tensor:
    dot = sum((upd[k] * m * v).flatten(1).sum(1) for k, (v, m) in obs.items())
    n1 = sum(((upd[k] * m) ** 2).flatten(1).sum(1) for k, (v, m) in obs.items())
    n2 = sum((v**2).flatten(1).sum(1) for k, (v, m) in obs.items())
    return 1 - dot / (n1.sqrt() * n2.sqrt()).clamp_min(1e-20) + cfg.tv * tv(x)


def _outside_intervals(upd: Updates, obs: Observation, x: torch.Tensor, cfg, intervals) -> torch.Tensor:
    return sum(
        ((torch.relu((upd[k] - v).abs() - intervals[k][1]) / intervals[k][0] * m) ** 2).flatten(1).sum(1)
        for k, (v, m) in obs.items()
    ) + cfg.tv * tv(x)


def _lbfgs(f_and_grad, shape, gen: torch.Generator, cfg, progress):
    x0 = torch.randn(shape, generator=gen) * 0.5 + 0.5
    return batched_lbfgs(f_and_grad, x0, iterations=cfg.iterations, lr=cfg.lr, history=cfg.history, progress=progress)


def _signed_adam(f_and_grad, shape, gen: torch.Generator, cfg, progress):
    x0 = torch.rand(shape, generator=gen)
    return batched_signed_adam(
        f_and_grad, x0, iterations=cfg.iterations, lr=0.1 if cfg.lr == 1.0 else cfg.lr, progress=progress
    )


ATTACK_METHODS.add("dlg", AttackMethod("dlg", _l2, _lbfgs))
ATTACK_METHODS.add("ig", AttackMethod("ig", _cosine, _signed_adam))
ATTACK_METHODS.add("rounding", AttackMethod("rounding", _outside_intervals, _signed_adam, needs_intervals=True))
