"""Sensor shift: the fixed distortion a deployed device's camera adds to every image.

The server pretrains on clean "cloud" data; the fleet's sensors see a shifted
deployment domain (fleet-wide rotation, gain, offset, noise), and each client's
own sensor adds a fixed, seeded variation of its own. Federated fine-tuning then
has something real to adapt to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SensorShift", "fleet_shift", "client_shift", "apply_shift", "rotate"]


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


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate images ``x`` (N x C x H x W) about their centre: bilinear, zeros outside (float32).

    The sampling of PyTorch's ``affine_grid`` + ``grid_sample`` (``align_corners=False``), written
    as elementwise float64 NumPy arithmetic so that every CPU computes the same pixels (PyTorch's
    vectorised kernels round differently from one instruction set to the next).
    """
    n, c, h, w = x.shape
    a = np.deg2rad(degrees)
    cos, sin = float(np.cos(a)), float(np.sin(a))
    ys = (2.0 * np.arange(h) + 1.0) / h - 1.0
    xs = (2.0 * np.arange(w) + 1.0) / w - 1.0
    gx = cos * xs[None, :] - sin * ys[:, None]
    gy = sin * xs[None, :] + cos * ys[:, None]
    ix = ((gx + 1.0) * w - 1.0) / 2.0
    iy = ((gy + 1.0) * h - 1.0) / 2.0
    x0, y0 = np.floor(ix), np.floor(iy)
    fx, fy = ix - x0, iy - y0
    src = x.astype(np.float64)
    out = np.zeros((n, c, h, w), np.float64)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64)
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            weight = np.where(inside, wy * wx, 0.0)
            out += src[:, :, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * weight
    return out.astype(np.float32)


def apply_shift(x: np.ndarray, shift: SensorShift, seed: int | list[int]) -> np.ndarray:
    """Apply ``shift`` to images ``x`` (N x C x H x W in [0, 1]); noise is seeded and fixed."""
    if shift.is_identity or len(x) == 0:
        return x
    out = np.ascontiguousarray(x, dtype=np.float32)
    if shift.rotation_deg:
        out = rotate(out, shift.rotation_deg)
    out = out * np.float32(shift.gain) + np.float32(shift.offset)
    if shift.noise_std:
        out = out + np.random.default_rng(seed).normal(0.0, shift.noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
