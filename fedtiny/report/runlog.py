"""A run folder: resolved scenario, per-round ``metrics.jsonl``, ``summary.json`` and plots."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from fedtiny.federated.checkpoint import CheckpointError
from fedtiny.privacy.dp import dp_epsilon
from fedtiny.progress import left, say
from fedtiny.report.plots import plot_run
from fedtiny.scenario import Scenario

__all__ = ["RunLog", "new_run_dir", "write_scenario", "read_metrics"]

# Keys that hold wall-clock times: everything else in metrics.jsonl is deterministic.
TIMING_KEYS = ("elapsed_s",)


def new_run_dir(scenario: Scenario, out: str | Path | None = None, base: str | Path = "runs") -> Path:
    """``out`` if given, else ``runs/<name>-<timestamp>`` (made unique)."""
    if out:
        path = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(base) / f"{scenario.run.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(base) / f"{scenario.run.name}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def write_scenario(scenario: Scenario, run_dir: Path) -> Path:
    """Write the resolved scenario (defaults and overrides applied) as ``scenario.toml``."""
    path = run_dir / "scenario.toml"
    path.write_text(
        "# Resolved scenario of this run (defaults and --set overrides applied).\n" + tomli_w.dumps(scenario.to_dict())
    )
    return path


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Read a run's ``metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    """Append one JSON line per round, show progress, and write the summary and plots at the end.

    Parameters
    ----------
    run_dir
        The run folder (created by :func:`new_run_dir`).
    scenario
        The resolved scenario.
    progress
        Stream for the per-round progress line (stderr by default, so that
        ``--json`` output on stdout stays clean); None silences it.
    resume
        ``(round, elapsed_s)`` of a checkpoint: keep the folder's records up to that round
        (later lines, from a round cut short, are dropped) and go on timing from there.
    """

    def __init__(
        self,
        run_dir: Path,
        scenario: Scenario,
        progress: TextIO | None = sys.stderr,
        resume: tuple[int, float] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.scenario = scenario
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self._pending: dict[int, dict[str, Any]] = {}  # rounds waiting for their stats or their evaluation
        self.t0 = time.monotonic()
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            last, elapsed = resume
            self.records = [r for r in read_metrics(self.run_dir) if r["round"] <= last]
            if [r["round"] for r in self.records] != list(range(last + 1)):
                raise CheckpointError(f"{self.path}: rounds 0..{last} of the checkpoint are not all there")
            self.t0 -= elapsed
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, message: str) -> None:
        """Print a progress note (not part of the metrics)."""
        if self.progress is not None:
            say(message, self.progress)

    def add_round_stats(self, server_round: int, stats: dict[str, Any]) -> None:
        """A round's client facts and bytes; the line is written once its evaluation is in too."""
        self._pending.setdefault(server_round, {}).update(stats)
        self._flush(server_round)

    def add_evaluation(self, server_round: int, accuracy: float, loss: float) -> None:
        """The global model's test accuracy and loss after ``server_round`` (0: the initial model)."""
        self._pending.setdefault(server_round, {}).update(global_accuracy=accuracy, global_loss=loss)
        self._flush(server_round)

    def _flush(self, server_round: int) -> None:
        rec = self._pending[server_round]
        if "global_accuracy" in rec and (server_round == 0 or "uplink_bytes" in rec):
            del self._pending[server_round]
            self.add_round(
                {
                    "round": server_round,
                    "clients": [],
                    "rejected": [],
                    "refused": [],
                    "uplink_bytes": 0,
                    "downlink_bytes": 0,
                    **rec,
                }
            )

    def add_round(self, record: dict[str, Any]) -> None:
        """Append a round's record (adds ``elapsed_s`` and the cumulative simulated ``fleet_time_s``) and print
        a progress line."""
        fleet_time = (self.records[-1].get("fleet_time_s", 0.0) if self.records else 0.0) + record.get(
            "round_time_s", 0.0
        )
        record = {**record, "fleet_time_s": round(fleet_time, 6), "elapsed_s": round(self.elapsed(), 3)}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.progress is not None:
            r, total = record["round"], self.scenario.run.rounds
            rej = len(record.get("rejected", []))
            ref = len(record.get("refused", []))
            late = len(record.get("stragglers", []))
            # the pace of the federated rounds so far: from round 1 on once there are two (round 0 is the
            # cloud step, and round 1 carries the simulation's start-up)
            first = self.records[1] if len(self.records) > 2 else self.records[0]
            pace = left(r - first["round"], total - first["round"], record["elapsed_s"] - first["elapsed_s"])
            say(
                f"round {r:>3}/{total} | acc {record['global_accuracy']:.4f} | "
                f"loss {record['global_loss']:.4f} | up {_kb(record.get('uplink_bytes', 0))} | "
                f"down {_kb(record.get('downlink_bytes', 0))}"
                + (f" | rejected {rej}" if rej else "")
                + (f" | refused {ref} (memory)" if ref else "")
                + (f" | stragglers {late}" if late else "")
                + (f" | fleet {record['fleet_time_s']:.1f}s sim" if record.get("fleet_time_s") else "")
                + f" | {record['elapsed_s']:.1f}s"
                + (f" | {pace}" if pace else ""),
                self.progress,
            )

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write ``summary.json`` and the plots; return the summary."""
        recs = self.records
        last = recs[-1] if recs else {}
        summary = {
            "name": self.scenario.run.name,
            "seed": self.scenario.run.seed,
            "rounds": max((r["round"] for r in recs), default=0),
            "num_clients": self.scenario.run.clients,
            "clients_per_round": self.scenario.clients_per_round,
            "initial_accuracy": recs[0]["global_accuracy"] if recs else None,
            "final_accuracy": last.get("global_accuracy"),
            "final_loss": last.get("global_loss"),
            "best_accuracy": max((r["global_accuracy"] for r in recs), default=None),
            "uplink_bytes_total": sum(r.get("uplink_bytes", 0) for r in recs),
            "downlink_bytes_total": sum(r.get("downlink_bytes", 0) for r in recs),
            "rejected_updates_total": sum(len(r.get("rejected", [])) for r in recs),
            "refused_clients_total": sum(len(r.get("refused", [])) for r in recs),
            # The memory planner's peak of one training step, over every client that trained or refused.
            "peak_sram_bytes_max": max(
                (c.get("peak_sram_bytes", 0) for r in recs for c in r.get("clients", []) + r.get("refused", [])),
                default=0,
            ),
            # The whole client across a round (fedtiny.budget.device_memory): what refusals use by default.
            "device_ram_bytes_max": max(
                (c.get("device_ram_bytes", 0) for r in recs for c in r.get("clients", []) + r.get("refused", [])),
                default=0,
            ),
            "wall_time_s": round(self.elapsed(), 3),
            "run_dir": str(self.run_dir),
            **fleet_summary(recs, self.scenario.fleet.target_accuracy),
            **privacy_summary(recs, self.scenario),
            **extra,
        }
        if recs:
            plot_run(recs, self.run_dir, title=self.scenario.run.name)
        # Written last and atomically: a summary.json marks a finished run (fedtiny run --resume keeps it).
        tmp = self.run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.run_dir / "summary.json")
        return summary


def privacy_summary(recs: list[dict[str, Any]], scenario: Scenario) -> dict[str, Any]:
    """``dp_epsilon`` (None without DP) at ``privacy.delta``, user level (:mod:`fedtiny.privacy.dp`).

    Central DP composes one release per aggregated round; local DP, per update a client sent
    (accepted, rejected or late), the most of any one client.
    """
    p = scenario.privacy
    rounds = [r for r in recs if r["round"] > 0]
    if p.dp == "central":
        releases = sum(1 for r in rounds if r.get("clients"))
    else:
        sent: dict[int, int] = {}
        for r in rounds:
            for c in r.get("clients", []) + r.get("rejected", []) + r.get("stragglers", []):
                sent[c["partition_id"]] = sent.get(c["partition_id"], 0) + 1
        releases = max(sent.values(), default=0)
    eps = dp_epsilon(
        p.dp,
        p.noise_multiplier,
        p.delta,
        releases=releases,
        clients=scenario.run.clients,
        per_round=scenario.clients_per_round,
        amplified=scenario.fleet.availability == "always",
    )
    return {
        "dp": p.dp,
        "dp_epsilon": None if eps is None else round(eps, 4),
        "dp_delta": p.delta,
        "dp_releases": releases if p.dp != "none" else 0,
    }


def fleet_summary(recs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Simulated time, energy, availability, stragglers and faults of a run, from its round records.

    ``energy_mj_per_client_round`` and the mean seconds are over every client round that
    reported them: accepted updates and stragglers (who spent the energy too).
    """
    rounds = [r for r in recs if r["round"] > 0]
    worked = [c for r in rounds for c in r.get("clients", []) + r.get("stragglers", [])]
    accepted = [c for r in rounds for c in r.get("clients", [])]
    faults: dict[str, int] = {}
    for r in rounds:
        for kind, pids in r.get("faults", {}).items():
            faults[kind] = faults.get(kind, 0) + len(pids)
    reached = next((r for r in recs if r["global_accuracy"] >= target), None)

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 6) if values else None

    return {
        "fleet_time_s": round(sum(r.get("round_time_s", 0.0) for r in rounds), 6),
        "energy_mj_per_client_round": mean([float(c.get("energy_mj", 0.0)) for c in worked]),
        "compute_s_per_client_round": mean([float(c.get("compute_s", 0.0)) for c in accepted]),
        "radio_s_per_client_round": mean([float(c.get("radio_s", 0.0)) for c in accepted]),
        "target_accuracy": target,
        "fleet_time_to_target_s": None if reached is None else reached.get("fleet_time_s", 0.0),
        "rounds_to_target": None if reached is None else reached["round"],
        "stragglers_total": sum(len(r.get("stragglers", [])) for r in rounds),
        "faults_total": sum(faults.values()),
        "faults_by_kind": faults,
        "clients_sampled_total": sum(r.get("sampled_clients", 0) for r in rounds),
        "clients_awake_mean": mean([float(r.get("awake_clients", 0)) for r in rounds]),
    }


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"
