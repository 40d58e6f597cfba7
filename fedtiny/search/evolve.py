"""Search for a scheme under a memory budget: evolutionary search and its random baseline.

A candidate (a *genome*) is one bias-grid index and, per convolution, one weight level
(0 = frozen, j = ``ratios[j - 1]`` of its input channels). Its predicted gain is the sum of its
parts' contributions (:class:`~fedtiny.search.contrib.Contributions`); it is feasible when the
planner's peak SRAM of one training step (``peak_of``) fits the budget. Infeasible candidates are
repaired by lowering random genes until they fit, and training the classifier alone is the
floor, so every result is feasible (or the budget cannot train anything: a clear error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedtiny.budget.schemes import Scheme
from fedtiny.errors import SchemeError
from fedtiny.progress import left, seconds
from fedtiny.search.contrib import Contributions

__all__ = ["SearchSettings", "SearchResult", "Space", "evolve", "random_search", "random_feasible"]

Genome = tuple[int, ...]


@dataclass(frozen=True)
class SearchSettings:
    """The evolutionary search's knobs."""

    population: int = 32
    generations: int = 30
    mutation: float = 0.1  # probability of re-drawing each gene of a child
    crossover: float = 0.5  # probability of taking each gene from the second parent
    seed: int = 0


@dataclass
class SearchResult:
    """The best feasible scheme found, what it is predicted to gain, and what finding it cost."""

    scheme: Scheme
    genome: Genome
    peak_sram_bytes: int
    predicted_gain: float
    evaluations: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per generation: best gain and its peak


class Space:
    """The genomes of one model under one budget, with memoized peak evaluations.

    Parameters
    ----------
    contrib
        The contribution analysis (its bias grid and ratios define the genes).
    peak_of
        Peak SRAM in bytes of one training step of a scheme (the planner, device options applied).
    budget
        The device's SRAM in bytes.
    """

    def __init__(self, contrib: Contributions, peak_of: Callable[[Scheme], int], budget: int, name: str) -> None:
        self.c, self.peak_of, self.budget, self.name = contrib, peak_of, budget, name
        self.n = len(contrib.weight_gain)
        self.levels = [len(contrib.bias_grid)] + [len(contrib.ratios) + 1] * self.n
        self._peaks: dict[Genome, int] = {}
        floor = self.peak(self.zero)
        if floor > budget:
            raise SchemeError(f"nothing fits {budget:,} B: training only the classifier needs {floor:,} B of SRAM")

    @property
    def zero(self) -> Genome:
        return (0,) * (self.n + 1)

    @property
    def evaluations(self) -> int:
        return len(self._peaks)

    def scheme(self, g: Genome) -> Scheme:
        weights = tuple((i, self.c.ratios[lv - 1]) for i, lv in enumerate(g[1:]) if lv)
        return Scheme(self.name, self.c.bias_grid[g[0]], weights)

    def gain(self, g: Genome) -> float:
        return self.c.bias_gain[g[0]] + sum(self.c.weight_gain[i][lv - 1] for i, lv in enumerate(g[1:]) if lv)

    def peak(self, g: Genome) -> int:
        if g not in self._peaks:
            self._peaks[g] = int(self.peak_of(self.scheme(g)))
        return self._peaks[g]

    def fits(self, g: Genome) -> bool:
        return self.peak(g) <= self.budget

    def random(self, rng: np.random.Generator) -> Genome:
        # Sparse starts: each gene is nonzero with a small probability, so many candidates fit.
        p = min(0.5, 3.0 / (self.n + 1))
        return tuple(int(rng.integers(1, lv)) if rng.random() < p else 0 for lv in self.levels)

    def repair(self, g: Genome, rng: np.random.Generator) -> Genome:
        """Lower random nonzero genes until ``g`` fits (the all-zero genome always does)."""
        g = list(g)
        while not self.fits(tuple(g)):
            nonzero = [i for i, v in enumerate(g) if v]
            i = nonzero[int(rng.integers(len(nonzero)))]
            g[i] -= 1
        return tuple(g)

    def result(self, g: Genome, t0: float, history: list[dict]) -> SearchResult:
        return SearchResult(
            self.scheme(g),
            g,
            self.peak(g),
            round(self.gain(g), 6),
            self.evaluations,
            round(time.perf_counter() - t0, 2),
            history,
        )


def evolve(space: Space, settings: SearchSettings, progress: Callable[[str], None] | None = None) -> SearchResult:
    """Evolutionary search: keep the better half, breed the rest by crossover and mutation, repair."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([settings.seed, 404])
    pop = [space.zero] + [space.repair(space.random(rng), rng) for _ in range(settings.population - 1)]
    history = []
    for gen in range(settings.generations):
        pop = sorted(set(pop), key=lambda g: (-space.gain(g), space.peak(g), g))
        parents = pop[: max(2, settings.population // 2)]
        best = parents[0]
        history.append(
            {"generation": gen, "best_gain": round(space.gain(best), 6), "peak_sram_bytes": space.peak(best)}
        )
        if progress:
            spent = time.perf_counter() - t0
            pace = left(gen + 1, settings.generations, spent)
            progress(
                f"generation {gen + 1}/{settings.generations}: best gain {space.gain(best):+.4f}, "
                f"peak {space.peak(best):,} B, {space.evaluations} evaluations | {seconds(spent)}"
                + (f" | {pace}" if pace else "")
            )
        children = []
        while len(parents) + len(children) < settings.population:
            a, b = (parents[int(i)] for i in rng.choice(len(parents), 2, replace=False))
            child = [y if rng.random() < settings.crossover else x for x, y in zip(a, b)]
            child = [
                int(rng.integers(0, lv)) if rng.random() < settings.mutation else v
                for v, lv in zip(child, space.levels)
            ]
            children.append(space.repair(tuple(child), rng))
        pop = parents + children
    best = max(pop, key=lambda g: (space.gain(g), -space.peak(g)))
    return space.result(best, t0, history)


def random_feasible(space: Space, seed: int) -> Genome:
    """One random scheme that fits (the ``random:N`` rule): a random genome, repaired."""
    rng = np.random.default_rng([seed, 505])
    return space.repair(space.random(rng), rng)


def random_search(space: Space, evaluations: int, seed: int = 0) -> SearchResult:
    """The baseline: random feasible candidates until ``evaluations`` peaks were measured; keep the best."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 606])
    best = space.zero
    start = space.evaluations
    for _ in range(100 * evaluations):
        if space.evaluations - start >= evaluations:
            break
        g = space.repair(space.random(rng), rng)
        if (space.gain(g), -space.peak(g)) > (space.gain(best), -space.peak(best)):
            best = g
    return space.result(best, t0, [])
