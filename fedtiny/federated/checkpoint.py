"""The server's checkpoint after each completed round, so that a killed run can resume.

What a resumed run needs besides the clients' own states (``client_state.py``): the
global model as sent and its float64 master, the downlink bookkeeping (states sent in
recent rounds, each client's last round), the attack recorder's observations, and the
round and elapsed time. Sampling and training draw from generators seeded by
(seed, round, client), so there is no random-number position to keep.

Files, in ``RUN_DIR/checkpoint/``: ``round-<r>.safetensors`` (every array, named
``state/…``, ``master/…``, ``down/<round>/…``, ``obs/<i>/…``) and ``checkpoint.json``
(the round, the scalars, the arrays file's name and SHA-256). The arrays file is written
first under a new name and the JSON replaced atomically after it, so a kill at any moment
leaves the previous checkpoint whole. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtiny.errors import FedtinyError

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"
_FORMAT = 1


class CheckpointError(FedtinyError):
    """A run folder's checkpoint is missing, damaged or from another scenario."""


@dataclass
class Checkpoint:
    """The server's state after ``server_round``.

    Attributes
    ----------
    server_round
        The last completed round.
    elapsed_s
        The run's wall time at that point (a resumed run's ``elapsed_s`` goes on from it).
    state, master
        The global model as sent (on-device dtypes) and the float64 master of the trained tensors.
    downlink_history, downlink_last_seen
        The downlink planner's sent states by round, and each client's last round.
    observed
        The attack recorder's observations: round, partition id, decoded changes
        (``{name: (positions, values)}``) and the state the client received.
    scenario_json
        The scenario the run was started with (a resume must use the same one).
    """

    server_round: int
    elapsed_s: float
    state: dict[str, np.ndarray]
    master: dict[str, np.ndarray]
    downlink_history: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    downlink_last_seen: dict[int, int] = field(default_factory=dict)
    observed: list[dict[str, Any]] = field(default_factory=list)
    scenario_json: str = ""


def _arrays(ck: Checkpoint) -> dict[str, np.ndarray]:
    out = {f"state/{k}": v for k, v in ck.state.items()}
    out.update({f"master/{k}": v for k, v in ck.master.items()})
    for r, st in ck.downlink_history.items():
        out.update({f"down/{r}/{k}": v for k, v in st.items()})
    for i, ob in enumerate(ck.observed):
        for k, (idx, values) in ob["changes"].items():
            out[f"obs/{i}/idx/{k}"], out[f"obs/{i}/val/{k}"] = idx, values
        out.update({f"obs/{i}/state/{k}": v for k, v in ob["state"].items()})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, ck: Checkpoint) -> Path:
    """Write ``ck`` into ``run_dir/checkpoint`` atomically; return the JSON's path."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{ck.server_round}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file(_arrays(ck), str(tmp))
    os.replace(tmp, folder / name)
    meta = {
        "format": _FORMAT,
        "round": ck.server_round,
        "elapsed_s": ck.elapsed_s,
        "arrays": name,
        "sha256": _sha256(folder / name),
        "last_seen": {str(k): v for k, v in ck.downlink_last_seen.items()},
        "history_rounds": sorted(ck.downlink_history),
        "observed": [{"round": o["round"], "partition_id": o["partition_id"]} for o in ck.observed],
        "scenario": ck.scenario_json,
    }
    tmp_json = folder / ".checkpoint.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_json, folder / "checkpoint.json")
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / "checkpoint.json"


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read and verify ``run_dir``'s checkpoint; :class:`CheckpointError` says what is wrong."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / "checkpoint.json"
    if not path.exists():
        raise CheckpointError(
            f"{run_dir}: no checkpoint ({path} missing); the run did not complete a round, "
            "or was not started by fedtiny run"
        )
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        arrays_path = folder / str(meta["arrays"])
        if Path(meta["arrays"]).name != meta["arrays"] or not arrays_path.exists():
            raise CheckpointError(f"{path}: its arrays file {meta['arrays']!r} is missing")
        if _sha256(arrays_path) != meta["sha256"]:
            raise CheckpointError(f"{arrays_path}: damaged (SHA-256 does not match {path.name})")
        arrays = load_file(str(arrays_path))
        part = lambda prefix: {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
        observed = []
        for i, ob in enumerate(meta["observed"]):
            idx, val = part(f"obs/{i}/idx/"), part(f"obs/{i}/val/")
            observed.append(
                {
                    "round": int(ob["round"]),
                    "partition_id": int(ob["partition_id"]),
                    "changes": {k: (idx[k], val[k]) for k in idx},
                    "state": part(f"obs/{i}/state/"),
                }
            )
        return Checkpoint(
            int(meta["round"]),
            float(meta["elapsed_s"]),
            part("state/"),
            part("master/"),
            {int(r): part(f"down/{r}/") for r in meta["history_rounds"]},
            {int(k): int(v) for k, v in meta["last_seen"].items()},
            observed,
            str(meta["scenario"]),
        )
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(exc).__name__}: {exc})") from None
