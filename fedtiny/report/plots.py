"""PNG plots of a run: accuracy per round and bytes per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedtiny.report.sweep import interval95, pm

__all__ = ["plot_run", "plot_methods", "plot_seeds"]


def _pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend)."""
    # matplotlib is optional and takes ~0.6 s to import: loaded by the first plot, not with the module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib (above), after its backend is chosen

    return plt


def plot_run(records: list[dict[str, Any]], run_dir: Path, title: str = "") -> list[Path]:
    """Write ``accuracy.png``, ``bytes.png``, ``accuracy_vs_uplink.png`` and ``accuracy_vs_fleet_time.png``
    into ``run_dir``; return their paths."""
    plt = _pyplot()

    rounds = [r["round"] for r in records]
    paths = []

    paths.append(
        _accuracy_against(
            rounds,
            records,
            "round (0 = cloud-pretrained model)",
            f"{title}: global test accuracy",
            run_dir / "accuracy.png",
        )
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    up = [r.get("uplink_bytes", 0) / 1024 for r in records]
    down = [r.get("downlink_bytes", 0) / 1024 for r in records]
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], up, width, label="uplink (clients -> server)")
    ax.bar([x + width / 2 for x in rounds], down, width, label="downlink (server -> clients)")
    ax.set_xlabel("round")
    _integer_ticks(ax)
    ax.set_ylabel("kB per round (all clients)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{title}: bytes on the radio")
    ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    paths.append(plot_methods({title: [records]}, run_dir / "accuracy_vs_uplink.png"))
    if any(r.get("fleet_time_s") for r in records):
        times = [r.get("fleet_time_s", 0.0) for r in records]
        positive = [t for t in times if t > 0]
        # a symmetric log axis over less than a decade labels nothing but its ends
        paths.append(
            _accuracy_against(
                times,
                records,
                "simulated fleet time (s; each round: its slowest counted client, or the deadline)",
                f"{title}: accuracy against device time",
                run_dir / "accuracy_vs_fleet_time.png",
                symlog=max(positive) >= 10 * min(positive),
            )
        )
    return paths


def _accuracy_against(
    x: list[float], records: list[dict[str, Any]], xlabel: str, title: str, path: Path, *, symlog: bool = False
) -> Path:
    """One run's global test accuracy against ``x`` (rounds, or simulated time), saved to ``path``."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["global_accuracy"] for r in records], marker="o", label="global test")
    if symlog:
        ax.set_xscale("symlog", linthresh=1.0)
    elif x and all(float(v).is_integer() for v in x):
        _integer_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _integer_ticks(ax) -> None:
    """Rounds are whole numbers: no 0.5 ticks."""
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))


def _band(runs: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per round over seeds: mean and the 95% interval of the mean (the mean itself with one seed); an
    accuracy's interval is clipped to [0, 1] (with few seeds the t interval reaches past it)."""
    n = min(len(r) for r in runs)
    vals = np.array([[r[i][key] for i in range(n)] for r in runs], dtype=float)
    lo, hi = (np.array(v) for v in zip(*(interval95(vals[:, i]) for i in range(n))))
    if key.endswith("accuracy"):
        lo, hi = np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)
    return vals.mean(axis=0), lo, hi


