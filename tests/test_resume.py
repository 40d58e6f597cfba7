"""Cohorts of virtual clients and resumed runs give the numbers of a plain, uninterrupted run.

Three simulations of the quickstart at 4 clients x 4 rounds: one client per Flower call,
uninterrupted (A); cohorts of 2 virtual clients per call (B), killed with SIGKILL once its
checkpoint says round 2 is complete, then ``fedtiny run --resume``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, run_cli

from fedtiny.federated.client_state import load_client_state, save_client_state
from fedtiny.report.runlog import TIMING_KEYS, read_metrics

SMALL = [
    "--set",
    "run.clients=4",
    "--set",
    "run.clients_per_round=3",
    "--set",
    "run.rounds=4",
    "--set",
    "model.pretrain_epochs=5",
    "--set",
    "run.name=resume",
]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.toml")


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _run_and_kill(out, after_round: int, *args: str) -> None:
    """Start ``fedtiny run``; SIGKILL its whole process group once ``after_round`` is checkpointed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtiny.tools.cli", "run", *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    marker = out / "checkpoint" / "checkpoint.json"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(marker.read_text())["round"] >= after_round:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain")
    proc = run_cli("run", QUICKSTART, *SMALL, "--out", str(plain))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = tmp_path_factory.mktemp("cut")
    _run_and_kill(cut, 2, QUICKSTART, *SMALL, "--set", "run.cohort_size=2")
    before = read_metrics(cut)
    kept = tmp_path_factory.mktemp("damaged")
    shutil.copytree(cut, kept, dirs_exist_ok=True)
    proc = run_cli("run", "--resume", str(cut))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"plain": plain, "cut": cut, "before": before, "damaged": kept, "resume_log": proc.stderr}


def test_cohort_gives_the_metrics_of_one_client_per_call(runs):
    # Rounds 0-2 of the cohort run, written before it was killed, equal the one-client-per-call run's.
    before = runs["before"]
    assert [r["round"] for r in before][:3] == [0, 1, 2]
    assert _strip(before[:3]) == _strip(read_metrics(runs["plain"])[:3])
    assert all(len(r["clients"]) == 3 for r in before[1:3])


def test_resume_after_sigkill_equals_the_uninterrupted_run(runs):
    assert "resuming after round 2" in runs["resume_log"]
    resumed, plain = read_metrics(runs["cut"]), read_metrics(runs["plain"])
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    assert _strip(resumed) == _strip(plain)
    a = json.loads((runs["cut"] / "summary.json").read_text())
    b = json.loads((runs["plain"] / "summary.json").read_text())
    assert a["final_accuracy"] == b["final_accuracy"] and a["uplink_bytes_total"] == b["uplink_bytes_total"]


def test_damaged_checkpoint_is_a_clear_error(runs):
    damaged = runs["damaged"]
    arrays = next((damaged / "checkpoint").glob("round-*.safetensors"))
    data = bytearray(arrays.read_bytes())
    data[-10] ^= 0xFF
    arrays.write_bytes(bytes(data))
    proc = run_cli("run", "--resume", str(damaged))
    assert proc.returncode == 2
    assert "damaged" in proc.stderr and "Traceback" not in proc.stderr
    (damaged / "checkpoint" / "checkpoint.json").write_text("{not json")
    proc = run_cli("run", "--resume", str(damaged))
    assert proc.returncode == 2 and "checkpoint.json" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_new_settings(tmp_path):
    proc = run_cli("run", QUICKSTART, "--resume", str(tmp_path))
    assert proc.returncode == 2 and "own scenario.toml" in proc.stderr
    proc = run_cli("run", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_client_state_survives_a_rerun_of_its_round(tmp_path):
    """A round cut short and run again starts from the state its first attempt started from."""
    state = lambda v: {"global/w": np.full(3, v, np.int8)}  # noqa: E731
    save_client_state(tmp_path, 7, 1, state(1))
    save_client_state(tmp_path, 7, 3, state(3))
    assert load_client_state(tmp_path, 7, 4)["global/w"][0] == 3
    save_client_state(tmp_path, 7, 4, state(4))  # round 4's first attempt...
    assert load_client_state(tmp_path, 7, 4)["global/w"][0] == 3  # ...its rerun still reads round 3's state
    assert sorted(p.name for p in (tmp_path / "7").iterdir()) == ["r3.safetensors", "r4.safetensors"]
    assert load_client_state(tmp_path, 8, 4) == {}
    (tmp_path / "7" / "r4.safetensors").write_bytes(b"junk")
    from fedtiny.federated.client_state import ClientStateError

    with pytest.raises(ClientStateError, match="r4.safetensors"):
        load_client_state(tmp_path, 7, 5)


def test_a_float_client_keeps_a_state_only_when_a_later_round_reads_it(tmp_path):
    """With a full downlink and a dense uplink a float client keeps nothing a later round reads: a cohort writes
    no state files. With a delta downlink (the model it holds is the base of the next change) each client writes
    its state. The rounds' results are the same either way, and every client of a cohort, decoding the same
    downlink, gets arrays of its own."""
    from fedtiny.compress.dense import pack_dense
    from fedtiny.compress.downlink import FULL, apply_downlink
    from fedtiny.federated.client import ClientJob, _received, client_task, run_jobs
    from fedtiny.models import model_arrays
    from fedtiny.scenario import scenario_from_dict

    results = {}
    for downlink in ("full", "delta"):
        scenario = scenario_from_dict(
            {
                "run": {"clients": 6, "clients_per_round": 3, "seed": 2},
                "data": {"source": "digits", "client_test_fraction": 0.0},
                "model": {"name": "tiny-ir", "width": 8, "precision": "fp32", "pretrain_epochs": 0},
                "train": {"optimizer": "sgd", "scheme": "full", "lr": 0.01, "batch_size": 4},
                "compression": {"uplink": "dense", "error_feedback": False, "downlink": downlink},
            }
        )
        task = client_task(scenario)
        payload = pack_dense(model_arrays(task.model), task.downlink_spec)
        jobs = [ClientJob(p, payload) for p in (0, 1, 4)]
        results[downlink] = [run_jobs(scenario, r, jobs, str(tmp_path / downlink)) for r in (1, 2)]
        assert all(not isinstance(res, str) for rnd in results[downlink] for _, res in rnd)
    assert not (tmp_path / "full").exists()
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == ["0", "1", "4"]
    assert results["full"] == results["delta"]
    first = _received(FULL, payload, task.downlink_spec, None)
    for a in first.values():
        a[...] = 0
    again = _received(FULL, payload, task.downlink_spec, None)
    for name, a in apply_downlink(FULL, payload, task.downlink_spec, None).items():
        assert again[name].dtype == a.dtype and np.array_equal(again[name], a)
