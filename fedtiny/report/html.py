"""One self-contained HTML page of a run folder or a sweep folder (``fedtiny report``).

A report reads the folder's own files only: each run's ``scenario.toml``, ``metrics.jsonl``,
``summary.json``, ``privacy.json`` and ``reconstructions.png``. Figures are drawn again from the
records by :mod:`fedtiny.report.plots`, and a sweep's tables are computed again from its runs'
summaries by :mod:`fedtiny.report.sweep` (the functions ``fedtiny run`` uses), so a page, a table
and the runs behind them cannot disagree. Every image is a base64 PNG inside the page and the
style sheet is inline: the page is one file that can be mailed or attached as it is.

A run folder has ``metrics.jsonl``. A sweep folder has the sweep's ``scenario.toml`` over its run
folders: ``<method>/seed<k>/`` (or ``<method>/``) with ``[methods.*]``, ``seed<k>/`` without.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any, Callable

from fedtiny.errors import FedtinyError
from fedtiny.report.plots import (
    PRIVACY_PLOTS,
    plot_attacks_vs_lsb,
    plot_memory,
    plot_methods,
    plot_privacy,
    plot_run,
    plot_seeds,
    privacy_groups,
    privacy_lsb_table,
    privacy_rounds_table,
    privacy_table,
)
from fedtiny.report.sweep import MEAN_KEYS, combine_seeds, paired_table, pm, sweep_table

__all__ = [
    "ReportError",
    "Sweep",
    "folder_kind",
    "read_sweep",
    "sweep_summaries",
    "sweep_tables",
    "run_tables",
    "report_tables",
    "run_memory",
    "run_report",
    "sweep_report",
    "write_report",
]

REPORT = "report.html"
FOLD = 24  # rows of a per-client or per-round table shown before it folds
RECONSTRUCTIONS_SHOWN = 16  # fedtiny.attack.run.plot_grid draws the first 16 attacked images


class ReportError(FedtinyError):
    """A folder is not a run or sweep folder, or lacks what its report needs."""


# ---------------------------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class Sweep:
    """A sweep folder's run folders.

    Attributes
    ----------
    root
        The sweep folder (its ``scenario.toml`` is the sweep's).
    name
        ``run.name`` of the sweep's scenario.
    methods
        True for a ``[methods.*]`` sweep (a sub-folder per method), False for seeds of one scenario.
    runs
        Method (the scenario's name without methods) -> its run folders in seed order; methods in the
        scenario's order, which :func:`~fedtiny.report.sweep.paired_table` takes its reference from.
    seeded
        Method -> whether its runs are ``seed<k>`` folders to be combined over seeds.
    """

    root: Path
    name: str
    methods: bool
    runs: dict[str, tuple[Path, ...]]
    seeded: dict[str, bool]


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def _seed_of(path: Path) -> int | None:
    m = re.fullmatch(r"seed(\d+)", path.name)
    return int(m.group(1)) if m else None


def _run_folders(base: Path) -> tuple[tuple[Path, ...], bool]:
    """``base`` itself when it is a run folder, else its ``seed<k>`` run folders by seed (True)."""
    if _is_run(base):
        return (base,), False
    if not base.is_dir():
        return (), False
    seeds = sorted((p for p in base.iterdir() if _seed_of(p) is not None and _is_run(p)), key=_seed_of)
    return tuple(seeds), True


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: invalid TOML ({exc})") from None


def read_sweep(path: str | Path) -> Sweep:
    """The run folders of the sweep folder ``path``.

    The layout is the one ``fedtiny run`` writes: read from the sweep's ``scenario.toml`` as plain
    TOML (not validated, so a sweep written before a key was renamed still reads). Methods or seeds
    that were not run (``--method``, a stopped sweep) are left out.

    Raises
    ------
    ReportError
        When ``path`` has no ``scenario.toml`` or no run folder where the scenario puts them.
    """
    root = Path(path)
    raw = _read_toml(root / "scenario.toml")
    names = list(raw.get("methods", {}))
    name = str(raw.get("run", {}).get("name", root.name))
    bases = {m: root / m for m in names} if names else {name: root}
    runs, seeded = {}, {}
    for method, base in bases.items():
        found, by_seed = _run_folders(base)
        if found and (names or by_seed):  # without methods the root itself would be a run folder
            runs[method], seeded[method] = found, by_seed
    if not runs:
        where = "<method>/seed<k>/ or <method>/" if names else "seed<k>/"
        raise ReportError(
            f"{root}: a scenario.toml but no run folders under it (expected {where} folders with metrics.jsonl)"
        )
    return Sweep(root, name, bool(names), runs, seeded)


def folder_kind(path: str | Path) -> str:
    """``"run"`` or ``"sweep"``: what ``path`` holds.

    Raises
    ------
    ReportError
        When ``path`` is missing, not a folder, or neither kind; the message names it.
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such folder")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; give a run folder or a sweep folder")
    if _is_run(path):
        return "run"
    if (path / "scenario.toml").is_file():
        read_sweep(path)
        return "sweep"
    hint = ""
    if (path.parent / "scenario.toml").is_file() and _run_folders(path)[0]:
        hint = f" (it holds seed folders: give one of them, or the sweep folder {path.parent})"
    raise ReportError(
        f"{path}: not a run folder (no metrics.jsonl) nor a sweep folder (no scenario.toml over run folders){hint}"
    )


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None  # a run still going, or stopped before its end
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def sweep_summaries(sweep: Sweep) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Each method's summary as ``fedtiny run`` makes it, from its runs' ``summary.json``.

    Seeded methods are combined by :func:`~fedtiny.report.sweep.combine_seeds`; a method run once
    keeps its run's summary. Returns the summaries and the run folders left out for having no
    ``summary.json`` (unfinished runs).
    """
    out, missing = {}, []
    for method, folders in sweep.runs.items():
        runs = []
        for d in folders:
            s = _summary(d)
            if s is None:
                missing.append(d)
            else:
                runs.append(s)
        if runs:
            out[method] = combine_seeds(runs) if sweep.seeded[method] else runs[0]
    return out, missing


def _attacked(summaries: dict[str, dict[str, Any]]) -> bool:
    return any(s.get("privacy_mean_psnr_db") is not None for s in summaries.values())


def sweep_tables(summaries: dict[str, dict[str, Any]], methods: bool = True) -> dict[str, str]:
    """The markdown tables of a sweep: ``sweep`` (the table of ``table.md``), ``paired`` (differences to the
    first method, seed by seed; methods with seeds only) and ``privacy`` (when the runs were attacked)."""
    tables = {"sweep": sweep_table(summaries)}
    paired = paired_table(summaries) if methods else ""
    if paired:
        tables["paired"] = paired
    if _attacked(summaries):
        tables["privacy"] = privacy_table(summaries)
    return tables


def run_tables(run_dir: str | Path) -> dict[str, str]:
    """A single run's row of the sweep tables (and the privacy table when it was attacked)."""
    run_dir = Path(run_dir)
    summary = _summary(run_dir)
    if summary is None:
        raise ReportError(f"{run_dir}: no summary.json (the run has not finished)")
    return sweep_tables({summary.get("name", run_dir.name): summary}, methods=False)


def report_tables(path: str | Path) -> tuple[dict[str, str], list[Path]]:
    """The markdown tables of a run or sweep folder, and the unfinished runs left out of them."""
    if folder_kind(path) == "run":
        return run_tables(path), []
    sweep = read_sweep(path)
    summaries, missing = sweep_summaries(sweep)
    if not summaries:
        raise ReportError(f"{path}: none of its runs has a summary.json (none has finished)")
    return sweep_tables(summaries, sweep.methods), missing


# ---------------------------------------------------------------------------------------------- memory

_MEMORY: dict[str, list] = {}  # a sweep's seeds share their model's shapes: plan each once per process


def run_memory(run_dir: str | Path, summary: dict[str, Any]) -> list:
    """The memory planner's report of one training step per device profile, under the scheme it trained.

    The scheme of each profile is the one the server resolved (``summary.json``'s
    ``schemes_by_device``, channels named); the model is rebuilt from the run's
    ``scenario.toml`` (its shapes are what the planner needs, not its trained values).

    Raises
    ------
    FedtinyError
        When the scenario cannot be rebuilt here (data or model file missing, a key renamed since)
        or the run trained an fp32 network (the planner counts int8 graphs).
    """
    # torch and the scenario take 3-5 s to load: a tables-only report (fedtiny report --table) needs neither
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.federated.task import client_profile, make_task, with_scheme  # the same start-up cost
    from fedtiny.scenario import load_scenario  # the same start-up cost

    scenario = load_scenario(Path(run_dir) / "scenario.toml")
    if scenario.model.precision != "int8":
        raise ReportError("the clients trained an fp32 network; the memory planner counts int8 graphs")
    by_device = summary.get("schemes_by_device") or {}
    if not by_device:
        raise ReportError("summary.json names no scheme per device (schemes_by_device)")
    shape = {k: v for k, v in scenario.to_dict().items() if k not in ("run", "methods", "attack")}
    key = json.dumps([shape, scenario.run.clients, by_device], sort_keys=True, default=str)
    if key not in _MEMORY:
        profiles = {}
        for p in range(min(scenario.run.clients, len(scenario.device.profiles))):
            prof = client_profile(scenario, p)
            profiles.setdefault(prof.name, prof)
        task = make_task(scenario)
        reports = []
        for device, entry in by_device.items():
            if device not in profiles:
                continue
            # The entry is ResolvedScheme.to_dict() plus its one-line summary, which a scheme file does not hold.
            scheme = parse_scheme(json.dumps({k: v for k, v in entry.items() if k != "scheme"}))
            resolved = resolve(scheme, task.model, scenario.run.seed)
            reports.append(with_scheme(task, resolved).memory(profiles[device]))
        _MEMORY[key] = reports
    return _MEMORY[key]


# ---------------------------------------------------------------------------------------------- html

CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1f2328;
 background:#eef1f4}
main{max-width:1200px;margin:0 auto;padding:22px 32px 60px;background:#fff;min-height:100vh}
h1{font-size:1.55em;margin:0 0 2px}
.sub{color:#57606a;margin:0 0 10px;font-size:.92em}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #d0d7de;padding:7px 0;font-size:.9em;z-index:2;
display:flex;flex-wrap:wrap;row-gap:4px}
nav a{margin-right:16px;color:#0969da;text-decoration:none;white-space:nowrap}
section{margin-top:26px}
h2{font-size:1.22em;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin:0 0 10px}
h3{font-size:1.02em;margin:18px 0 6px}
p{margin:6px 0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.86em;margin:6px 0 10px}
table.dense{font-size:.74em}
table.dense th,table.dense td{padding:2px 5px}
th,td{border:1px solid #d0d7de;padding:3px 8px;vertical-align:top}
th{background:#f3f5f7;text-align:left;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.k{white-space:nowrap}
.indent{padding-left:1.4em;display:inline-block}
tbody tr:nth-child(even) td{background:#fafbfc}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:10px;margin:6px 0 10px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;background:#fcfdfe}
.card .l{color:#57606a;font-size:.82em}
.card .v{font-size:1.35em;font-weight:600;font-variant-numeric:tabular-nums}
.card .s{color:#57606a;font-size:.8em}
.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px;margin:8px 0}
figure{margin:0}
.figs.one{grid-template-columns:1fr}
figure img{max-width:100%;height:auto;border:1px solid #e4e8ec;display:block}
figcaption{font-size:.84em;color:#57606a;margin-top:3px}
.note{color:#57606a;font-size:.9em}
.bad{color:#cf222e;font-weight:600}
.good{color:#1a7f37;font-weight:600}
details{margin:8px 0}
summary{cursor:pointer;color:#0969da}
pre{background:#f6f8fa;border:1px solid #e4e8ec;padding:10px;overflow:auto;font-size:.8em;max-height:520px}
footer{margin-top:36px;color:#8c959f;font-size:.8em}
"""


class Html(str):
    """Markup that is already HTML (not escaped again in a table cell)."""


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


_NUMERIC = re.compile(
    r"^[-+]?(\d[\d,]*(\.\d+)?(e[-+]?\d+)?|inf|nan)( ?(±|to) ?[-+]?\d[\d,]*(\.\d+)?)?"
    r"( ?(%|x|B|kB|MB|s|dB|mJ))?$"
)


def _cell(value: Any, numbers: bool) -> str:
    if isinstance(value, Html):
        return f"<td>{value}</td>"
    text = str(value)
    if numbers and (_NUMERIC.match(text) or text in ("-", "")):
        return f'<td class="n">{_e(text)}</td>'
    # a short name (a device, "mcu-256kb") is not broken at its hyphen; a reason or a scheme may wrap
    return f'<td class="k">{_e(text)}</td>' if len(text) <= 24 else f"<td>{_e(text)}</td>"


def _table(headers: list[str], rows: list[list[Any]], *, numbers: bool = True, fold: int = 0, what: str = "") -> str:
    """A table; with ``numbers`` numeric cells are right-aligned so digits line up (a key/value table keeps
    them by their keys). Past ``fold`` rows (0: never) it opens on a click, so a large fleet does not bury
    the page."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c, numbers) for c in row) + "</tr>" for row in rows)
    dense = ' class="dense"' if len(headers) > 10 else ""  # a wide sweep table still fits the page
    table = f'<div class="scroll"><table{dense}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    return _details(f"{len(rows)} {what or 'rows'}", table) if fold and len(rows) > fold else table


def _markdown(md: str) -> str:
    """The markdown the sweep functions write (pipe tables and paragraphs) as HTML."""
    out, block = [], []

    def flush() -> None:
        if block:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
            body = [r for r in rows[1:] if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            out.append(_table(rows[0], body))
            block.clear()

    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            block.append(line)
            continue
        flush()
        if line.strip():
            out.append(f'<p class="note">{_e(line.strip())}</p>')
    flush()
    return "\n".join(out)


def _cards(items: list[tuple[str, str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div>'
            f'<div class="s">{_e(note)}</div></div>'
            for label, value, note in items
        )
        + "</div>"
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, caption: str) -> str:
    return f'<figure><img alt="{_e(caption)}" src="{_data_uri(png)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _figures(figs: list[str], *, one: bool = False) -> str:
    """Figures side by side (two per row on a wide screen), or ``one`` per row for wide ones."""
    return f'<div class="figs{" one" if one else ""}">' + "".join(figs) + "</div>" if figs else ""


def _drawn(draw: Callable[[Path], Any]) -> dict[str, bytes]:
    """The PNGs ``draw(folder)`` writes into a scratch folder, by file name."""
    with tempfile.TemporaryDirectory(prefix="fedtiny-report-") as tmp:
        draw(Path(tmp))
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).glob("*.png"))}


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _details(title: str, body: str, *, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{_e(title)}</summary>{body}</details>"


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{html}</section>' for sid, name, html in sections)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="sub">{subtitle}</p><nav>{nav}</nav>{body}'
        f"<footer>Written by fedtiny report on {stamp} from the folder's files; figures are drawn again "
        f"from metrics.jsonl.</footer></main></body></html>\n"
    )


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a browser open on the old page never reads half a file
    return path


# ---------------------------------------------------------------------------------------------- numbers


def _f(value: Any, fmt: str = ".4f") -> str:
    """``value`` formatted, ``-`` when absent."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def _kb(n: Any) -> str:
    return "-" if n is None else f"{n / 1024:,.1f} kB"


def _int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _nth(values: list[Any], i: int) -> Any:
    """``values[i]``, or None past its end (an older privacy.json lacks some per-image lists)."""
    return values[i] if i < len(values) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------- run page


def _scenario_section(folder: Path) -> str:
    path = folder / "scenario.toml"
    if not path.is_file():
        return _note("no scenario.toml in this folder")
    return _details(
        f"{path.name}: the resolved scenario (defaults and --set overrides applied)",
        f"<pre>{_e(path.read_text())}</pre>",
    )


def _headline(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    s = summary
    budgets = sorted(
        {
            c.get("sram_bytes")
            for r in records
            for c in r.get("clients", []) + r.get("refused", [])
            if c.get("sram_bytes")
        }
    )
    up8 = s.get("uplink_ratio_vs_dense_int8")
    reached = s.get("rounds_to_target")
    target = s.get("target_accuracy")
    cards = [
        (
            "global test accuracy: final",
            _f(s.get("final_accuracy")),
            f"cloud model {_f(s.get('initial_accuracy'))}, best {_f(s.get('best_accuracy'))}",
        ),
        (
            "rounds x clients per round",
            f"{s.get('rounds', '-')} x {s.get('clients_per_round', '-')}",
            f"of {s.get('num_clients', '-')} clients; seed {s.get('seed', '-')}",
        ),
        (
            "uplink (all clients, all rounds)",
            _kb(s.get("uplink_bytes_total")),
            f"{up8:.1f}x smaller than dense int8 updates" if up8 else "nothing sent",
        ),
        ("downlink (all clients, all rounds)", _kb(s.get("downlink_bytes_total")), "server -> clients"),
        (
            "peak SRAM of a training step (max)",
            _kb(s.get("peak_sram_bytes_max")) if s.get("peak_sram_bytes_max") else "not counted",
            ("device SRAM " + ", ".join(_kb(b) for b in budgets)) if budgets else "memory planner",
        ),
        (
            "device RAM of a client's round (max)",
            _kb(s.get("device_ram_bytes_max")) if s.get("device_ram_bytes_max") else "not counted",
            "the whole client: step, trained tensors, uplink state, buffers, stack",
        ),
        (
            "simulated fleet time",
            f"{_f(s.get('fleet_time_s'), '.2f')} s",
            f"reached {_f(target, '.2f')} in round {reached}"
            if reached is not None
            else f"target accuracy {_f(target, '.2f')} not reached",
        ),
        (
            "energy per client round",
            f"{_f(s.get('energy_mj_per_client_round'), '.1f')} mJ",
            f"compute {_f(s.get('compute_s_per_client_round'), '.2f')} s, "
            f"radio {_f(s.get('radio_s_per_client_round'), '.2f')} s",
        ),
        (
            "rejected / refused / stragglers / faults",
            " / ".join(
                _f(s.get(k), "d")
                for k in ("rejected_updates_total", "refused_clients_total", "stragglers_total", "faults_total")
            ),
            "updates over the run",
        ),
        ("wall time of the simulation", f"{_f(s.get('wall_time_s'), '.1f')} s", "on this host"),
    ]
    if s.get("dp", "none") != "none":
        cards.append(
            (
                "differential privacy",
                f"ε = {_f(s.get('dp_epsilon'), '.3g')}",
                f"{s['dp']} DP, δ = {_f(s.get('dp_delta'), 'g')}, {s.get('dp_releases', 0)} releases",
            )
        )
    setup = [
        ("precision", s.get("precision")),
        ("optimizer", s.get("optimizer")),
        ("learning rate", f"{_f(s.get('lr'), 'g')} ({s.get('lr_source', '-')})"),
        ("scheme", s.get("scheme")),
        ("channels", s.get("channels")),
        ("model parameters", _int(s.get("model_parameters"))),
        (
            "cloud model: fp32 / after int8 PTQ",
            f"{_f(s.get('cloud_fp32_accuracy'))} / {_f(s.get('cloud_ptq_accuracy'))}",
        ),
    ]
    for device, entry in (s.get("schemes_by_device") or {}).items():
        setup.append((f"scheme on {device}", entry.get("scheme", entry.get("id", "-"))))
    rows = [[k, _f(v)] for k, v in setup if v is not None]
    everything = [
        [k, json.dumps(v) if isinstance(v, (dict, list)) else _f(v, "g")]
        for k, v in sorted(s.items())
        if k != "schemes_by_device"
    ]
    return (
        _cards(cards)
        + _table(["setting", "value"], rows, numbers=False)
        + _details("every figure of summary.json", _table(["key", "value"], everything, numbers=False))
    )


def _round_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in records:
        clients = r.get("clients", [])
        faults = sum(len(v) for v in (r.get("faults") or {}).values())
        rows.append(
            [
                r["round"],
                _f(r.get("global_accuracy")),
                _f(r.get("global_loss")),
                _f(_mean([c.get("test_accuracy") for c in clients if c.get("test_accuracy") is not None])),
                _int(r.get("uplink_bytes", 0)),
                _int(r.get("downlink_bytes", 0)),
                len(clients),
                len(r.get("rejected", [])),
                len(r.get("refused", [])),
                len(r.get("stragglers", [])),
                faults,
                _f(r.get("round_time_s"), ".3f"),
                _f(r.get("fleet_time_s"), ".3f"),
            ]
        )
    return rows


ROUND_HEADERS = [
    "round",
    "global accuracy",
    "global loss",
    "clients' local test acc. (mean)",
    "uplink (B)",
    "downlink (B)",
    "accepted",
    "rejected",
    "refused",
    "stragglers",
    "faults",
    "round time (s, sim)",
    "fleet time (s, sim)",
]


def _accuracy_section(figs: dict[str, bytes]) -> str:
    out = [
        _figure(figs[name], caption)
        for name, caption in (
            ("accuracy.png", "Global test accuracy per round (round 0: the cloud model the clients start from)."),
            (
                "accuracy_vs_fleet_time.png",
                "The same against simulated fleet time: each round lasts as long as "
                "its slowest counted client (or the deadline).",
            ),
            ("accuracy_vs_uplink.png", "Accuracy against cumulative uplink bytes (all clients)."),
        )
        if name in figs
    ]
    return _figures(out) if out else _note("no rounds recorded")


def _bytes_section(figs: dict[str, bytes], records: list[dict[str, Any]]) -> str:
    fig = (
        _figures(
            [
                _figure(
                    figs["bytes.png"],
                    "Bytes on the radio per round, all clients: uplink (updates) "
                    "and downlink (models or their changes); 1 kB = 1024 B.",
                )
            ]
        )
        if "bytes.png" in figs
        else ""
    )
    return fig + _h3("Per round") + _table(ROUND_HEADERS, _round_rows(records), fold=FOLD, what="rounds")


def _h3(text: str) -> str:
    return f"<h3>{_e(text)}</h3>"


def _memory_section(run_dir: Path, summary: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    if summary is None:
        return _note("Memory not computed: no summary.json (the schemes the server resolved are recorded there).")
    try:
        reports = run_memory(run_dir, summary)
    except (FedtinyError, OSError) as exc:
        return _note(f"Memory not computed: {exc}")
    if not reports:
        return _note("Memory not computed: no device profile of the scenario trained a recorded scheme.")
    reported: dict[int, int] = {}  # device SRAM -> largest peak the clients reported
    for r in records:
        for c in r.get("clients", []) + r.get("refused", []):
            if c.get("sram_bytes"):
                reported[c["sram_bytes"]] = max(reported.get(c["sram_bytes"], 0), c.get("peak_sram_bytes", 0))
    out = [
        _note(
            "One training step of the scheme each device profile trained, from the memory planner "
            "(docs/memory.md): live bytes at each op's forward and backward peak, against the device's "
            "SRAM. Frozen weights stay in flash."
        )
    ]
    for rep in reports:
        png = _drawn(lambda d, rep=rep: plot_memory(rep, d / "memory.png"))["memory.png"]
        verdict = Html(f'<span class="{"good" if rep.fits else "bad"}">{_e(rep.reason())}</span>')
        client_peak = reported.get(rep.sram_bytes)
        rows = [
            ["device", f"{rep.device} ({_kb(rep.sram_bytes)} SRAM, {_kb(rep.device_flash_bytes)} flash)"],
            ["scheme", rep.scheme],
            ["peak SRAM", f"{rep.peak_sram_bytes:,} B"],
            ["peak at", rep.peak_at],
            ["peak the clients reported", "-" if client_peak is None else f"{client_peak:,} B"],
            ["arena (all but persistent and input)", f"{rep.arena_bytes:,} B"],
            ["saved for backward", f"{rep.saved_for_backward_bytes:,} B"],
            ["persistent (trained parameters, optimizer)", f"{rep.persistent_bytes:,} B"],
            # the persistent parts (and accumulators); saved_for_backward has its own row above
            *[
                [Html(f'<span class="indent">{_e(k.replace("_", " "))}</span>'), f"{v:,} B"]
                for k, v in rep.breakdown.items()
                if k != "saved_for_backward"
            ],
            ["flash (frozen and trained weights)", f"{rep.flash_bytes:,} B"],
            ["MACs of a step (forward + backward)", f"{rep.macs_forward:,} + {rep.macs_backward:,}"],
            ["verdict", verdict],
        ]
        out.append(_h3(f"{rep.device}: {rep.scheme}"))
        out.append(
            _figures(
                [_figure(png, f"Per-layer memory of one step on {rep.device} (kB live; dashed: the device's SRAM).")],
                one=True,
            )
        )
        out.append(_table(["", "value"], rows, numbers=False))
    return "".join(out)


def _device_names(run_dir: Path) -> Callable[[int], str] | None:
    """Partition id -> its device profile's name, from the run's scenario (None when it does not load)."""
    # torch and the scenario take 3-5 s to load: a tables-only report (fedtiny report --table) needs neither
    from fedtiny.federated.task import client_profile
    from fedtiny.scenario import load_scenario  # the same start-up cost

    try:
        scenario = load_scenario(run_dir / "scenario.toml")
    except FedtinyError:
        return None
    return lambda pid: client_profile(scenario, pid).name


def _clients_section(run_dir: Path, records: list[dict[str, Any]]) -> str:
    rounds = [r for r in records if r["round"] > 0]
    if not rounds:
        return _note("no training round recorded")
    device = _device_names(run_dir) or (lambda pid: "-")
    last = rounds[-1]
    status = {c["partition_id"]: "accepted" for c in last.get("clients", [])}
    rows = []
    for c in last.get("clients", []):
        rows.append(
            [
                c["partition_id"],
                device(c["partition_id"]),
                "accepted",
                _f(c.get("num_examples"), "d"),
                _f(c.get("steps"), "d"),
                _f(c.get("train_loss")),
                _f(c.get("train_accuracy")),
                _f(c.get("test_accuracy")),
                _int(c.get("uplink_bytes")),
                _int(c.get("downlink_bytes")),
                c.get("downlink_kind") or "-",
                _int(c.get("peak_sram_bytes")),
                _int(c.get("device_ram_bytes")),
                _f(c.get("compute_s"), ".3f"),
                _f(c.get("radio_s"), ".3f"),
                _f(c.get("energy_mj"), ".2f"),
            ]
        )
    for kind in ("refused", "rejected", "stragglers"):
        for c in last.get(kind, []):
            if c["partition_id"] not in status:
                status[c["partition_id"]] = kind
                rows.append(
                    [
                        c["partition_id"],
                        c.get("device") or device(c["partition_id"]),
                        kind.rstrip("s"),
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        _int(c.get("peak_sram_bytes")),
                        _int(c.get("device_ram_bytes")),
                        _f(c.get("seconds"), ".3f"),
                        "-",
                        _f(c.get("energy_mj"), ".2f"),
                    ]
                )
    rows.sort(key=lambda row: row[0])
    headers = [
        "partition",
        "device",
        "status",
        "examples",
        "steps",
        "train loss",
        "train acc.",
        "local test acc.",
        "uplink (B)",
        "downlink (B)",
        "downlink kind",
        "peak SRAM (B)",
        "device RAM (B)",
        "compute (s, sim)",
        "radio (s, sim)",
        "energy (mJ)",
    ]
    return (
        _h3(f"Round {last['round']} (the last)")
        + _table(headers, rows, fold=FOLD, what="clients")
        + _h3("Over the run")
        + _table(
            [
                "partition",
                "device",
                "rounds sampled",
                "accepted",
                "refused",
                "rejected",
                "stragglers",
                "examples (sum)",
                "uplink (B)",
                "downlink (B)",
                "last local test acc.",
                "peak SRAM (B)",
            ],
            _over_run(rounds, device),
            fold=FOLD,
            what="clients",
        )
    )


def _over_run(rounds: list[dict[str, Any]], device: Callable[[int], str]) -> list[list[Any]]:
    """Per client over every round: how often it was accepted, refused, rejected or late, and its totals."""
    acc: dict[int, dict[str, Any]] = {}
    for r in rounds:
        for kind in ("clients", "refused", "rejected", "stragglers"):
            for c in r.get(kind, []):
                a = acc.setdefault(
                    c["partition_id"],
                    {
                        "clients": 0,
                        "refused": 0,
                        "rejected": 0,
                        "stragglers": 0,
                        "examples": 0,
                        "up": 0,
                        "down": 0,
                        "test": None,
                        "peak": 0,
                    },
                )
                a[kind] += 1
                a["peak"] = max(a["peak"], c.get("peak_sram_bytes", 0))
                if kind == "clients":
                    a["examples"] += c.get("num_examples") or 0
                    a["up"] += c.get("uplink_bytes", 0)
                    a["down"] += c.get("downlink_bytes", 0)
                    a["test"] = c.get("test_accuracy", a["test"])
    return [
        [
            pid,
            device(pid),
            sum(a[k] for k in ("clients", "refused", "rejected", "stragglers")),
            a["clients"],
            a["refused"],
            a["rejected"],
            a["stragglers"],
            _int(a["examples"]),
            _int(a["up"]),
            _int(a["down"]),
            _f(a["test"]),
            _int(a["peak"]),
        ]
        for pid, a in sorted(acc.items())
    ]


def _faults_section(summary: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    s = summary or {}
    kinds = s.get("faults_by_kind") or {}
    cards = _cards(
        [
            (
                "faults injected",
                _f(s.get("faults_total"), "d"),
                ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) or "none",
            ),
            ("stragglers (past the deadline)", _f(s.get("stragglers_total"), "d"), "dropped by the server"),
            ("rejected updates", _f(s.get("rejected_updates_total"), "d"), "failed decoding or screening"),
            ("refused (step does not fit)", _f(s.get("refused_clients_total"), "d"), "sent nothing, by design"),
            (
                "clients awake per round (mean)",
                _f(s.get("clients_awake_mean"), ".1f"),
                f"{_f(s.get('clients_sampled_total'), 'd')} sampled over the run",
            ),
        ]
    )
    events = []
    for r in records:
        for c in r.get("rejected", []):
            events.append([r["round"], c["partition_id"], "rejected", c.get("reason", "")])
        for c in r.get("refused", []):
            events.append([r["round"], c["partition_id"], "refused", c.get("reason", "")])
        for c in r.get("stragglers", []):
            events.append(
                [r["round"], c["partition_id"], "straggler", f"{c.get('seconds', 0):.3f} s of simulated work"]
            )
        for kind, pids in (r.get("faults") or {}).items():
            events.extend([r["round"], pid, f"fault: {kind}", "injected by the simulation"] for pid in pids)
    events.sort(key=lambda e: (e[0], e[1]))
    table = (
        _table(["round", "partition", "event", "why"], events, fold=FOLD, what="events")
        if events
        else _note("No client was rejected, refused, late or faulty in any round.")
    )
    return cards + table


def _privacy_section(run_dir: Path) -> str:
    path = run_dir / "privacy.json"
    rep = json.loads(path.read_text())
    cards = [
        (
            "mean PSNR of the reconstructions",
            f"{_f(rep.get('mean_psnr_db'), '.2f')} dB",
            f"attack: {rep.get('method', '-')}",
        ),
        (
            "flat baseline (each image's mean)",
            f"{_f(rep.get('mean_flat_psnr_db'), '.2f')} dB",
            "at or below it: nothing recognisable",
        ),
        ("mean SSIM", _f(rep.get("mean_ssim"), ".3f"), "1 = identical"),
        ("images rebuilt at >= 25 dB", _f(rep.get("frac_psnr_25db"), ".2f"), "share of attacked images"),
        ("label accuracy", _f(rep.get("label_accuracy"), ".2f"), f"labels: {rep.get('labels', '-')}"),
    ]
    if rep.get("oracle_mean_psnr_db") is not None:
        cards.append(
            (
                "bound: blocks at their true positions",
                f"{_f(rep['oracle_mean_psnr_db'], '.2f')} dB",
                f"4x4 blocks leaked: {_f(rep.get('leaked_blocks'), '.3f')}",
            )
        )
    out = [_cards(cards)]
    png = run_dir / "reconstructions.png"
    if png.is_file():
        out.append(
            _figures(
                [
                    _figure(
                        png.read_bytes(),
                        "Targets (top) above their reconstructions (bottom), with "
                        "each reconstruction's PSNR: the first images of the table below, in its "
                        "order.",
                    )
                ],
                one=True,
            )
        )
    attacks = [a for a in rep.get("attacks", []) if a.get("mean_psnr_db") is not None]
    out.append(_h3("Per attacked update"))
    out.append(
        _table(
            [
                "round",
                "observed",
                "partition",
                "images",
                "PSNR (dB)",
                "flat (dB)",
                "SSIM",
                "label acc.",
                "change (LSB)",
                "match cos. at truth",
                "bound (dB)",
                "blocks leaked",
            ],
            [
                [
                    a.get("round"),
                    a.get("observed"),
                    a.get("partition_id", "-"),
                    a.get("images"),
                    _f(a.get("mean_psnr_db"), ".2f"),
                    _f(a.get("mean_flat_psnr_db"), ".2f"),
                    _f(a.get("mean_ssim"), ".3f"),
                    _f(a.get("label_accuracy"), ".2f"),
                    _f(a.get("change_lsb"), ".3g"),
                    _f(a.get("match_cosine_at_truth"), ".3f"),
                    _f(a.get("oracle_mean_psnr_db"), ".2f"),
                    _f(a.get("leaked_blocks"), ".3f"),
                ]
                for a in attacks
            ],
        )
    )
    images = []
    for a in attacks:
        psnr, ssim = a.get("psnr_db") or [], a.get("ssim") or []
        flat, bound = a.get("flat_psnr_db") or [], a.get("oracle_psnr_db") or []
        labels = a.get("true_labels") or []
        for i, p in enumerate(psnr):
            f = _nth(flat, i)
            above = None if f is None else ("yes" if p > f else "no")
            images.append(
                [
                    len(images) + 1,
                    a.get("round"),
                    a.get("partition_id", "-"),
                    _f(_nth(labels, i), "d"),
                    _f(p, ".2f"),
                    _f(f, ".2f"),
                    _f(above),
                    _f(_nth(ssim, i), ".3f"),
                    _f(_nth(bound, i), ".2f"),
                ]
            )
    if images:
        out.append(_h3("Per image"))
        out.append(_note(f"Image i is column i of the figure above (it shows the first {RECONSTRUCTIONS_SHOWN})."))
        out.append(
            _table(
                [
                    "image",
                    "round",
                    "partition",
                    "true label",
                    "PSNR (dB)",
                    "flat (dB)",
                    "above flat",
                    "SSIM",
                    "bound (dB)",
                ],
                images,
                fold=FOLD,
                what="images",
            )
        )
    if rep.get("aggregate"):
        agg = rep["aggregate"]
        out.append(_h3("The aggregate (what a server behind secure aggregation sees)"))
        out.append(
            _table(
                ["PSNR (dB)", "flat (dB)", "SSIM", "label acc."],
                [
                    [
                        _f(agg.get("mean_psnr_db"), ".2f"),
                        _f(agg.get("mean_flat_psnr_db"), ".2f"),
                        _f(agg.get("mean_ssim"), ".3f"),
                        _f(agg.get("label_accuracy"), ".2f"),
                    ]
                ],
            )
        )
    return "".join(out)


def run_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html``: the run on one page; return its path.

    Sections: headline figures (``summary.json``), accuracy per round and against simulated fleet
    time, bytes per round, memory per layer against the device budget (rebuilt from the run's
    scenario; a note when that fails), the clients, faults and stragglers, the attack when the run
    has ``privacy.json``, and the scenario.
    """
    # torch and the scenario take 3-5 s to load: a tables-only report (fedtiny report --table) needs neither
    from fedtiny.report.runlog import read_metrics

    run_dir = Path(run_dir)
    if folder_kind(run_dir) != "run":
        raise ReportError(f"{run_dir}: a sweep folder; write its report with sweep_report")
    records = read_metrics(run_dir)
    summary = _summary(run_dir)
    name = (summary or {}).get("name") or run_dir.name
    figs = _drawn(lambda d: plot_run(records, d, name)) if records else {}
    sections = [
        ("scenario", "Scenario", _scenario_section(run_dir)),
        (
            "headline",
            "Headline",
            _headline(summary, records)
            if summary
            else _note(
                "No summary.json: the run has not finished (or stopped early); what follows is from metrics.jsonl."
            ),
        ),
        ("accuracy", "Accuracy", _accuracy_section(figs)),
        ("bytes", "Bytes per round", _bytes_section(figs, records)),
        ("memory", "Memory of a training step", _memory_section(run_dir, summary, records)),
        ("clients", "Clients", _clients_section(run_dir, records)),
        ("faults", "Faults and stragglers", _faults_section(summary, records)),
    ]
    if (run_dir / "privacy.json").is_file():
        sections.append(("privacy", "Gradient leakage", _privacy_section(run_dir)))
    rounds = max((r["round"] for r in records), default=0)
    subtitle = f"run folder <code>{_e(run_dir.resolve())}</code> · {rounds} round{'s' * (rounds != 1)}"
    return _write(run_dir / REPORT, _page(f"fedtiny run: {name}", subtitle, sections))


# ---------------------------------------------------------------------------------------------- sweep page


def _figure_rows(s: dict[str, Any]) -> list[list[Any]]:
    """A method's figures over its seeds: mean ± half-width of the 95% interval, the standard deviation."""
    rows = []
    for key in MEAN_KEYS:
        if s.get(key) is not None:
            fmt = _format_of(key)
            rows.append([key, pm(s, key, fmt), _f(s.get(f"{key}_std"), fmt)])
    return rows


def _format_of(key: str) -> str:
    """How a summary figure reads: as privacy_table and sweep_table print it."""
    if key.endswith("accuracy"):
        return ".4f"
    if key.endswith("bytes_total"):
        return ",.0f"
    if key.endswith("psnr_db") or key.endswith("_25db"):
        return ".2f"
    if key.endswith(("ssim", "cosine", "leaked_blocks")):
        return ".3f"
    return ".1f" if key == "wall_time_s" else ".3g"


def _method_section(sweep: Sweep, method: str, s: dict[str, Any] | None) -> str:
    """A method's figures over its seeds and its runs, each linked to its page when it has one."""
    folders = sweep.runs[method]
    out = []
    if s is None:
        return _note(f"{method}: none of its runs has finished (no summary.json).")
    schemes = s.get("schemes_by_device") or {}
    if schemes:
        described = {d: v if isinstance(v, list) else [v.get("scheme", v.get("id", ""))] for d, v in schemes.items()}
        out.append(_note("Schemes: " + "; ".join(f"{d}: {', '.join(v)}" for d, v in described.items())))
    out.append(
        _table(["figure", "mean ± 95% half-interval" if sweep.seeded[method] else "value", "std"], _figure_rows(s))
    )
    rows = []
    attacked = s.get("privacy_mean_psnr_db") is not None
    for d in folders:
        r = _summary(d) or {}
        rel = os.path.relpath(d / REPORT, sweep.root)
        link = Html(f'<a href="{_e(rel)}">{_e(rel)}</a>') if (d / REPORT).is_file() else "-"
        psnr = [_f(r.get("privacy_mean_psnr_db"), ".2f")] if attacked else []
        rows.append(
            [
                _f(r.get("seed"), "d"),
                _f(r.get("final_accuracy")),
                _f(r.get("best_accuracy")),
                _int(r.get("uplink_bytes_total")),
                _int(r.get("peak_sram_bytes_max")),
                *psnr,
                _f(r.get("wall_time_s"), ".1f"),
                link,
            ]
        )
    headers = [
        "seed",
        "final acc.",
        "best",
        "uplink (B)",
        "peak SRAM (B)",
        *(["PSNR (dB)"] if attacked else []),
        "wall (s)",
        "run report",
    ]
    out.append(_table(headers, rows))
    return "".join(out)


def _privacy_sweep(
    finished: dict[str, list[Path]],
    summaries: dict[str, dict[str, Any]],
    tables: dict[str, str],
    records: dict[str, list[list[dict[str, Any]]]],
) -> str:
    """The sweep's leakage: its privacy table and plots, over the finished runs (``finished``, by method)."""
    reports = {
        m: [json.loads((d / "privacy.json").read_text()) if (d / "privacy.json").is_file() else {} for d in finished[m]]
        for m in summaries
    }
    precisions = {m: s.get("precision", "") for m, s in summaries.items()}
    groups = privacy_groups(summaries)

    # the LSB view needs the size of each sent change: an attack that reads the update another way
    # (the imprint trap's bins) records none, and its plot and table would be empty frames
    sized = any(
        a.get("change_lsb") and a.get("mean_psnr_db") is not None and a.get("observed") == "client"
        for reps in reports.values()
        for rep in reps
        for a in rep.get("attacks", [])
    )

    def draw(d: Path) -> None:
        for file, (x_key, xlabel, logx) in PRIVACY_PLOTS.items():
            plot_privacy(summaries, d / file, x_key, xlabel, logx)
        if sized:
            plot_attacks_vs_lsb(reports, precisions, d / "psnr_vs_lsb.png")

    figs = _drawn(draw)
    captions = [
        (
            "psnr_vs_uplink.png",
            "Reconstruction PSNR against uplink bytes, per method (bars: 95% intervals "
            "over seeds; hollow: fp32 clients).",
        ),
        ("psnr_vs_accuracy.png", "Reconstruction PSNR against the federation's final accuracy."),
    ]
    if sized:
        captions.append(("psnr_vs_lsb.png", "Each attacked update's PSNR against the size of what it sent, in LSB."))
    out = [_markdown(tables["privacy"]), _figures([_figure(figs[f], c) for f, c in captions if f in figs], one=True)]
    if sized:
        out += [_h3("Attacked updates by the size of what they sent"), _markdown(privacy_lsb_table(reports, groups))]
    if any(len({a["round"] for rep in reps for a in rep.get("attacks", [])}) > 1 for reps in reports.values()):
        accuracy = {
            m: [{r["round"]: r["global_accuracy"] for r in recs if "global_accuracy" in r} for recs in seeds]
            for m, seeds in records.items()
        }
        out += [_h3("Attacks by round"), _markdown(privacy_rounds_table(reports, accuracy))]
    return "".join(out)


def sweep_report(sweep_dir: str | Path, *, runs: bool = True) -> Path:
    """Write ``SWEEP_DIR/report.html``: the methods side by side with their 95% intervals; return its path.

    The tables are :func:`sweep_tables` of the runs' summaries (what ``fedtiny report --table``
    prints), the figures are drawn from their ``metrics.jsonl``. With ``runs``, every finished run
    folder gets its own :func:`run_report` and the page links to it.
    """
    # torch and the scenario take 3-5 s to load: a tables-only report (fedtiny report --table) needs neither
    from fedtiny.report.runlog import read_metrics

    sweep = read_sweep(sweep_dir)
    summaries, missing = sweep_summaries(sweep)
    if not summaries:
        raise ReportError(f"{sweep.root}: none of its runs has a summary.json (none has finished)")
    tables = sweep_tables(summaries, sweep.methods)
    finished = {m: [d for d in sweep.runs[m] if d not in missing] for m in summaries}
    records = {m: [read_metrics(d) for d in folders] for m, folders in finished.items()}

    def draw(d: Path) -> None:
        plot_methods(records, d / "accuracy_vs_uplink.png")
        for i, (m, seeds) in enumerate(records.items()):
            if len(seeds) > 1:
                plot_seeds(seeds, d / f"seeds_{i:03d}.png", title=f"{m}: {len(seeds)} seeds")

    figs = _drawn(draw)
    seeds = max(len(s.get("seeds", [])) or 1 for s in summaries.values())
    body = [_markdown(tables["sweep"])]
    if "paired" in tables:
        body += [_h3("Paired by seed"), _markdown(tables["paired"])]
    if missing:
        body.append(
            _note(
                "Left out (no summary.json: unfinished): " + ", ".join(str(p.relative_to(sweep.root)) for p in missing)
            )
        )
    body.append(
        _figures(
            [
                _figure(
                    figs["accuracy_vs_uplink.png"],
                    "Global test accuracy against cumulative uplink "
                    "bytes: mean over seeds, band: 95% interval of the mean.",
                )
            ]
        )
    )
    sections = [
        ("scenario", "Scenario", _scenario_section(sweep.root)),
        ("methods", "Methods" if sweep.methods else "Result", "".join(body)),
    ]
    per_round = [
        _figure(
            figs[f"seeds_{i:03d}.png"],
            f"{m}: accuracy per round, each seed thin, mean bold, band: 95% interval of the mean.",
        )
        for i, m in enumerate(records)
        if f"seeds_{i:03d}.png" in figs
    ]
    if per_round:
        sections.append(("rounds", "Accuracy per round", _figures(per_round)))
    if "privacy" in tables:
        sections.append(("privacy", "Gradient leakage", _privacy_sweep(finished, summaries, tables, records)))
    if runs:
        for folders in finished.values():
            for d in folders:
                run_report(d)
    for i, m in enumerate(sweep.runs):
        sections.append((f"m{i}", m, _method_section(sweep, m, summaries.get(m))))
    n_runs = sum(len(v) for v in sweep.runs.values())
    subtitle = (
        f"sweep folder <code>{_e(sweep.root.resolve())}</code> · {len(sweep.runs)} method"
        f"{'s' * (len(sweep.runs) != 1)} · {n_runs} runs · up to {seeds} seed{'s' * (seeds != 1)}"
    )
    return _write(sweep.root / REPORT, _page(f"fedtiny sweep: {sweep.name}", subtitle, sections))


def write_report(path: str | Path) -> Path:
    """The report of a run or a sweep folder, whichever ``path`` is; return its path."""
    return run_report(path) if folder_kind(path) == "run" else sweep_report(path)
