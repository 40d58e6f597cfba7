"""Contribution analysis: how much accuracy each candidate update brings, measured on the server's data.

As in "On-Device Training Under 256KB Memory" (Lin et al. 2022, Sec. 3.2): starting from the
cloud model, fine-tune briefly (a) the biases of the last k convolutions, for k on a grid, and
(b) the weights of convolution i with a share r of its input channels, each on top of the
classifier, and record the held-out accuracy gain over training the classifier alone. The search
(:mod:`fedtiny.search.evolve`) then adds these gains up as its objective. Everything runs on the
server's public split; clients' data never leaves them. Results are cached on disk, keyed by the
model's values, the data and the settings, so a second search is fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from fedtiny.report.progress import left, seconds
from fedtiny.budget.schemes import Scheme, apply_scheme, resolve
from fedtiny.errors import SchemeError
from fedtiny.data import ImageSet
from fedtiny.federated.train import evaluate, seeded, train_local
from fedtiny.int8.prefix import PrefixStore
from fedtiny.models.state import load_arrays

__all__ = ["AnalysisSettings", "Contributions", "analyse", "cache_dir", "default_bias_grid", "RATIOS"]

RATIOS = (0.125, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class AnalysisSettings:
    """How each candidate is fine-tuned (the clients' optimizer, briefly)."""

    epochs: int = 2
    lr: float = 0.02
    optimizer: str = "sgd+qas"
    momentum: float = 0.0
    batch_size: int = 16
    rounding: str = "stochastic"
    ratios: tuple[float, ...] = RATIOS
    bias_grid: tuple[int, ...] = ()  # () = default_bias_grid(number of convolutions)
    seed: int = 0


@dataclass
class Contributions:
    """Accuracy gains over training the classifier alone (``baseline_accuracy``).

    Attributes
    ----------
    bias_gain
        Gain of training the biases of the last ``bias_grid[j]`` convolutions (``bias_gain[0]`` is 0).
    weight_gain
        ``weight_gain[i][j]``: gain of training convolution i's weights (and bias) on a share
        ``ratios[j]`` of its input channels.
    """

    bias_grid: list[int]
    bias_gain: list[float]
    ratios: list[float]
    weight_gain: list[list[float]]
    baseline_accuracy: float
    start_accuracy: float
    evaluations: int
    seconds: float
    cached: bool = False
    key: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Contributions":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def table(self) -> str:
        """Markdown table: one row per convolution, one column per ratio, plus the bias grid."""
        lines = ["| conv | " + " | ".join(f"r={r:g}" for r in self.ratios) + " |",
                 "| --- |" + " --- |" * len(self.ratios)]
        lines += [f"| {i} | " + " | ".join(f"{g:+.4f}" for g in row) + " |" for i, row in enumerate(self.weight_gain)]
        lines += ["", "| biases of last k | " + " | ".join(map(str, self.bias_grid)) + " |",
                  "| --- |" + " --- |" * len(self.bias_grid),
                  "| gain | " + " | ".join(f"{g:+.4f}" for g in self.bias_gain) + " |"]
        return "\n".join(lines)


def default_bias_grid(n: int) -> tuple[int, ...]:
    """Every k for a small network; roughly doubling steps for a deep one (always 0 and n)."""
    if n <= 12:
        return tuple(range(n + 1))
    grid = {0, n} | {k for k in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if k < n}
    return tuple(sorted(grid))


def cache_dir() -> Path:
    """Where analyses are kept: ``$FEDTINY_CACHE``, else ``$XDG_CACHE_HOME/fedtiny``, else ``~/.cache/fedtiny``."""
    if os.environ.get("FEDTINY_CACHE"):
        return Path(os.environ["FEDTINY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtiny"


def _key(state: dict[str, np.ndarray], train: ImageSet, val: ImageSet, settings: AnalysisSettings) -> str:
    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    for part in (train, val):
        h.update(np.ascontiguousarray(part.x).tobytes())
        h.update(np.ascontiguousarray(part.y).tobytes())
    return h.hexdigest()


def analyse(model: nn.Module, state: dict[str, np.ndarray], train: ImageSet, val: ImageSet,
            settings: AnalysisSettings, *, cache: bool = True,
            progress: Callable[[str], None] | None = None) -> Contributions:
    """Measure every candidate's contribution for the int8 ``model`` starting from ``state``.

    ``model`` is changed in place (values and trainable tensors); the caller reloads what it needs.
    """
    key = _key(state, train, val, settings)
    path = cache_dir() / f"contrib-{key[:24]}.json"
    if cache and path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            out = Contributions.from_dict(d)
            out.cached = True
            return out
    t0 = time.perf_counter()
    n = len(model.convs())
    grid = settings.bias_grid or default_bias_grid(n)
    if grid[0] != 0 or max(grid) > n:
        raise SchemeError(f"search.bias_grid {list(grid)} must start at 0 and stay within the model's {n} convolutions")

    # Each candidate trains from the first op its scheme trains: the frozen prefix's outputs for the
    # public samples are computed once per start (from the nearest earlier one) and reused.
    prefixes = PrefixStore(keep=8)

    def accuracy(scheme: Scheme) -> float:
        load_arrays(model, state)
        apply_scheme(model, resolve(scheme, model, settings.seed))
        train_local(model, train, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                    optimizer=settings.optimizer, momentum=settings.momentum, rounding=settings.rounding,
                    gen=seeded(settings.seed, 101), prefixes=prefixes)
        return evaluate(model, val, prefixes=prefixes)[1]

    load_arrays(model, state)
    start = evaluate(model, val)[1]
    base = accuracy(Scheme("classifier", 0, ()))
    total = n * len(settings.ratios) + len(grid) - 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress and (done % max(1, total // 20) == 0 or done == total):
            spent = time.perf_counter() - t0
            progress(f"contribution analysis {done}/{total} ({what}) | {seconds(spent)}"
                     + (f" | {left(done, total, spent)}" if done < total else ""))

    bias_gain = [0.0]
    for k in grid[1:]:
        bias_gain.append(round(accuracy(Scheme(f"bias-{k}", k, ())) - base, 6))
        tick(f"biases of last {k}")
    weight_gain = []
    for i in range(n):
        row = []
        for r in settings.ratios:
            row.append(round(accuracy(Scheme(f"w{i}@{r:g}", 0, ((i, r),))) - base, 6))
            tick(f"conv {i} at {r:g}")
        weight_gain.append(row)
    out = Contributions(list(grid), bias_gain, list(settings.ratios), weight_gain, round(base, 6), round(start, 6),
                        total + 1, round(time.perf_counter() - t0, 2), False, key, asdict(settings))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out.to_dict(), indent=1) + "\n")
        tmp.replace(path)
    return out
