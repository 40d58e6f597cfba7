"""``fedtiny`` command line: run scenarios, benchmarks and tools.

Every user error (bad scenario, missing data) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from fedtiny.data import DataError
from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides

__all__ = ["main"]

EXIT_USAGE = 2


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set train.lr=0.01 (repeatable)")


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            v = f"{v:,}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from fedtiny.data import build_federation
    from fedtiny.runlog import new_run_dir, write_scenario
    from fedtiny.sim import simulate

    scenario = load_scenario(args.scenario, parse_overrides(args.overrides))
    build_federation(scenario)  # fail fast, before Ray starts, on missing data or impossible partitions
    run_dir = new_run_dir(scenario, args.out)
    write_scenario(scenario, run_dir)
    print(f"[fedtiny] scenario {args.scenario} -> {run_dir}", file=sys.stderr, flush=True)
    summary = simulate(scenario, run_dir, verbose=args.verbose)
    print(f"\nfedtiny run: {scenario.run.name}")
    print(_table([
        ("clients (per round)", f"{summary['num_clients']} ({summary['clients_per_round']})"),
        ("rounds", summary["rounds"]),
        ("accuracy: pretrained", summary["initial_accuracy"]),
        ("accuracy: final", summary["final_accuracy"]),
        ("accuracy: best", summary["best_accuracy"]),
        ("uplink bytes (total)", summary["uplink_bytes_total"]),
        ("downlink bytes (total)", summary["downlink_bytes_total"]),
        ("rejected updates", summary["rejected_updates_total"]),
        ("wall time (s)", summary["wall_time_s"]),
        ("run folder", summary["run_dir"]),
    ]))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedtiny import bench

    result = bench.BENCHES[args.bench](args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtiny", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario as a Flower simulation")
    p.add_argument("scenario", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    _add_scenario_args(p)
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print summary.json as the last line of stdout")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline run in the same process)")
    p.add_argument("bench", choices=["sim"], help="sim: Flower simulation vs a bare Python loop")
    p.add_argument("--scenario", default="scenarios/quickstart.toml", help="scenario whose local training is timed")
    p.add_argument("--clients", type=int, default=100, help="number of client calls (N)")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, DataError) as exc:
        print(f"fedtiny: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        # Partitioning and model construction report bad scenario values as ValueError("key: problem").
        print(f"fedtiny: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedtiny: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
