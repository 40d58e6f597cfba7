"""``fedtiny`` command line: run scenarios, benchmarks and tools.

Every user error (bad scenario, missing data) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from fedtiny.data import DataError
from fedtiny.int8.modelfile import ModelFileError
from fedtiny.int8.zoo import ZooError
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


def cmd_zoo(args: argparse.Namespace) -> int:
    from fedtiny.int8.modelfile import from_tiny_training, load_qmodel, save_qmodel
    from fedtiny.int8.zoo import read_tiny_training

    if args.zoo_command == "import":
        model = from_tiny_training(read_tiny_training(args.file), where=args.file)
        save_qmodel(model, args.out)
    else:
        model = load_qmodel(args.file)
    info = model_info(model)
    if args.zoo_command == "import":
        info["written"] = str(args.out)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(_table([(k, v) for k, v in info.items()]))
    return 0


def model_info(model) -> dict[str, Any]:
    """A few facts about an int8 model, for ``fedtiny zoo``."""
    convs = model.convs()
    head = model.classifier
    return {
        "convolutions": len(convs),
        "blocks": len(model.blocks),
        "depthwise": sum(c.is_depthwise for c in convs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": int(head.weight.shape[0]),
        "classifier_precision": "int8" if hasattr(head, "w_scales") else "fp32",
        "input_channels": convs[0].in_channels,
    }


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

    p = sub.add_parser("zoo", help="import published int8 MCU models (tiny-training .pkl), inspect model files")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    z = zsub.add_parser("import", help="read a tiny-training .pkl safely and write a fedtiny model file")
    z.add_argument("file", help="tiny-training model, e.g. ../shared/models/tiny-training/mcunet-5fps.pkl")
    z.add_argument("--out", required=True, help="fedtiny model file to write (.safetensors)")
    z.add_argument("--json", action="store_true", help="print the model facts as JSON")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("info", help="validate a fedtiny model file and print its facts")
    z.add_argument("file")
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zoo)

    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline run in the same process)")
    p.add_argument("bench", choices=["sim", "qas"],
                   help="sim: Flower simulation vs a bare Python loop; qas: fp32 vs int8 SGD vs int8 SGD+QAS")
    p.add_argument("--scenario", default="scenarios/quickstart.toml", help="scenario whose local training is timed")
    p.add_argument("--clients", type=int, default=100, help="sim: number of client calls (N)")
    p.add_argument("--epochs", type=int, default=5, help="qas: fine-tuning epochs per trial")
    p.add_argument("--lr-points", type=int, default=5, help="qas: learning rates tried per method")
    p.add_argument("--lr-center", type=float, default=0.003, help="qas: middle of the fp32/QAS learning-rate grid")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, DataError, ZooError, ModelFileError) as exc:
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
