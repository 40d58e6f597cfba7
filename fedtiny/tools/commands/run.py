"""``fedtiny run``: one run, or a sweep (methods, seeds) of runs, each a Flower simulation, and its tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedtiny.errors import ScenarioError
from fedtiny.federated.checkpoint import CHECKPOINT_DIR, CheckpointError, load_checkpoint
from fedtiny.federated.layout import simulation_layout
from fedtiny.federated.task import make_task
from fedtiny.progress import left, say
from fedtiny.report.html import sweep_tables, write_report
from fedtiny.report.plots import (
    PRIVACY_PLOTS,
    plot_attacks_vs_lsb,
    plot_methods,
    plot_privacy,
    plot_seeds,
    privacy_groups,
    privacy_lsb_table,
    privacy_rounds_table,
)
from fedtiny.report.runlog import new_run_dir, read_metrics, write_scenario
from fedtiny.report.sweep import combine_seeds
from fedtiny.scenario import Scenario, load_scenario, parse_overrides
from fedtiny.tools.commands.output import json_only_on_stdout, table

__all__ = ["cmd_run"]


def cmd_run(args: argparse.Namespace) -> int:
    with json_only_on_stdout(args.json):
        result = _run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The run or sweep of ``args``; its summary (a sweep: one per method, or the seeds' combined)."""
    scenario, run_dir, source = _resolve_run_args(args)
    resume = bool(args.resume)
    laid_out = [(name, *simulation_layout(sc)) for name, sc in _chosen_methods(scenario, args.method, source)]
    methods = [(name, sc) for name, sc, _ in laid_out]
    for note in dict.fromkeys(n for _, _, n in laid_out if n):
        print(f"[fedtiny] {note}", file=sys.stderr, flush=True)  # a choice made for the user: said even with --json
    for _, sc in methods:
        make_task(sc)  # fail fast, before Ray starts: missing data, impossible partitions, a bad model file
    if not resume:
        write_scenario(scenario, run_dir)
    say(f"scenario {source} -> {run_dir}" + (" (resuming)" if resume else ""))
    if not scenario.methods and not scenario.run.seeds:
        summary = _run_or_resume(methods[0][1], run_dir, verbose=args.verbose, resume=resume)
        print(_summary_table(scenario.run.name, summary))
        _report_if_asked(args, run_dir)
        return summary
    summaries = _sweep(methods, run_dir, bool(scenario.methods), verbose=args.verbose, resume=resume)
    _write_sweep(scenario, summaries, run_dir)
    _report_if_asked(args, run_dir)
    return summaries if scenario.methods else summaries[scenario.run.name]


def _resolve_run_args(args: argparse.Namespace) -> tuple[Scenario, Path, Path]:
    """The scenario and run folder of ``fedtiny run`` (a new run, or ``--resume RUN_DIR``)."""
    if args.resume:
        run_dir = Path(args.resume)
        if args.scenario or args.overrides or args.seeds:
            raise ScenarioError(
                f"--resume {run_dir}: the run goes on with its own scenario.toml; give no scenario, --set or --seeds"
            )
        if not (run_dir / "scenario.toml").exists():
            raise ScenarioError(f"--resume {run_dir}: not a run folder (no scenario.toml)")
        return load_scenario(run_dir / "scenario.toml"), run_dir.resolve(), run_dir / "scenario.toml"
    if not args.scenario:
        raise ScenarioError("fedtiny run: give a scenario file, or --resume RUN_DIR")
    overrides = parse_overrides(args.overrides)
    if args.seeds:
        base = int(overrides.get("run.seed", load_scenario(args.scenario, overrides).run.seed))
        overrides["run.seeds"] = list(range(base, base + args.seeds))
    scenario = load_scenario(args.scenario, overrides)
    return scenario, new_run_dir(scenario, args.out), Path(args.scenario)


