"""``fedtiny search``: the scheme for one device, found on the server's data, with a random baseline."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from fedtiny.budget.schemes import resolve
from fedtiny.devices import get_profile
from fedtiny.errors import ScenarioError
from fedtiny.federated.lr import with_lr
from fedtiny.federated.task import cloud_model, limit_threads, make_task
from fedtiny.models.state import load_arrays
from fedtiny.progress import say, seconds
from fedtiny.report.plots import plot_contributions
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.search.evolve import Space, evolve, random_search
from fedtiny.server_setup import choose_lr, search_settings, search_space
from fedtiny.tools.models import model_and_scheme

__all__ = ["search_command"]

ROOT = Path(__file__).resolve().parents[2]


def _progress(text: str) -> None:
    say(text)


def search_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run the contribution analysis (cached), the evolutionary search and the random baseline; report."""
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [t0]

    def phase(name: str) -> None:
        """Close phase ``name``: its seconds go to the result and to a progress line."""
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now
        _progress(f"phase {name}: {seconds(phases[name])}")

    limit_threads()
    profile = get_profile(args.device)
    over = parse_overrides(args.overrides)
    if args.model == "tiny-ir":
        scenario_path = args.scenario or ROOT / "scenarios" / "quickstart.toml"
        over["model.name"] = "tiny-ir"
    else:
        path, _ = model_and_scheme(args.model, "full")
        if not path.is_file():
            raise ScenarioError(f"--model {args.model}: no such model file or published model ({path})")
        scenario_path = args.scenario or ROOT / "scenarios" / "mcunet-256kb.toml"
        over["model.file"] = str(path.resolve())
    for key, value in (("search.generations", args.generations), ("search.population", args.population)):
        if value is not None:
            over[key] = value
    over["train.scheme"] = "full"
    scenario = load_scenario(scenario_path, over)
    task = make_task(scenario)
    _progress(
        f"cloud model of {Path(scenario.model.file).stem if scenario.model.file else 'tiny-ir'} "
        f"on {scenario.data.source}"
    )
    state, cloud = cloud_model(task)
    phase("cloud model")
    if not scenario.search.lr:  # the analysis fine-tunes at the clients' rate: settle it as a run would
        lr = choose_lr(task, state, _progress, scheme="last-k:fit")
        task = dataclasses.replace(task, scenario=with_lr(task.scenario, lr.lr))
        _progress(lr.describe())
        phase("learning rate")
    budget = args.budget_kb * 1024 or profile.sram_bytes
    model = Path(scenario.model.file).stem if scenario.model.file else "tiny-ir"
    name = f"search-{model}-{profile.name}"
    space = search_space(task, state, budget, name, _progress, cache=not args.no_cache)
    contrib = space.c
    phase("contribution analysis" + (" (cached)" if contrib.cached else ""))
    found = evolve(space, search_settings(scenario), _progress)
    phase("evolutionary search")
    baseline = random_search(
        Space(contrib, space.peak_of, budget, name + "-random"), found.evaluations, scenario.run.seed
    )
    phase("random baseline")
    load_arrays(task.model, state)
    resolved = resolve(found.scheme, task.model, scenario.run.seed)
    entry = {
        **resolved.to_dict(),
        "predicted_gain": found.predicted_gain,
        "peak_sram_bytes": found.peak_sram_bytes,
        "budget_bytes": budget,
        "device": profile.name,
        "model": model,
        "rule": "search",
    }
    result = {
        "scheme": entry,
        "summary": resolved.summary(),
        "peak_sram_bytes": found.peak_sram_bytes,
        "budget_bytes": budget,
        "predicted_gain": found.predicted_gain,
        "evaluations": found.evaluations,
        "seconds": round(time.perf_counter() - t0, 2),
        "search_seconds": found.seconds,
        "analysis_seconds": contrib.seconds,
        "analysis_cached": contrib.cached,
        "analysis_evaluations": contrib.evaluations,
        "baseline_accuracy": contrib.baseline_accuracy,
        "phase_seconds": phases,
        "cloud_accuracy": cloud.ptq_accuracy,
        "random_search": {
            "predicted_gain": baseline.predicted_gain,
            "peak_sram_bytes": baseline.peak_sram_bytes,
            "evaluations": baseline.evaluations,
            "summary": resolve(baseline.scheme, task.model, scenario.run.seed).summary(),
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(entry, indent=1) + "\n")
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        (out / "contributions.md").write_text(contrib.table() + "\n")
        plot_contributions(contrib, out / "contributions.png")
        (out / "search.json").write_text(
            json.dumps({**result, "history": found.history, "contributions": contrib.to_dict()}, indent=1) + "\n"
        )
    print(
        f"\nfedtiny search: {result['summary']}\n"
        f"  device {profile.name}: peak SRAM {found.peak_sram_bytes:,} B <= budget {budget:,} B\n"
        f"  predicted gain {found.predicted_gain:+.4f} over the classifier alone ({contrib.baseline_accuracy:.4f})\n"
        f"  random search, same {found.evaluations} evaluations: {baseline.predicted_gain:+.4f} "
        f"(peak {baseline.peak_sram_bytes:,} B)\n"
        f"  {result['seconds']:.1f}s (analysis {'cached' if contrib.cached else f'{contrib.seconds:.0f}s'}, "
        f"search {found.seconds:.1f}s)"
    )
    return result
