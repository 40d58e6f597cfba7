"""``fedtiny search``: the sparse-update scheme for a device (:mod:`fedtiny.tools.search`)."""

from __future__ import annotations

import argparse
import json

from fedtiny.tools.search import search_command

__all__ = ["cmd_search"]


def cmd_search(args: argparse.Namespace) -> int:
    result = search_command(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0