def _chosen_methods(scenario: Scenario, wanted: list[str], source: Path) -> list[tuple[str, Scenario]]:
    """The scenario's runs by method name (one, unnamed, without ``[methods]``), only ``--method``'s if given."""
    methods = scenario.expand()
    if not wanted:
        return methods
    known = [name for name, _ in methods]
    unknown = [m for m in wanted if m not in known]
    if unknown or not scenario.methods:
        raise ScenarioError(
            f"{source}: --method {', '.join(unknown or wanted)}: not a method of this "
            f"scenario (methods: {', '.join(known) if scenario.methods else 'none'})"
        )
    return [(name, sc) for name, sc in methods if name in wanted]


def _run_or_resume(scenario: Scenario, where: Path, *, verbose: bool, resume: bool) -> dict[str, Any]:
    """One simulation into ``where``; with ``resume``, a finished run is read back and a cut one goes on."""
    # Flower and Ray: 1.4 s more to import (3 s on a busy 2-core machine), which a scenario that fails
    # cmd_run's checks never pays.
    from fedtiny.tools.sim import simulate

    if resume and (where / "summary.json").exists():
        say(f"{where}: finished before; kept")
        return json.loads((where / "summary.json").read_text())
    if resume and (where / CHECKPOINT_DIR).exists():
        ck = load_checkpoint(where)  # a damaged checkpoint stops here, before Ray starts
        if ck.scenario_json != scenario.to_json():
            raise CheckpointError(f"{where}: its checkpoint was written by another scenario than {where}/scenario.toml")
        return simulate(scenario, where, verbose=verbose, resume=True)
    if resume:
        say(f"{where}: no round completed before the stop; starting it over")
    where.mkdir(parents=True, exist_ok=True)
    write_scenario(scenario, where)
    return simulate(scenario, where, verbose=verbose)


def _sweep(
    methods: list[tuple[str, Scenario]], run_dir: Path, named: bool, *, verbose: bool, resume: bool
) -> dict[str, dict[str, Any]]:
    """Every method's runs (one per seed, each in its own folder), each summary printed; a method's summary
    combines its seeds'. ``named``: the methods are a sweep's (``[methods]``), each in its own folder."""
    summaries = {}
    total_runs, done, t_sweep = sum(len(sc.run.seeds or (sc.run.seed,)) for _, sc in methods), 0, time.monotonic()
    for name, sc in methods:
        sub = run_dir / name if named else run_dir
        runs = []
        for seed in sc.run.seeds or (sc.run.seed,):
            seeded = dataclasses.replace(sc, run=dataclasses.replace(sc.run, seed=seed))
            where = sub / f"seed{seed}" if sc.run.seeds else sub
            pace = left(done, total_runs, time.monotonic() - t_sweep)
            say(
                f"method {name}"
                + (f", seed {seed}" if sc.run.seeds else "")
                + f" (run {done + 1}/{total_runs}"
                + (f", {pace}" if pace else "")
                + ")"
            )
            runs.append(_run_or_resume(seeded, where, verbose=verbose, resume=resume))
            done += 1
            print(_summary_table(f"{name} (seed {seed})" if sc.run.seeds else name, runs[-1]))
        summaries[name] = combine_seeds(runs) if sc.run.seeds else runs[0]
    return summaries


def _write_sweep(scenario: Scenario, summaries: dict[str, dict[str, Any]], run_dir: Path) -> None:
    """A sweep's tables (printed and written), plots and summary.json; a seeds-only sweep's seed plot."""
    tables = sweep_tables(summaries, bool(scenario.methods))  # the same tables fedtiny report --table prints
    text = "\n\n".join(tables[k] for k in ("sweep", "paired") if k in tables)
    (run_dir / "table.md").write_text(text + "\n")
    print("\n" + text)
    if not scenario.methods:
        name = scenario.run.name
        plot_seeds(
            _seed_records(run_dir, summaries[name]),
            run_dir / "accuracy_seeds.png",
            title=f"{name}: {len(scenario.run.seeds)} seeds",
        )
        (run_dir / "summary.json").write_text(json.dumps(summaries[name], indent=2, sort_keys=True) + "\n")
        return
    plot_methods(
        {name: _seed_records(run_dir / name, s) for name, s in summaries.items()}, run_dir / "accuracy_vs_uplink.png"
    )
    (run_dir / "summary.json").write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    if "privacy" in tables:
        _write_privacy(summaries, tables["privacy"], run_dir)