def plot_methods(runs: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path:
    """Accuracy against cumulative uplink bytes, one line per method: the mean over its seeds' ``metrics.jsonl``
    records, with the 95% interval as a band."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    any_sent = False
    for name, seeds in runs.items():
        up = [np.cumsum([r.get("uplink_bytes", 0) for r in recs]) for recs in seeds]
        xs = np.mean([u[: min(map(len, up))] for u in up], axis=0)
        mean, lo, hi = _band(seeds, "global_accuracy")
        sent = xs > 0  # round 0 (nothing sent yet) has no place on a log axis: a dotted level instead
        any_sent |= bool(sent.any())
        (line,) = ax.plot(
            xs[sent],
            mean[sent],
            marker="o",
            markersize=3,
            label=name + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""),
        )
        if not sent.all():
            ax.axhline(mean[0], color=line.get_color(), ls=":", lw=1, alpha=0.7)
        if len(seeds) > 1:
            ax.fill_between(xs[sent], lo[sent], hi[sent], color=line.get_color(), alpha=0.2, linewidth=0)
    if any_sent:  # else every client refused: nothing to put on a log axis
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels on minor ticks overlap within a decade
    ax.set_xlabel("cumulative uplink bytes (all clients)")
    ax.set_ylabel("global test accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(
        "accuracy vs bytes sent up (band: 95% interval over seeds;\ndotted: round 0, before any upload)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_seeds(seeds: list[list[dict[str, Any]]], path: Path, title: str = "") -> Path:
    """Global accuracy per round: each seed thin, the mean bold, the 95% interval of the mean as a band."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for recs in seeds:
        ax.plot([r["round"] for r in recs], [r["global_accuracy"] for r in recs], color="grey", alpha=0.4, lw=0.8)
    mean, lo, hi = _band(seeds, "global_accuracy")
    rounds = [r["round"] for r in seeds[0][: len(mean)]]
    ax.plot(rounds, mean, color="C0", lw=2, label=f"mean of {len(seeds)} seeds")
    ax.fill_between(rounds, lo, hi, color="C0", alpha=0.25, linewidth=0, label="95% interval of the mean")
    ax.set_xlabel("round")
    _integer_ticks(ax)
    ax.set_ylabel("global test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_memory(report, path) -> Path:
    """Per-layer memory of one training step (forward and backward peaks) with the SRAM budget line."""
    plt = _pyplot()

    rows = report.layers
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 4))
    ax.bar([i - 0.2 for i in x], [r.forward_peak_bytes / 1024 for r in rows], 0.4, label="forward peak")
    ax.bar([i + 0.2 for i in x], [r.backward_peak_bytes / 1024 for r in rows], 0.4, label="backward peak")
    if report.sram_bytes:
        ax.axhline(report.sram_bytes / 1024, color="red", linestyle="--", label=f"{report.device} SRAM")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("kB live")
    ax.set_title(f"{report.scheme}: peak {report.peak_sram_bytes / 1024:.1f} kB at {report.peak_at}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def privacy_groups(summaries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Method -> the group its attacked updates are pooled in by size: precision, and the DP kind apart
    (DP noise makes a change large without carrying the gradient)."""
    return {
        n: s.get("precision", "") + (f" + {s['dp']} DP" if s.get("dp", "none") != "none" else "")
        for n, s in summaries.items()
    }


def privacy_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown table of leakage and cost per method of a sweep (mean ± 95% half-interval over seeds).

    Columns for the aggregate observer appear when some method attacked an aggregate, and
    epsilon when some method ran with differential privacy.
    """
    agg = any(s.get("privacy_aggregate_mean_psnr_db") is not None for s in summaries.values())
    dp = any(s.get("dp_epsilon") is not None for s in summaries.values())
    trap = any(s.get("privacy_oracle_psnr_db") is not None for s in summaries.values())
    ident = any(s.get("privacy_identification_rank") is not None for s in summaries.values())
    prior = any(s.get("privacy_prior_psnr_db") is not None for s in summaries.values())
    cols = (
        ["PSNR (dB)", "flat (dB)"]
        + (["prior (dB)"] if prior else [])
        + ["images >= 25 dB", "SSIM", "label acc.", "match cos. at truth", "change (LSB)"]
    )
    cols += ["identification rank", "identified first"] if ident else []
    member = any(s.get("privacy_membership_auc") is not None for s in summaries.values())
    cols += ["membership AUC", "membership TPR at 1% FPR"] if member else []
    cols += ["bound at true positions (dB)", "4x4 blocks leaked", "refused"] if trap else []
    cols += ["aggregate PSNR (dB)", "aggregate SSIM", "aggregate label acc."] if agg else []
    cols += ["final accuracy", "uplink bytes", "peak SRAM"] + (["epsilon"] if dp else [])
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, s in summaries.items():
        cells = [
            pm(s, "privacy_mean_psnr_db", ".2f"),
            pm(s, "privacy_flat_psnr_db", ".2f"),
            *([pm(s, "privacy_prior_psnr_db", ".2f")] if prior else []),
            pm(s, "privacy_frac_psnr_25db", ".2f"),
            pm(s, "privacy_mean_ssim", ".3f"),
            pm(s, "privacy_label_accuracy", ".2f"),
            pm(s, "privacy_match_cosine", ".3f"),
            pm(s, "privacy_change_lsb", ".3g"),
        ]
        if ident:
            cells += [pm(s, "privacy_identification_rank", ".3g"), pm(s, "privacy_identified_top1", ".2f")]
        if member:
            cells += [pm(s, "privacy_membership_auc", ".3f"), pm(s, "privacy_membership_tpr_1pct", ".3f")]
        if trap:
            cells += [
                pm(s, "privacy_oracle_psnr_db", ".2f"),
                pm(s, "privacy_leaked_blocks", ".3f"),
                pm(s, "refused_clients_total", ".3g"),
            ]
        if agg:
            cells += [
                pm(s, "privacy_aggregate_mean_psnr_db", ".2f"),
                pm(s, "privacy_aggregate_mean_ssim", ".3f"),
                pm(s, "privacy_aggregate_label_accuracy", ".2f"),
            ]
        cells += [
            pm(s, "final_accuracy"),
            f"{int(s['uplink_bytes_total']):,}",
            f"{int(s.get('peak_sram_bytes_max', 0)):,}" if s.get("peak_sram_bytes_max") else "-",
        ]
        if dp:
            cells.append("inf (no DP)" if s.get("dp_epsilon") is None else format(s["dp_epsilon"], ".3g"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = max(len(s.get("seeds", [])) or 1 for s in summaries.values())
    if seeds > 1:
        lines.append(f"\nMean over {seeds} seeds ± half-width of the 95% interval of the mean.")
    lines.append(
        "\nflat: PSNR of each image's own mean brightness (a reconstruction at or below it shows nothing "
        "recognisable); prior: PSNR of the mean of the server's public images, its guess without any update; "
        "images >= 25 dB: share of attacked images rebuilt at 25 dB or more; identification rank: "
        "where the attacked image ranks among the federation's images (up to 500) by its distance to what "
        "the attack rebuilt (1: it is the closest; an imprint ranks by its blocks, positions unknown); "
        "membership: was a candidate among an update's training images? each candidate's own update, made "
        "by the same client code, against the observed ones (cosine), the attacked clients' images against "
        "up to 32 test images; a client that refused sent nothing to attack."
    )
    return "\n".join(lines)


def _seeds_cell(values: list[float], fmt: str) -> str:
    """One figure over seeds: ``mean ± half-width`` of the 95% interval; the value alone for one seed."""
    if not values:
        return "-"
    lo, hi = interval95(values)
    mean = float(np.mean(values))
    return format(mean, fmt) if len(values) < 2 else f"{mean:{fmt}} ± {(hi - lo) / 2:{fmt}}"


def privacy_rounds_table(
    reports: dict[str, list[dict[str, Any]]], accuracy: dict[str, list[dict[int, float]]] | None = None
) -> str:
    """Markdown: each method's client attacks split by the round they were made in.

    ``reports``: method -> its runs' ``privacy.json`` (one per seed); ``accuracy``: method -> per
    seed, round -> global accuracy. A row is one (method, round): the accuracy of the model the
    clients received (the global model after the previous round), the mean |sent change| in LSB,
    the match cosine at the truth, PSNR, SSIM and label accuracy; each the mean over the round's
    attacked clients of one seed, then the mean ± half-width of the 95% interval over seeds.
    """
    keys = (
        ("change_lsb", ".3g"),
        ("match_cosine_at_truth", ".3f"),
        ("mean_psnr_db", ".2f"),
        ("mean_ssim", ".3f"),
        ("label_accuracy", ".2f"),
    )
    cols = ["received model's accuracy", "change (LSB)", "match cos. at truth", "PSNR (dB)", "SSIM", "label acc."]
    lines = ["| method | round | " + " | ".join(cols) + " |", "| --- | ---: |" + " ---: |" * len(cols)]
    for name, runs in reports.items():
        rounds = sorted({a["round"] for rep in runs for a in rep.get("attacks", []) if a.get("observed") == "client"})
        for r in rounds:
            per_seed = [
                [
                    a
                    for a in rep.get("attacks", [])
                    if a.get("observed") == "client" and a["round"] == r and a.get("mean_psnr_db") is not None
                ]
                for rep in runs
            ]
            per_seed = [atk for atk in per_seed if atk]
            accs = [seed_acc[r - 1] for seed_acc in (accuracy or {}).get(name, []) if r - 1 in seed_acc]
            cells = [_seeds_cell(accs, ".4f")]
            cells += [
                _seeds_cell(
                    [float(np.mean([a[k] for a in atk])) for atk in per_seed if all(a.get(k) is not None for a in atk)],
                    fmt,
                )
                for k, fmt in keys
            ]
            lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LSB_BINS = (0.0, 0.01, 0.1, 0.3, 1.0, 3.0, float("inf"))
REBUILT_DB = 20.0  # on 8x8 digits the attacks are all or nothing: rebuilt ones score 20-40 dB, failed ones 5-10


def privacy_lsb_table(reports: dict[str, list[dict[str, Any]]], precision: dict[str, str]) -> str:
    """Markdown: attacked client updates pooled by what was attacked and by the size of what they sent, in LSB.

    ``reports``: method -> its runs' ``privacy.json``, the i-th of every method from the same seed;
    ``precision``: method -> its precision label (e.g. ``"int8"`` or ``"int8 + local DP"``). Updates are
    pooled by (precision, the attack's method, the client's batch of images), so a weaker attack or a
    larger batch does not dilute the others. Per group and LSB bin: the number of attacked updates, and
    per seed the mean PSNR and the share rebuilt (PSNR >= :data:`REBUILT_DB`), then mean ± half-width
    of the 95% interval over the seeds that have updates there (a single seed's value alone).
    """
    seeds = max((len(runs) for runs in reports.values()), default=0)
    # (group, bin) -> seed -> PSNRs
    cells: dict[tuple[str, int], dict[int, list[float]]] = {}
    for name, runs in reports.items():
        for i, rep in enumerate(runs):
            for a in rep.get("attacks", []):
                if a.get("observed") != "client" or a.get("mean_psnr_db") is None or a.get("change_lsb") is None:
                    continue
                group = f"{precision.get(name, '')}, {rep.get('method', '?')}, batch {a.get('images', '?')}"
                b = int(np.searchsorted(LSB_BINS, a["change_lsb"], side="right")) - 1
                cells.setdefault((group, b), {}).setdefault(i, []).append(a["mean_psnr_db"])
    lines = [
        f"| updates of | mean sent change (LSB) | updates | seeds | PSNR (dB) | rebuilt (>= {REBUILT_DB:g} dB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (group, b), by_seed in sorted(cells.items()):
        lo, hi = LSB_BINS[b], LSB_BINS[b + 1]
        per_seed = [by_seed[i] for i in range(seeds) if i in by_seed]
        span = f"< {hi:g}" if lo == 0 else (f">= {lo:g}" if hi == float("inf") else f"{lo:g} - {hi:g}")
        lines.append(
            f"| {group} | {span} | {sum(map(len, per_seed))} | {len(per_seed)} | "
            f"{_seeds_cell([float(np.mean(p)) for p in per_seed], '.2f')} | "
            f"{_seeds_cell([float(np.mean(np.asarray(p) >= REBUILT_DB)) for p in per_seed], '.2f')} |"
        )
    return "\n".join(lines)


PRIVACY_PLOTS = {  # file: (x figure, x label, log x)
    "psnr_vs_uplink.png": ("uplink_bytes_total", "uplink bytes (total)", True),
    "psnr_vs_accuracy.png": ("final_accuracy", "final accuracy of the federation", False),
}


def plot_attacks_vs_lsb(reports: dict[str, list[dict[str, Any]]], precision: dict[str, str], path: Path) -> Path:
    """Every attacked update's PSNR against the size of what it sent, in LSB: one point per attack.

    ``reports``: method -> its runs' ``privacy.json`` (one per seed). The x axis is the mean
    |sent weight change| in LSB (an fp32 model's LSB is the one per-channel int8 quantization would
    give it), so fp32 (hollow) and int8 (filled) updates of one size sit together: where int8's
    points stay at a random image's PSNR while fp32's climb, rounding is what protects.
    """
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>p"
    for i, (name, runs) in enumerate(reports.items()):
        pts = [
            (a["change_lsb"], a["mean_psnr_db"])
            for rep in runs
            for a in rep.get("attacks", [])
            if a.get("mean_psnr_db") is not None and a.get("change_lsb") and a.get("observed") == "client"
        ]
        if not pts:
            continue
        c = colors[i % 20]
        ax.scatter(
            *zip(*pts),
            s=18,
            color=c,
            marker=markers[i % len(markers)],
            label=name,
            facecolors="none" if precision.get(name) == "fp32" else c,
        )
    if ax.get_legend_handles_labels()[0]:  # an attack that records no update size (the imprint) draws nothing
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_xscale("log")
    ax.set_xlabel("mean |sent weight change| in LSB (fp32: per-channel max|w| / 127)")
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("leakage vs the update's size in LSB (one point per attacked client)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_privacy(
    summaries: dict[str, dict[str, Any]],
    path: Path,
    x_key: str = "uplink_bytes_total",
    xlabel: str = "uplink bytes (total)",
    logx: bool = True,
) -> Path:
    """Reconstruction PSNR against one of the run's figures, a point per method with its seeds' interval.

    fp32 methods are drawn hollow, int8 filled, so the precision reads at a glance.
    """
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>p"
    points = [
        (n, s) for n, s in summaries.items() if s.get("privacy_mean_psnr_db") is not None and s.get(x_key) is not None
    ]

    def err(s, key):
        if f"{key}_ci95" not in s:
            return None
        lo, hi = s[f"{key}_ci95"]
        return [[s[key] - lo], [hi - s[key]]]

    for i, (name, s) in enumerate(points):  # a legend, not labels: nearby points would overlap
        c = colors[i % 20]
        ax.errorbar(
            s[x_key],
            s["privacy_mean_psnr_db"],
            yerr=err(s, "privacy_mean_psnr_db"),
            xerr=err(s, x_key),
            color=c,
            marker=markers[i % len(markers)],
            mfc="none" if s.get("precision") == "fp32" else c,
            linestyle="none",
            capsize=2,
            label=name,
        )
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(points) <= 25 else 2)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reconstruction PSNR (dB)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("leakage vs " + xlabel.split(" (")[0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_contributions(contrib, path: Path) -> Path:
    """Heat map of the contribution analysis: convolutions x channel ratios, plus the bias grid."""
    plt = _pyplot()

    gains = np.array(contrib.weight_gain) * 100
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(8, max(3, len(gains) * 0.16 + 1.5)), gridspec_kw={"width_ratios": [len(contrib.ratios), 2]}
    )
    lim = max(float(np.abs(gains).max()), 1e-6)
    im = ax.imshow(gains, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(contrib.ratios)), [f"{r:g}" for r in contrib.ratios])
    ax.set_xlabel("share of input channels trained")
    ax.set_ylabel("convolution (forward order)")
    ax.set_title("weight contribution (accuracy points)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    bx.plot(contrib.bias_grid, np.array(contrib.bias_gain) * 100, marker="o")
    bx.axhline(0, color="gray", linewidth=0.5)
    bx.set_xlabel("biases of the last k convolutions")
    bx.set_title("bias contribution", fontsize=9)
    fig.suptitle(f"contribution over the classifier alone ({contrib.baseline_accuracy:.4f})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
