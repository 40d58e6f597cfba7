"""What the commands print: a two-column table of figures, or one line of JSON."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["table", "print_result"]


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