def _write_privacy(summaries: dict[str, dict[str, Any]], privacy_table: str, run_dir: Path) -> None:
    """An attacked sweep's privacy table (printed and written), its plots and its per-LSB and per-round tables."""
    (run_dir / "privacy_table.md").write_text(privacy_table + "\n")
    for file, (x_key, xlabel, logx) in PRIVACY_PLOTS.items():
        plot_privacy(summaries, run_dir / file, x_key, xlabel, logx)
    # one report per seed, in the same seed order for every method (privacy_lsb_table pairs them by
    # position, so a seed without a report keeps its place as an empty one)
    reports = {
        name: [
            json.loads((d / "privacy.json").read_text()) if (d / "privacy.json").exists() else {}
            for d in _seed_dirs(run_dir / name, s)
        ]
        for name, s in summaries.items()
    }
    precisions = {n: s.get("precision", "") for n, s in summaries.items()}
    plot_attacks_vs_lsb(reports, precisions, run_dir / "psnr_vs_lsb.png")
    (run_dir / "privacy_lsb.md").write_text(privacy_lsb_table(reports, privacy_groups(summaries)) + "\n")
    if any(len({a["round"] for rep in runs for a in rep.get("attacks", [])}) > 1 for runs in reports.values()):
        accuracy = {
            name: [
                {r["round"]: r["global_accuracy"] for r in records if "global_accuracy" in r}
                for records in _seed_records(run_dir / name, s)
            ]
            for name, s in summaries.items()
        }
        (run_dir / "privacy_rounds.md").write_text(privacy_rounds_table(reports, accuracy) + "\n")
    print("\n" + privacy_table)


def _seed_dirs(base: Path, summary: dict[str, Any]) -> list[Path]:
    """The run folders of a method's summary in ``base``: one per seed, or ``base`` itself."""
    return [base / f"seed{seed}" for seed in summary["seeds"]] if "seeds" in summary else [base]


def _seed_records(base: Path, summary: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [read_metrics(d) for d in _seed_dirs(base, summary)]


def _summary_table(name: str, summary: dict[str, Any]) -> str:
    up32, up8 = summary.get("uplink_ratio_vs_dense_fp32"), summary.get("uplink_ratio_vs_dense_int8")
    return f"\nfedtiny run: {name}\n" + table(
        [
            ("clients (per round)", f"{summary['num_clients']} ({summary['clients_per_round']})"),
            ("rounds", summary["rounds"]),
            ("accuracy: pretrained", summary["initial_accuracy"]),
            ("accuracy: final", summary["final_accuracy"]),
            ("accuracy: best", summary["best_accuracy"]),
            ("uplink bytes (total)", summary["uplink_bytes_total"]),
            ("downlink bytes (total)", summary["downlink_bytes_total"]),
            ("uplink vs dense fp32 / int8", f"{up32:.1f}x / {up8:.1f}x smaller" if up32 and up8 else "nothing sent"),
            ("rejected updates", summary["rejected_updates_total"]),
            ("refused (memory)", summary.get("refused_clients_total", 0)),
            ("peak SRAM of a step (max)", summary.get("peak_sram_bytes_max", 0)),
            ("device RAM of a client's round (max)", summary.get("device_ram_bytes_max", 0)),
            ("wall time (s)", summary["wall_time_s"]),
            ("run folder", summary["run_dir"]),
        ]
    )


def _report_if_asked(args: argparse.Namespace, run_dir: Path) -> None:
    """``fedtiny run --report``: the run's (or sweep's) report.html, its path on stderr (stdout keeps --json's line)."""
    if args.report:
        print(f"[fedtiny] report: {write_report(run_dir)}", file=sys.stderr, flush=True)  # asked for: not progress
