"""Sensor shift: the fixed distortion a deployed device's camera adds to every image.

The server pretrains on clean "cloud" data; the fleet's sensors see a shifted
deployment domain (fleet-wide rotation, gain, offset, noise), and each client's
own sensor adds a fixed, seeded variation of its own. Federated fine-tuning then
has something real to adapt to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SensorShift", "fleet_shift", "client_shift", "apply_shift"]


@dataclass(frozen=True)
class SensorShift:
    """A fixed sensor distortion: ``clip(gain * rotate(x) + offset + noise, 0, 1)``."""

    rotation_deg: float = 0.0
    gain: float = 1.0
    offset: float = 0.0
    noise_std: float = 0.0

    @property
    def is_identity(self) -> bool:
        """True when applying the shift changes nothing."""
        return self == SensorShift()


def fleet_shift(cfg) -> SensorShift:
    """Return the deployment domain's shift from a ``[shift]`` section."""
    return SensorShift(cfg.rotation_deg, cfg.gain, cfg.offset, cfg.noise_std)


def client_shift(cfg, partition_id: int, seed: int) -> SensorShift:
    """Return client ``partition_id``'s fixed shift: the fleet's plus its own seeded variation."""
    rng = np.random.default_rng([seed, 7919, partition_id])
    rot = cfg.rotation_deg + rng.uniform(-1, 1) * cfg.client_rotation_deg
    gain = cfg.gain * (1.0 + rng.uniform(-1, 1) * cfg.client_gain)
    noise = float(np.hypot(cfg.noise_std, rng.uniform(0, 1) * cfg.client_noise_std))
    return SensorShift(float(rot), float(gain), cfg.offset, noise)


def apply_shift(x: np.ndarray, shift: SensorShift, seed: int | list[int]) -> np.ndarray:
    """Apply ``shift`` to images ``x`` (N x C x H x W in [0, 1]); noise is seeded and fixed."""
    if shift.is_identity or len(x) == 0:
        return x
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if shift.rotation_deg:
        a = np.deg2rad(shift.rotation_deg)
        theta = torch.tensor([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]], dtype=torch.float32)
        grid = F.affine_grid(theta.expand(len(t), 2, 3), list(t.shape), align_corners=False)
        t = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = t.numpy() * shift.gain + shift.offset
    if shift.noise_std:
        out = out + np.random.default_rng(seed).normal(0.0, shift.noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
