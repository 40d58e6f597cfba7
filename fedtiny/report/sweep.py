"""A sweep's results: runs repeated over seeds folded into mean and spread, and the comparison table."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["combine_seeds", "sweep_table"]

_MEAN_KEYS = ("initial_accuracy", "final_accuracy", "best_accuracy", "uplink_bytes_total", "downlink_bytes_total",
              "wall_time_s", "refused_clients_total", "rejected_updates_total")


def combine_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's summaries over seeds: each figure's mean, accuracies' spread (max - min), the runs.

    The spread is what a difference between methods has to exceed before it counts.
    """
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "per_seed": runs}
    for key in _MEAN_KEYS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = round(float(np.mean(vals)), 4)
            if key.endswith("accuracy"):
                out[f"{key}_spread"] = round(float(max(vals) - min(vals)), 4)
    out["peak_sram_bytes_max"] = max(r.get("peak_sram_bytes_max", 0) for r in runs)
    out["schemes_by_device"] = {d: sorted({r["schemes_by_device"][d]["scheme"] for r in runs
                                          if d in r.get("schemes_by_device", {})})
                                for d in runs[0].get("schemes_by_device", {})}
    for key in ("num_clients", "rounds", "clients_per_round", "name"):
        out[key] = runs[0].get(key)
    return out


def sweep_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per method, final accuracy (mean and spread over seeds), peak SRAM, uplink bytes, refusals."""
    lines = ["| method | final accuracy | spread | best | peak SRAM (max) | uplink bytes | refused | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summaries.items():
        seeds = len(s.get("seeds", [])) or 1
        lines.append(f"| {name} | {s['final_accuracy']:.4f} | {s.get('final_accuracy_spread', 0):.4f} ({seeds} seeds) "
                     f"| {s['best_accuracy']:.4f} | {s.get('peak_sram_bytes_max', 0):,} | "
                     f"{int(s['uplink_bytes_total']):,} | {s.get('refused_clients_total', 0):g} | "
                     f"{s['wall_time_s']:.0f} |")
    return "\n".join(lines)
