"""``fedtiny bench NAME``: one of the benchmarks of :mod:`fedtiny.tools.bench`."""

from __future__ import annotations

import argparse
import json

from fedtiny.tools.bench import BENCHES, DEFAULT_SCENARIO, SIM_SCENARIO
from fedtiny.tools.commands.output import json_only_on_stdout

__all__ = ["cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.scenario:
        args.scenario = SIM_SCENARIO if args.bench == "sim" else DEFAULT_SCENARIO
    with json_only_on_stdout(args.json):
        result = BENCHES[args.bench](args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
