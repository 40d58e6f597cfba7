"""Which scheme each client trains: one per device profile, fixed or with channels redrawn each round.

A scheme named by a device-dependent rule (``last-k:fit``, ``search``, ``fisher``, ``random:N``)
is resolved once per device profile of the fleet, against that device's SRAM (or, with
``train.scheme_per_device = false``, the smallest device's everywhere). With
``train.channels = "dynamic"`` the server draws each client's channels afresh every round
(:func:`~fedtiny.budget.schemes.redraw_channels`, seeded by seed, round and client) and sends them
with the round's instructions, so it knows what every update may touch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedtiny.attack.malicious import simulation_trap, trap_scheme, trap_state
from fedtiny.budget.device_memory import device_ram_bytes
from fedtiny.budget.memory import peak_sram_bytes
from fedtiny.budget.schemes import LAST_K_FIT, ResolvedScheme, Scheme, parse_scheme, redraw_channels, resolve, union
from fedtiny.data import ImageSet
from fedtiny.data.shift import apply_shift, fleet_shift
from fedtiny.devices import DeviceProfile
from fedtiny.federated.lr import fixed_lr, grid_lr, trial_scheme, with_lr
from fedtiny.federated.task import Task, client_load, client_profile, cloud_model, make_task, with_scheme
from fedtiny.models.state import load_arrays
from fedtiny.progress import say
from fedtiny.search.contrib import RATIOS, AnalysisSettings, analyse
from fedtiny.search.evolve import SearchSettings, Space, evolve, random_feasible
from fedtiny.search.fisher import fisher_potential, fisher_scheme

__all__ = [
    "FleetSchemes",
    "fleet_schemes",
    "server_task",
    "choose_lr",
    "resolve_scheme",
    "analysis_data",
    "analysis_settings",
    "peak_function",
    "scheme_for_device",
    "search_space",
    "search_settings",
]


@dataclass
class FleetSchemes:
    """The scheme of every device profile in the fleet, and the channel rule.

    Attributes
    ----------
    by_profile
        Device profile name -> the scheme its clients train.
    dynamic
        Redraw each client's channels every round (``train.channels = "dynamic"``).
    found
        Per profile, what the rule that chose the scheme reported (peak, predicted gain, ...).
    """

    by_profile: dict[str, ResolvedScheme]
    dynamic: bool = False
    seed: int = 0
    found: dict[str, dict] = field(default_factory=dict)

    def for_client(self, profile: str, partition_id: int, server_round: int) -> ResolvedScheme:
        """The scheme client ``partition_id`` trains in ``server_round``."""
        scheme = self.by_profile[profile]
        return redraw_channels(scheme, [self.seed, 909, server_round, partition_id]) if self.dynamic else scheme

    @property
    def union(self) -> ResolvedScheme:
        """Everything some client may train (dynamic: every channel of a trained layer)."""
        schemes = list(self.by_profile.values())
        if self.dynamic:
            schemes = [
                dataclasses.replace(
                    s, channels=[c if c is None or not c else list(range(n)) for c, n in zip(s.channels, s.in_channels)]
                )
                for s in schemes
            ]
        return union(schemes)


def _log(text: str) -> None:
    say(text)


def peak_function(task: Task) -> Callable[[Scheme], int]:
    """What must fit a device's SRAM for a scheme, with the scenario's device options (the model's values must
    be loaded): the whole client across a round (``device.fit = "device"``; with the largest partition's
    samples) or the peak of one step."""
    d, t = task.scenario.device, task.scenario.train
    if d.fit == "device":
        load = client_load(task.scenario, task.federation.largest_partition(), task.federation.image_shape)

        def device_of(scheme: Scheme) -> int:
            return device_ram_bytes(
                task.model,
                resolve(scheme, task.model, task.scenario.run.seed),
                task.federation.image_shape,
                load,
                optimizer=t.optimizer,
                momentum=t.momentum,
                reorder=d.reorder,
                inplace_depthwise=d.inplace_depthwise,
                fuse_frozen=d.fuse_frozen,
            )

        return device_of

    def peak_of(scheme: Scheme) -> int:
        resolved = resolve(scheme, task.model, task.scenario.run.seed)
        return peak_sram_bytes(
            task.model,
            resolved,
            task.federation.image_shape,
            optimizer=t.optimizer,
            momentum=t.momentum,
            reorder=d.reorder,
            inplace_depthwise=d.inplace_depthwise,
            fuse_frozen=d.fuse_frozen,
            batch=d.micro_batch,
            accumulate=d.accumulate and t.batch_size > d.micro_batch,
        )

    return peak_of


def analysis_data(task: Task) -> tuple[ImageSet, ImageSet]:
    """The server's public split for the analysis (seen through the fleet's sensors), as (train, validation)."""
    s, public = task.scenario, task.federation.public
    rng = np.random.default_rng([s.run.seed, 303])
    order = rng.permutation(len(public))
    if s.search.samples:
        order = order[: s.search.samples]
    x = public.x[order]
    if s.search.shift == "fleet":  # the clients adapt to their sensors; the analysis should measure that gain
        x = apply_shift(x, fleet_shift(s.shift), [s.run.seed, 304])
    data = ImageSet(x, public.y[order], public.num_classes, public.name)
    n_val = max(1, int(round(s.search.val_fraction * len(data))))
    return data.subset(np.arange(n_val, len(data))), data.subset(np.arange(n_val))


def analysis_settings(task: Task):
    """The contribution analysis's fine-tuning settings from the scenario."""
    s = task.scenario
    return AnalysisSettings(
        epochs=s.search.epochs,
        lr=s.search.lr or s.train.lr,
        optimizer=s.train.optimizer,
        momentum=s.train.momentum,
        batch_size=s.train.batch_size,
        rounding=s.train.weight_rounding,
        bias_grid=tuple(s.search.bias_grid),
        seed=s.run.seed,
    )


