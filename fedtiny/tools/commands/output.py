"""What the commands print: a two-column table of figures, or one line of JSON."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

__all__ = ["table", "print_result", "json_only_on_stdout"]


def table(rows: list[tuple[str, Any]]) -> str:
    """``rows`` as aligned ``key  value`` lines: floats to 4 places, large integers with thousands separators."""
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            v = f"{v:,}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """``result`` as one JSON line (``--json``) or as a :func:`table`."""
    print(json.dumps(result, sort_keys=True) if as_json else table(list(result.items())))


@contextlib.contextmanager
def json_only_on_stdout(as_json: bool) -> Iterator[None]:
    """With ``--json``, what a command prints inside the block (its tables) goes to stderr, so that
    stdout carries the JSON it prints after the block alone (for ``jq`` and scripts)."""
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        yield
