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
import multiprocessing as mp
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from fedtiny.budget.schemes import Scheme, apply_scheme, resolve
from fedtiny.data import ImageSet
from fedtiny.errors import SchemeError
from fedtiny.federated.task import limit_threads
from fedtiny.federated.train import evaluate, seeded, train_local
from fedtiny.int8.prefix import PrefixStore
from fedtiny.models.state import load_arrays
from fedtiny.progress import left, seconds

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
        lines = [
            "| conv | " + " | ".join(f"r={r:g}" for r in self.ratios) + " |",
            "| --- |" + " --- |" * len(self.ratios),
        ]
        lines += [f"| {i} | " + " | ".join(f"{g:+.4f}" for g in row) + " |" for i, row in enumerate(self.weight_gain)]
        lines += [
            "",
            "| biases of last k | " + " | ".join(map(str, self.bias_grid)) + " |",
            "| --- |" + " --- |" * len(self.bias_grid),
            "| gain | " + " | ".join(f"{g:+.4f}" for g in self.bias_gain) + " |",
        ]
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


def _pool(workers: int, units: int, args: tuple):
    """``workers`` spawned analysis processes (a fork could copy the locks of threads a simulation
    runs; a spawned worker starts clean), or None for one."""
    if workers <= 1 or units < 2:
        return None
    # The model goes as plain pickle bytes: a tensor handed to multiprocessing directly is moved to
    # shared memory, and the workers would then train one set of weights concurrently.
    model, *rest = args
    return mp.get_context("spawn").Pool(
        min(workers, units), initializer=_start_worker, initargs=(pickle.dumps(model), *rest)
    )


def _key(state: dict[str, np.ndarray], train: ImageSet, val: ImageSet, settings: AnalysisSettings) -> str:
    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(np.ascontiguousarray(state[name]).tobytes())
    for part in (train, val):
        h.update(np.ascontiguousarray(part.x).tobytes())
        h.update(np.ascontiguousarray(part.y).tobytes())
    return h.hexdigest()


class _FineTuner:
    """Fine-tunes candidates from ``state`` (one per process): each from the first op its scheme trains,
    on the public samples' frozen prefix, computed once per start (from the nearest earlier one)."""

    def __init__(
        self, model: nn.Module, state: dict[str, np.ndarray], train: ImageSet, val: ImageSet, settings: AnalysisSettings
    ) -> None:
        self.model, self.state, self.train, self.val, self.settings = model, state, train, val, settings
        self.prefixes = PrefixStore(keep=8)

    def accuracy(self, scheme: Scheme) -> float:
        st, model = self.settings, self.model
        load_arrays(model, self.state)
        apply_scheme(model, resolve(scheme, model, st.seed))
        train_local(
            model,
            self.train,
            epochs=st.epochs,
            batch_size=st.batch_size,
            lr=st.lr,
            optimizer=st.optimizer,
            momentum=st.momentum,
            rounding=st.rounding,
            gen=seeded(st.seed, 101),
            prefixes=self.prefixes,
        )
        return evaluate(model, self.val, prefixes=self.prefixes)[1]


_WORKER: list[_FineTuner] = []  # the fine-tuner of an analysis worker process


def _start_worker(model_bytes: bytes, *args) -> None:
    limit_threads()
    _WORKER[:] = [_FineTuner(pickle.loads(model_bytes), *args)]  # our own bytes, from the parent process


def _run_unit(unit: list[Scheme]) -> list[float]:
    return [_WORKER[0].accuracy(scheme) for scheme in unit]


def analyse(
    model: nn.Module,
    state: dict[str, np.ndarray],
    train: ImageSet,
    val: ImageSet,
    settings: AnalysisSettings,
    *,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> Contributions:
    """Measure every candidate's contribution for the int8 ``model`` starting from ``state``.

    ``model`` is changed in place (values and trainable tensors); the caller reloads what it needs.
    ``workers``: processes that fine-tune candidates side by side (each candidate's fine-tuning is
    seeded alone, so the gains do not depend on how many).
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

    # Units of work: one bias candidate, or every ratio of one convolution (they share a prefix).
    units = [[Scheme(f"bias-{k}", k, ())] for k in grid[1:]]
    units += [[Scheme(f"w{i}@{r:g}", 0, ((i, r),)) for r in settings.ratios] for i in range(n)]
    total = sum(len(u) for u in units)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress and (done % max(1, total // 20) == 0 or done == total):
            spent = time.perf_counter() - t0
            progress(
                f"contribution analysis {done}/{total} ({what}) | {seconds(spent)}"
                + (f" | {left(done, total, spent)}" if done < total else "")
            )

    pool = _pool(workers, len(units), (model, state, train, val, settings))  # starts while this process works
    try:
        tuner = _FineTuner(model, state, train, val, settings)
        load_arrays(model, state)
        start = evaluate(model, val)[1]
        base = tuner.accuracy(Scheme("classifier", 0, ()))
        if pool is None:
            results = ([tuner.accuracy(scheme) for scheme in unit] for unit in units)
        else:
            results = pool.imap(_run_unit, units)
        accuracies: list[list[float]] = []
        for unit, accs in zip(units, results):
            accuracies.append(accs)
            for scheme in unit:
                tick(
                    f"biases of last {scheme.n_bias_update}"
                    if scheme.n_bias_update
                    else f"conv {scheme.weight_update[0][0]} at {scheme.weight_update[0][1]:g}"
                )
    finally:
        if pool is not None:
            pool.terminate()

    bias_gain = [0.0] + [round(accs[0] - base, 6) for accs in accuracies[: len(grid) - 1]]
    weight_gain = [[round(a - base, 6) for a in accs] for accs in accuracies[len(grid) - 1 :]]
    out = Contributions(
        list(grid),
        bias_gain,
        list(settings.ratios),
        weight_gain,
        round(base, 6),
        round(start, 6),
        total + 1,
        round(time.perf_counter() - t0, 2),
        False,
        key,
        asdict(settings),
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out.to_dict(), indent=1) + "\n")
        tmp.replace(path)
    return out
