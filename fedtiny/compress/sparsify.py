"""Client-side compression of an update: top-k with warm-up, error feedback, DGC momentum correction.

A client's update is the change of its trainable slices since the global model
it received. Before top-k selection the change is added to the residual of what
earlier rounds did not send (error feedback, Stich et al. 2018; Karimireddy et al.
2019). With momentum correction (DGC, Lin et al. 2018) the change first feeds a
velocity that accumulates, and both velocity and residual are cleared where values
were sent (momentum factor masking). The residual and velocity are the client's
persistent state across rounds (plain dicts of arrays, so any runtime can keep them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtiny.compress.codec import SparseTensor, SparseUpdate, quantize_values

__all__ = ["CompressionConfig", "density_at", "compress_update", "compact_residual"]


@dataclass(frozen=True)
class CompressionConfig:
    """How a client compresses its update (the scenario's ``[compression]`` section)."""

    density: float = 1.0
    topk: str = "tensor"
    warmup_rounds: int = 0
    warmup_start_density: float = 0.25
    values: str = "int8"
    error_feedback: bool = True
    momentum: float = 0.0  # > 0 enables DGC momentum correction
    residual: str = "float64"  # or compact: as a 64 KB device keeps it (compact_residual)


def compact_residual(residual: np.ndarray, dtype: str) -> np.ndarray:
    """The residual as a device with little RAM keeps it (``compression.residual = "compact"``): for an int8
    tensor int16 in 1/256 of a quantization step, rounded half to even and saturated at +-128 steps; for
    any other tensor float32. Both are exact operations in C (device/firmware), so the bytes stay equal."""
    if dtype == "int8":
        return np.clip(np.round(residual * 256.0), -32768, 32767) / 256.0
    return residual.astype(np.float32).astype(np.float64)


def density_at(cfg: CompressionConfig, server_round: int) -> float:
    """Top-k density of ``server_round``: exponential warm-up from the start density to the target (DGC)."""
    if cfg.warmup_rounds <= 0 or server_round > cfg.warmup_rounds or cfg.warmup_start_density <= cfg.density:
        return cfg.density
    frac = (server_round - 1) / cfg.warmup_rounds
    return float(cfg.warmup_start_density * (cfg.density / cfg.warmup_start_density) ** frac)


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    if k >= len(values):
        return np.arange(len(values))
    if k <= 0:
        return np.zeros(0, np.int64)
    # ties broken by position so that the choice is deterministic
    order = np.lexsort((np.arange(len(values)), -np.abs(values)))
    return np.sort(order[:k])


def compress_update(
    delta: dict[str, np.ndarray],
    slices: dict[str, np.ndarray],
    spec: list[tuple[str, tuple[int, ...], str]],
    cfg: CompressionConfig,
    server_round: int,
    state: dict[str, np.ndarray] | None = None,
) -> tuple[SparseUpdate, dict[str, np.ndarray]]:
    """Sparsify and quantize a client's change; return the update and the new persistent state.

    Parameters
    ----------
    delta
        Change of every tensor in ``spec`` (float, full shape).
    slices
        Flat positions each tensor may change (the scheme's trainable slice).
    spec
        The uplink spec (tensor id = position in it).
    state
        ``residual/<name>`` and ``velocity/<name>`` from the previous round, flat over the whole
        tensor: with dynamic channels the slice moves between rounds, and what was not sent
        waits at its own position until its channel is trained again.
    """
    state = dict(state or {})
    acc: dict[str, np.ndarray] = {}

    def carried(key: str, size: int) -> np.ndarray:
        old = state.get(key)
        return np.array(old, np.float64) if old is not None and old.size == size else np.zeros(size)

    for name, shape, _ in spec:
        size = int(np.prod(shape))
        d = np.asarray(delta[name], np.float64).ravel()[slices[name]]
        if cfg.momentum > 0:
            velocity = carried(f"velocity/{name}", size)
            velocity[slices[name]] = cfg.momentum * velocity[slices[name]] + d
            state[f"velocity/{name}"] = velocity
            d = velocity[slices[name]]
        acc[name] = (carried(f"residual/{name}", size)[slices[name]] + d) if cfg.error_feedback else d
    density = density_at(cfg, server_round)
    if cfg.topk == "global":
        allv = np.concatenate([acc[n] for n, _, _ in spec]) if spec else np.zeros(0)
        k = math.ceil(density * len(allv))
        chosen = _topk(allv, k)
        bounds = np.cumsum([0] + [len(acc[n]) for n, _, _ in spec])
        picks = {
            n: chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i] for i, (n, _, _) in enumerate(spec)
        }
    else:
        picks = {n: _topk(acc[n], math.ceil(density * len(acc[n]))) for n, _, _ in spec}
    update = SparseUpdate()
    for tid, (name, shape, dtype) in enumerate(spec):
        sel = picks[name]
        sent, scale = quantize_values(acc[name][sel], cfg.values)
        if cfg.error_feedback:
            residual = carried(f"residual/{name}", int(np.prod(shape)))
            kept = acc[name].copy()
            kept[sel] -= sent
            residual[slices[name]] = compact_residual(kept, dtype) if cfg.residual == "compact" else kept
            state[f"residual/{name}"] = residual
        if cfg.momentum > 0:
            state[f"velocity/{name}"][np.asarray(slices[name])[sel]] = 0.0  # momentum factor masking
        if len(sel):
            update.tensors.append(
                SparseTensor(tid, tuple(shape), np.asarray(slices[name])[sel].astype(np.int64), sent, cfg.values, scale)
            )
    return update, state
