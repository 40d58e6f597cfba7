"""TinyTrain's selection rule (Kwon et al., ICML 2023): rank layers and channels by Fisher information.

For each convolution's input channels, the Fisher potential of an activation channel is
``0.5 * E[(sum over positions of a * dL/da)^2]`` (how much the loss would move if that channel
were adapted), computed on the server's public split through the int8 network's float twin.
A layer trained on its top-``r`` channels is worth the potential of those channels. Moves (one
layer up one ratio step) are ranked by potential gained per byte of peak SRAM they add alone, and
taken greedily while the whole scheme fits: no search, one backward pass per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedtiny.attack.surrogate import Surrogate
from fedtiny.budget.schemes import Scheme
from fedtiny.data import ImageSet
from fedtiny.errors import SchemeError

__all__ = ["fisher_potential", "fisher_scheme", "FisherResult"]


@dataclass
class FisherResult:
    scheme: Scheme
    peak_sram_bytes: int
    potential: float  # summed Fisher potential of the trained channels
    evaluations: int
    seconds: float


def fisher_potential(model, data: ImageSet, *, batch_size: int = 32, max_samples: int = 256) -> list[np.ndarray]:
    """Per convolution of the int8 ``model`` (forward order), the Fisher potential of each input channel."""
    twin = Surrogate(model)
    twin.requires_grad_(False)
    convs = [getattr(twin, c.tag) for c in model.convs()]
    if len(convs) != len(model.convs()):
        raise SchemeError("fisher: the float twin's convolutions do not line up with the model's")
    inputs: list[torch.Tensor] = []

    def keep(module, args):
        inputs.append(args[0])  # part of the graph: the image requires grad, so every activation does

    hooks = [c.register_forward_pre_hook(keep) for c in convs]
    totals = [np.zeros(c.weight.shape[0] if c.groups > 1 else c.weight.shape[1]) for c in convs]
    n = min(len(data), max_samples)
    try:
        for i in range(0, n, batch_size):
            inputs.clear()
            x = torch.from_numpy(data.x[i : min(i + batch_size, n)]).requires_grad_(True)
            y = torch.from_numpy(data.y[i : min(i + batch_size, n)])
            loss = F.cross_entropy(twin(x), y, reduction="sum")
            grads = torch.autograd.grad(loss, inputs)
            for t, a, g in zip(totals, inputs, grads):
                t += 0.5 * ((a.detach() * g).sum(dim=(2, 3)) ** 2).sum(0).double().numpy()
    finally:
        for h in hooks:
            h.remove()
    return [t / max(n, 1) for t in totals]


def fisher_scheme(
    potential: list[np.ndarray], peak_of, budget: int, ratios: tuple[float, ...], name: str = "fisher"
) -> FisherResult:
    """Greedy Fisher-ranked scheme under ``budget``: channels by potential, layers by potential per byte."""
    t0 = time.perf_counter()
    n = len(potential)
    order = [np.argsort(-p, kind="stable") for p in potential]
    counts = [[0] + [len(p) if r >= 1 else int(len(p) * r) for r in ratios] for p in potential]
    mass = [[float(potential[i][order[i][:k]].sum()) for k in counts[i]] for i in range(n)]
    peaks: dict[tuple, int] = {}

    def scheme(levels: list[int]) -> Scheme:
        idx = [i for i in range(n) if counts[i][levels[i]]]
        return Scheme(
            name,
            0,
            tuple((i, ratios[levels[i] - 1]) for i in idx),
            weight_channels=tuple(tuple(sorted(int(c) for c in order[i][: counts[i][levels[i]]])) for i in idx),
        )

    def peak(levels: list[int]) -> int:
        key = tuple(levels)
        if key not in peaks:
            peaks[key] = int(peak_of(scheme(levels)))
        return peaks[key]

    levels = [0] * n
    floor = peak(levels)
    if floor > budget:
        raise SchemeError(f"nothing fits {budget:,} B: training only the classifier needs {floor:,} B of SRAM")
    moves = []  # (potential per byte, layer, from level, to level): steps between distinct channel counts
    for i in range(n):
        distinct = [0] + [lv for lv in range(1, len(ratios) + 1) if counts[i][lv] > counts[i][lv - 1]]
        for a, b in zip(distinct, distinct[1:]):
            alone = [0] * n
            alone[i] = b
            cost = max(peak(alone) - floor, 1)
            moves.append(((mass[i][b] - mass[i][a]) / cost, i, a, b))
    moves.sort(key=lambda m: (-m[0], m[1], m[2]))
    changed = True
    while changed:  # a layer climbs one step at a time, so a later pass may take a step skipped before
        changed = False
        for _, i, a, b in moves:
            if levels[i] == a:
                trial = list(levels)
                trial[i] = b
                if peak(trial) <= budget:
                    levels, changed = trial, True
    total = sum(mass[i][levels[i]] for i in range(n))
    return FisherResult(scheme(levels), peak(levels), round(total, 6), len(peaks), round(time.perf_counter() - t0, 2))
