"""Client-side policies: what a device refuses or bounds so that a server that lies learns less.

A malicious server sets every weight of the model it sends and picks the scheme (docs/results/
privacy-malicious.md). The device can check both before it trains, and bound what it sends:

- ``device.policy_frozen_first = N``: refuse a scheme that trains any of the first ``N``
  convolutions (their gradients are the closest to the raw image);
- ``device.policy_max_saturation = s``: refuse a downlink when, on the device's own samples, a
  ReLU-type layer clamps more than a share ``s`` of its outputs (trap weights that isolate samples
  or positions keep almost every unit in its flat region);
- ``device.policy_max_change_lsb = L``: clip the change of every trained int8 weight to ``L`` steps
  of its quantization per round before sending.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.int8.graph import QConv

__all__ = ["scheme_refusal", "saturation", "saturation_refusal", "clip_weight_change"]


def scheme_refusal(model, first: int) -> str:
    """Why the applied scheme is refused under ``policy_frozen_first = first`` (empty: accepted)."""
    if first <= 0:
        return ""
    trained = [c.tag for c in model.convs()[:first] if any(p.requires_grad for p in c.parameters())]
    return (
        (
            f"policy: the scheme trains {', '.join(trained)}, among the first {first} convolutions this device "
            "keeps frozen"
        )
        if trained
        else ""
    )


@torch.no_grad()
def saturation(model, x: torch.Tensor) -> dict[str, float]:
    """Per convolution with a clamping activation (ReLU, ReLU6): the share of its int8 outputs on images
    ``x`` that sit at the clamp's bounds."""
    env = model._run(model.quantize_input(x), model._head, record=False)
    out = {}
    for conv in model.convs():
        if not isinstance(conv, QConv) or conv.tag not in env or str(conv.activation).upper() == "NONE":
            continue
        lo, hi = conv.act_range()  # calibrated ReLU6 outputs often span all of int8: the bounds are the clamp
        y = env[conv.tag]
        out[conv.tag] = float(((y <= lo) | (y >= hi)).float().mean())
    return out


def saturation_refusal(model, x: torch.Tensor, limit: float) -> str:
    """Why the downlink is refused under ``policy_max_saturation = limit`` (empty: accepted)."""
    if limit >= 1.0 or len(x) == 0:
        return ""
    sat = saturation(model, x)
    worst = max(sat.items(), key=lambda kv: kv[1], default=("", 0.0))
    return (
        (
            f"policy: the model clamps {worst[1]:.1%} of {worst[0]}'s outputs on this device's samples "
            f"(more than {limit:.0%}): refused as a possible trap"
        )
        if worst[1] > limit
        else ""
    )


def clip_weight_change(
    trained: dict[str, np.ndarray], received: dict[str, np.ndarray], max_lsb: int
) -> dict[str, np.ndarray]:
    """Trained tensors with every int8 weight's change clipped to ``max_lsb`` (0: unchanged)."""
    if max_lsb <= 0:
        return trained
    out = dict(trained)
    for name, a in trained.items():
        if np.asarray(a).dtype == np.int8:
            base = received[name].astype(np.int16)
            out[name] = np.clip(a.astype(np.int16), base - max_lsb, base + max_lsb).astype(np.int8)
    return out
