"""The user: holds private images, computes and sends an update (gradient or FedAvg change).

Everything is vectorized over independent targets (each target is one client's batch): the
update of target ``i`` depends only on its own images, through ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedtiny.attack.threat import ThreatModel
from fedtiny.compress.values import value_type

__all__ = ["update_fn", "observe", "Observation"]

Params = dict[str, torch.Tensor]
Observation = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (values [B, ...], mask [B, ...])


def update_fn(model: nn.Module, threat: ThreatModel, frozen: Params):
    """``f(trainable, x [B,b,C,H,W], y_soft [B,b,K]) -> {name: update [B, ...]}`` for all targets at once."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**frozen, **p}, (x,))
        return -(y * torch.log_softmax(out, dim=1)).sum(1).mean()

    def one(p: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
        if threat.observation == "gradient":
            return grad(loss)(p, x, y)
        q = dict(p)
        for _ in range(threat.local_steps):  # full-batch local SGD, unrolled (differentiable)
            g = grad(loss)(q, x, y)
            q = {k: q[k] - threat.lr * g[k] for k in q}
        return {k: q[k] - p[k] for k in q}

    return vmap(one, in_dims=(None, 0, 0))


def _wire(v: torch.Tensor, threat: ThreatModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k and the codec's quantization (its torch twin) of one tensor's updates for all targets: (values, mask)."""
    flat = v.flatten(1)
    n = flat.shape[1]
    k = max(1, math.ceil(threat.density * n))
    if k < n:
        idx = flat.abs().topk(k, dim=1).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    else:
        mask = torch.ones_like(flat, dtype=torch.bool)
    sent = value_type(threat.values).surrogate(torch.where(mask, flat, torch.zeros_like(flat)), mask)
    return sent.view_as(v), mask.view_as(v)


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, threat: ThreatModel) -> Observation:
    """What the server receives from each target: its update after top-k and quantization.

    ``x``: [B, b, C, H, W] private images of B targets; ``y``: [B, b] labels.
    """
    params = dict(model.named_parameters())
    names = list(threat.trainable) if threat.trainable else list(params)
    trainable = {k: params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    soft = torch.nn.functional.one_hot(y, num_classes).float()
    with torch.no_grad():
        updates = update_fn(model, threat, frozen)(trainable, x, soft)
    return {k: _wire(v, threat) for k, v in updates.items()}
