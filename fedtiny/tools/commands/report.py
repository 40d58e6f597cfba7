"""``fedtiny report``: a run's or sweep's report.html, or (``--table``) the sweep's tables from its runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtiny.report.html import folder_kind, report_tables, write_report

__all__ = ["cmd_report"]


def cmd_report(args: argparse.Namespace) -> int:
    """``fedtiny report PATH``: a run's or sweep's report.html; ``--table``: the sweep's tables from its runs."""
    kind = folder_kind(args.path)  # a path that is neither stops here, named
    if args.table:
        tables, missing = report_tables(args.path)
        for d in missing:
            print(f"[fedtiny] left out {d}: no summary.json (unfinished)", file=sys.stderr)  # a warning, not progress
        print("\n\n".join(tables.values()))
        if args.json:
            print(
                json.dumps(
                    {
                        "kind": kind,
                        "path": str(Path(args.path).resolve()),
                        "tables": tables,
                        "left_out": [str(d) for d in missing],
                    },
                    sort_keys=True,
                )
            )
        return 0
    path = write_report(args.path)
    print(path)
    if args.json:
        print(json.dumps({"kind": kind, "report": str(path)}, sort_keys=True))
    return 0