def scheme_for_device(
    task: Task,
    state: dict[str, np.ndarray],
    scheme: Scheme,
    budget: int,
    device: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[Scheme, dict]:
    """Resolve a device-dependent rule for a budget of ``budget`` bytes; return the scheme and what was found."""
    s = task.scenario
    load_arrays(task.model, state)
    peak_of = peak_function(task)
    if scheme.last_k == LAST_K_FIT:
        for k in range(len(task.model.convs()), -1, -1):
            if peak_of(Scheme(f"last-k:{k}", last_k=k)) <= budget:
                return Scheme(f"last-k:{k}", last_k=k), {"rule": "last-k:fit", "k": k}
        return Scheme("last-k:0", last_k=0), {"rule": "last-k:fit", "k": 0}
    if scheme.rule == "fisher":
        train, _ = analysis_data(task)
        potential = fisher_potential(task.model, train)
        load_arrays(task.model, state)
        found = fisher_scheme(potential, peak_of, budget, RATIOS, name=f"fisher@{device}")
        return found.scheme, {
            "rule": "fisher",
            "peak_sram_bytes": found.peak_sram_bytes,
            "fisher_potential": found.potential,
            "evaluations": found.evaluations,
        }
    space = search_space(task, state, budget, f"{scheme.name}@{device}", progress)
    if scheme.rule == "random":
        g = random_feasible(space, int(scheme.name.split(":")[1]) * 7919 + s.run.seed)
        return space.scheme(g), {
            "rule": scheme.name,
            "peak_sram_bytes": space.peak(g),
            "predicted_gain": round(space.gain(g), 6),
        }
    result = evolve(space, search_settings(s), progress)
    return result.scheme, {
        "rule": "search",
        "peak_sram_bytes": result.peak_sram_bytes,
        "predicted_gain": result.predicted_gain,
        "evaluations": result.evaluations,
        "analysis_cached": space.c.cached,
    }


def search_settings(scenario):
    """The evolutionary search's settings from the scenario's ``[search]`` section."""
    s = scenario.search
    return SearchSettings(s.population, s.generations, s.mutation, s.crossover, scenario.run.seed)


def search_space(
    task: Task,
    state: dict[str, np.ndarray],
    budget: int,
    name: str,
    progress: Callable[[str], None] | None = None,
    *,
    cache: bool = True,
):
    """The candidates for ``budget``: the contribution analysis (cached) and the planner's peak."""
    train, val = analysis_data(task)
    contrib = analyse(
        task.model,
        state,
        train,
        val,
        analysis_settings(task),
        cache=cache,
        progress=progress,
        workers=task.scenario.search.workers or task.scenario.run.num_cpus,
    )
    load_arrays(task.model, state)
    if progress:
        progress(
            f"contribution analysis: {contrib.evaluations} fine-tunings in {contrib.seconds:.0f}s"
            + (" (cached)" if contrib.cached else "")
        )
    return Space(contrib, peak_function(task), budget, name)


def _budget(task: Task, profile: DeviceProfile) -> int:
    return task.scenario.search.budget_kb * 1024 or profile.sram_bytes


def fleet_schemes(
    task: Task, state: dict[str, np.ndarray], progress: Callable[[str], None] | None = _log
) -> FleetSchemes:
    """Resolve the scenario's scheme for every device profile of the fleet against the cloud model ``state``."""
    s = task.scenario
    profiles = {}
    for p in range(min(s.run.clients, len(s.device.profiles))):
        prof = client_profile(s, p)
        profiles.setdefault(prof.name, prof)
    scheme = parse_scheme(s.scheme_text)
    by_profile: dict[str, ResolvedScheme] = {}
    found: dict[str, dict] = {}
    if scheme.last_k == LAST_K_FIT or scheme.rule:
        targets = list(profiles.values())
        if not s.train.scheme_per_device:
            targets = [min(targets, key=lambda p: p.sram_bytes)]
        for prof in targets:
            chosen, found[prof.name] = scheme_for_device(task, state, scheme, _budget(task, prof), prof.name, progress)
            load_arrays(task.model, state)
            by_profile[prof.name] = resolve(chosen, task.model, s.run.seed)
        if not s.train.scheme_per_device:
            only = next(iter(by_profile.values()))
            found = {name: found[targets[0].name] for name in profiles}
            by_profile = {name: only for name in profiles}
    else:
        load_arrays(task.model, state)
        resolved = resolve(scheme, task.model, s.run.seed)
        by_profile = {name: resolved for name in profiles}
    return FleetSchemes(by_profile, s.train.channels == "dynamic", s.run.seed, found)


def resolve_scheme(task: Task, state: dict[str, np.ndarray]) -> Task:
    """The task under the scheme of the fleet's smallest device (one scheme for every client)."""
    if task.scenario.model.precision != "int8":
        return task
    s = task.scenario
    one = dataclasses.replace(s, train=dataclasses.replace(s.train, scheme_per_device=False))
    fleet = fleet_schemes(dataclasses.replace(task, scenario=one), state, progress=None)
    return with_scheme(task, next(iter(fleet.by_profile.values())))


def choose_lr(
    task: Task,
    state: dict[str, np.ndarray],
    progress: Callable[[str], None] | None = None,
    *,
    scheme: str | None = None,
):
    """The clients' learning rate for ``task`` from the cloud model ``state`` (:mod:`fedtiny.federated.lr`).

    When the scenario leaves it to a pretrained int8 model, the trials train the scheme a client of
    the fleet's smallest device would (``scheme``, or ``last-k:fit`` under a per-device search) on
    the server's public split as the fleet's sensors see it.
    """
    s = task.scenario
    fixed = fixed_lr(s)
    if fixed is not None:
        return fixed
    scheme = trial_scheme(s, scheme)
    proxy = s if scheme is None else dataclasses.replace(s, train=dataclasses.replace(s.train, scheme=scheme))
    trial = resolve_scheme(dataclasses.replace(task, scenario=proxy), state)
    train, val = analysis_data(task)
    return grid_lr(s, trial.model, state, train, val, progress)


def _malicious_start(task: Task, schemes: FleetSchemes | None, progress: Callable[[str], None] | None):
    """A malicious server's round-1 model and schemes: the imprint trap built from the public split, and
    (int8) the trap's scheme for every device profile (``fedtiny.attack.malicious``)."""
    public, trap = simulation_trap(task)
    state = trap_state(task, public, trap)
    if progress:
        progress(
            "attack.server = malicious: the clients receive the imprint trap"
            + (" and train its scheme" if schemes is not None else "")
        )
    if schemes is None:
        return state, None
    load_arrays(task.model, state)
    scheme = trap_scheme(task.model, trap.layer, trap.inputs)
    return state, FleetSchemes({name: scheme for name in schemes.by_profile}, False, schemes.seed)


def server_task(scenario, progress: Callable[[str], None] | None = _log):
    """The server's side of a run before round 1: ``(task, initial_state, cloud_report, schemes)``.

    Builds the task, runs the cloud step, resolves the scheme of each device profile (int8
    models; ``None`` for fp32) and puts the task under their union. The ServerApp and
    ``bench sim``'s bare baseline both start from this.
    """
    task = make_task(scenario)
    initial, cloud = cloud_model(task)
    lr = choose_lr(task, initial, progress)
    if lr.source != "scenario":  # the clients receive the scenario with the rate filled in
        task = dataclasses.replace(task, scenario=with_lr(task.scenario, lr.lr))
    if progress:
        progress(lr.describe())
    cloud = dataclasses.replace(cloud, lr=lr.lr, lr_source=lr.source)
    schemes = fleet_schemes(task, initial, progress) if scenario.model.precision == "int8" else None
    if scenario.attack.enabled and scenario.attack.server == "malicious":
        initial, schemes = _malicious_start(task, schemes, progress)
    if schemes is not None:
        task = with_scheme(task, schemes.union)
    return task, initial, cloud, schemes
