"""``fedtiny report``: one self-contained HTML page of a run or sweep folder, and the sweep's tables again.

One real sweep is run once for the module (Flower simulation, Ray): the malicious-server privacy
scenario, one method, one seed, two clients, one round, with ``--report``. It gives a sweep folder
(``malicious-int8/seed0/``) whose run was attacked, so every section of both pages is exercised.
"""

import base64
import json
import re
import shutil
import tomllib

import pytest
import tomli_w
from conftest import ROOT, run_cli

from fedtiny.report.html import folder_kind, run_report, sweep_report
from fedtiny.report.plots import privacy_table
from fedtiny.report.sweep import combine_seeds, paired_table, sweep_table
from fedtiny.tools.cli import main

METHOD = "malicious-int8"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep folder written by ``fedtiny run --report`` (and the run's stdout/stderr)."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        "run",
        str(ROOT / "scenarios" / "privacy-malicious.toml"),
        "--method",
        METHOD,
        "--seeds",
        "1",
        "--set",
        "run.clients=2",
        "--set",
        "attack.clients=[0, 1]",
        "--out",
        str(out),
        "--report",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _images(html: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', html)


def _self_contained(html: str) -> None:
    """No address to fetch: every image a PNG inside the page, no external style sheet or script."""
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    srcs = _images(html)
    assert srcs
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_report_flag_writes_both_pages(sweep):
    out, proc = sweep
    assert (out / "report.html").is_file() and (out / METHOD / "seed0" / "report.html").is_file()
    assert f"[fedtiny] report: {out / 'report.html'}" in proc.stderr
    json.loads(proc.stdout.strip().splitlines()[-1])  # --json's last line stays the summaries


def test_run_page_is_self_contained_with_its_sections(sweep):
    out, _ = sweep
    run = out / METHOD / "seed0"
    assert folder_kind(run) == "run"
    html = (run / "report.html").read_text()  # written by run_report at the end of the sweep (--report)
    _self_contained(html)
    for sid in ("scenario", "headline", "accuracy", "bytes", "memory", "clients", "faults", "privacy"):
        assert f'<section id="{sid}">' in html
    # accuracy per round, against fleet time, against uplink bytes, bytes per round, memory, reconstructions
    assert len(_images(html)) == 6
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['final_accuracy']:.4f}" in html
    # the planner's peak, rebuilt from scenario.toml and the scheme, is the one the clients reported
    assert "Memory not computed" not in html
    assert html.count(f"{summary['peak_sram_bytes_max']:,} B") >= 2
    privacy = json.loads((run / "privacy.json").read_text())
    for attack in privacy["attacks"]:
        for psnr in attack["psnr_db"]:
            assert f"{psnr:.2f}" in html
    assert "[run]" in html  # the resolved scenario, collapsed


def test_sweep_page_links_its_runs_and_tables(sweep):
    out, _ = sweep
    assert folder_kind(out) == "sweep"
    html = sweep_report(out, runs=False).read_text()
    _self_contained(html)
    assert f'href="{METHOD}/seed0/report.html"' in html
    for sid in ("scenario", "methods", "privacy"):
        assert f'<section id="{sid}">' in html
    assert "bound at true positions (dB)" in html  # the privacy table, with the trap's columns


def test_table_is_computed_from_the_runs_summaries(sweep, capsys):
    out, _ = sweep
    assert main(["report", str(out), "--table"]) == 0
    printed = capsys.readouterr().out.strip()
    runs = [json.loads((out / METHOD / "seed0" / "summary.json").read_text())]
    summaries = {METHOD: combine_seeds(runs)}
    assert printed == sweep_table(summaries) + "\n\n" + privacy_table(summaries)
    # what fedtiny run wrote at the end of the sweep, from the same summaries
    assert printed.startswith((out / "table.md").read_text().rstrip("\n"))
    assert printed.endswith((out / "privacy_table.md").read_text().rstrip("\n"))


def _copy_run(src, dst, seed, final_accuracy):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("client-state", "checkpoint", "report.html"))
    summary = json.loads((dst / "summary.json").read_text())
    summary.update(seed=seed, final_accuracy=final_accuracy)
    (dst / "summary.json").write_text(json.dumps(summary))
    return summary


def test_table_pairs_methods_by_seed_in_scenario_order(sweep, tmp_path, capsys):
    """Two methods x two seeds made of the real run: the reference of the paired table is the scenario's first
    method (not the alphabetical first), and an unfinished run is left out and named."""
    out, _ = sweep
    run = out / METHOD / "seed0"
    raw = tomllib.loads((out / "scenario.toml").read_text())
    raw["methods"] = {"zeta": {}, "alpha": {"train.lr": 0.05}}
    (tmp_path / "scenario.toml").write_text(tomli_w.dumps(raw))
    accuracy = {("zeta", 0): 0.50, ("zeta", 1): 0.60, ("alpha", 0): 0.58, ("alpha", 1): 0.71}
    runs = {
        m: [_copy_run(run, tmp_path / m / f"seed{k}", k, accuracy[m, k]) for k in (0, 1)] for m in ("zeta", "alpha")
    }
    unfinished = tmp_path / "alpha" / "seed2"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("client-state", "checkpoint", "summary.json"))

    assert main(["report", str(tmp_path), "--table", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    summaries = {m: combine_seeds(r) for m, r in runs.items()}
    assert result["kind"] == "sweep"
    assert result["tables"]["sweep"] == sweep_table(summaries)
    assert result["tables"]["paired"] == paired_table(summaries)
    assert "| alpha | +0.0950 |" in result["tables"]["paired"]  # alpha minus zeta, the scenario's first
    assert result["left_out"] == [str(unfinished)] and str(unfinished) in captured.err


def test_memory_that_cannot_be_rebuilt_is_a_note(sweep, tmp_path):
    out, _ = sweep
    run = tmp_path / "run"
    shutil.copytree(out / METHOD / "seed0", run, ignore=shutil.ignore_patterns("client-state", "checkpoint"))
    toml = run / "scenario.toml"
    toml.write_text(toml.read_text().replace('name = "tiny-ir"', 'name = "no-such-model"'))
    html = run_report(run).read_text()
    assert "Memory not computed:" in html and "no-such-model" in html
    assert '<section id="clients">' in html and '<section id="privacy">' in html


def test_bad_path_is_one_error_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-run"
    proc = run_cli("report", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fedtiny: error: {missing}: no such folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("report", str(empty), "--table")
    assert proc.returncode == 2 and str(empty) in proc.stderr and "not a run folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_accuracy_against_bytes_when_nothing_was_sent(tmp_path):
    """A method whose clients all refused sent 0 bytes: the plot is still drawn (no log axis), and round 0
    of a method that did send is a level, not a point at 1 byte."""
    from fedtiny.report.plots import plot_methods

    refused = [{"round": r, "uplink_bytes": 0, "global_accuracy": 0.5} for r in range(3)]
    sent = [{"round": r, "uplink_bytes": 0 if r == 0 else 1000, "global_accuracy": 0.5 + r / 10} for r in range(3)]
    assert plot_methods({"refused": [refused]}, tmp_path / "a.png").stat().st_size > 0
    assert plot_methods({"refused": [refused], "sent": [sent, sent]}, tmp_path / "b.png").stat().st_size > 0
