"""A sweep's results: runs repeated over seeds folded into mean, spread and 95% interval, and the table.

A figure from one seed is not a result: the same scenario gives other floats on a CPU with
other vector kernels, and another seed draws other partitions, batches and roundings. So
each figure is reported as the mean over seeds with the 95% confidence interval of that
mean (Student's t with n-1 degrees of freedom); two methods whose intervals overlap are
reported as no difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["combine_seeds", "sweep_table", "paired_table", "interval95", "pm", "MEAN_KEYS"]

MEAN_KEYS = (
    "initial_accuracy",
    "final_accuracy",
    "best_accuracy",
    "uplink_bytes_total",
    "downlink_bytes_total",
    "wall_time_s",
    "refused_clients_total",
    "rejected_updates_total",
    "privacy_mean_psnr_db",
    "privacy_mean_ssim",
    "privacy_label_accuracy",
    "privacy_match_cosine",
    "privacy_change_lsb",
    "privacy_aggregate_mean_psnr_db",
    "privacy_aggregate_mean_ssim",
    "privacy_aggregate_label_accuracy",
    "privacy_aggregate_match_cosine",
    "privacy_aggregate_change_lsb",
    "dp_epsilon",
    "privacy_frac_psnr_25db",
    "privacy_flat_psnr_db",
    "privacy_prior_psnr_db",
    "privacy_oracle_psnr_db",
    "privacy_leaked_blocks",
    "privacy_identification_rank",
    "privacy_identified_top1",
    "privacy_membership_auc",
    "privacy_membership_tpr_1pct",
)


def interval95(values) -> tuple[float, float]:
    """The 95% confidence interval of the mean of ``values`` (t-distribution); the value itself for one."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    from scipy.stats import t  # ~1.5 s to import: loaded by the first interval over seeds

    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return float(v.mean()) - half, float(v.mean()) + half


def combine_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's summaries over seeds.

    For each figure of :data:`MEAN_KEYS` present: ``key`` (mean), ``key_std`` (sample
    standard deviation), ``key_ci95`` (``[low, high]``) and, for accuracies, ``key_spread``
    (max - min). ``per_seed`` keeps the runs' own summaries.
    """
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "per_seed": runs}
    for key in MEAN_KEYS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            continue
        lo, hi = interval95(vals)
        digits = 4 if abs(max(vals, key=abs)) < 100 else 1
        out[key] = round(float(np.mean(vals)), digits)
        out[f"{key}_std"] = round(float(np.std(vals, ddof=1)), digits) if len(vals) > 1 else 0.0
        out[f"{key}_ci95"] = [round(lo, digits), round(hi, digits)]
        if key.endswith("accuracy"):
            out[f"{key}_spread"] = round(float(max(vals) - min(vals)), 4)
    out["peak_sram_bytes_max"] = max(r.get("peak_sram_bytes_max", 0) for r in runs)
    out["device_ram_bytes_max"] = max(r.get("device_ram_bytes_max", 0) for r in runs)
    out["schemes_by_device"] = {
        d: sorted({r["schemes_by_device"][d]["scheme"] for r in runs if d in r.get("schemes_by_device", {})})
        for d in runs[0].get("schemes_by_device", {})
    }
    for key in (
        "num_clients",
        "rounds",
        "clients_per_round",
        "name",
        "uplink_ratio_vs_dense_fp32",
        "uplink_ratio_vs_dense_int8",
        "uplink_bytes_per_upload",
        "precision",
        "dp",
        "dp_delta",
    ):
        out[key] = runs[0].get(key)
    return out


def pm(s: dict[str, Any], key: str, fmt: str = ".4f") -> str:
    """``mean ± half-width`` of the 95% interval (just the value for a single run)."""
    if f"{key}_ci95" not in s or len(s.get("seeds", [])) < 2:
        return format(s[key], fmt) if s.get(key) is not None else "-"
    lo, hi = s[f"{key}_ci95"]
    return f"{s[key]:{fmt}} ± {(hi - lo) / 2:{fmt}}"


def _peak(s: dict[str, Any]) -> str:
    """Peak SRAM of a step; an fp32 run has no int8 step to count (0 in its summary)."""
    peak = int(s.get("peak_sram_bytes_max", 0) or 0)
    return f"{peak:,}" if peak else "not counted (fp32)" if s.get("precision") == "fp32" else "-"


def sweep_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per method, final and best accuracy (mean ± 95% half-interval over seeds), peak SRAM of a step and
    device RAM of a client's round, bytes."""
    seeds = {len(s.get("seeds", [])) or 1 for s in summaries.values()}
    lines = [
        "| method | final accuracy | best | peak SRAM (max) | device RAM (max) | uplink bytes | refused | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        device = int(s.get("device_ram_bytes_max", 0) or 0)
        lines.append(
            f"| {name} | {pm(s, 'final_accuracy')} | {pm(s, 'best_accuracy')} | "
            f"{_peak(s)} | {f'{device:,}' if device else '-'} | {int(s['uplink_bytes_total']):,} | "
            f"{s.get('refused_clients_total', 0):g} | {s['wall_time_s']:.0f} |"
        )
    n = max(seeds)
    if n > 1:
        lines.append(
            f"\nMean over {n} seeds ± half-width of the 95% interval of the mean (t, {n - 1} d.o.f.); "
            "methods whose intervals overlap are not different on this evidence."
        )
    return "\n".join(lines)


def paired_table(summaries: dict[str, dict[str, Any]], key: str = "final_accuracy") -> str:
    """Markdown: each method minus the first, seed by seed (same partitions and batches), with the 95%
    interval of the mean difference; "no difference" when the interval holds zero. Empty without seeds."""
    names = [n for n, s in summaries.items() if len(s.get("per_seed", [])) > 1]
    if len(names) < 2:
        return ""
    ref = names[0]
    by_seed = lambda name: {r["seed"]: r.get(key) for r in summaries[name]["per_seed"]}  # noqa: E731
    base = by_seed(ref)
    lines = [f"| method | {key} minus {ref} (paired by seed) | 95% interval | verdict |", "| --- | --- | --- | --- |"]
    for name in names[1:]:
        other = by_seed(name)
        seeds = [sd for sd in base if sd in other and base[sd] is not None and other[sd] is not None]
        if len(seeds) < 2:
            continue
        diff = np.array([other[sd] - base[sd] for sd in seeds])
        lo, hi = interval95(diff)
        verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
        lines.append(f"| {name} | {diff.mean():+.4f} | {lo:+.4f} to {hi:+.4f} | {verdict} |")
    return "\n".join(lines)
