"""Simulated clients' persistent state on disk: the model each holds and its error-feedback residual.

On a real device this state stays on the device. In simulation a client is not tied
to one process (a cohort of virtual clients runs wherever Flower sends it), and a
fleet of thousands does not fit in the workers' memory, so each client's state is a
small safetensors file in the run folder, one per round it trained:
``STATE_DIR/<partition>/r<round>.safetensors``. A client that holds nothing a later round
reads (a float client with a dense uplink and a full downlink keeps only the model it was
sent, which the next full downlink replaces) writes none
(:func:`fedtiny.federated.client.read_later`).

A client in round ``r`` reads its newest state from a round before ``r`` and writes
round ``r``'s. Older files are removed only once a newer one exists and is not the
one just read, so a round cut short and run again (``fedtiny run --resume``) finds
the state its first attempt started from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedtiny.errors import FedtinyError

__all__ = ["load_client_state", "save_client_state", "ClientStateError"]

_FILE = re.compile(r"^r(\d+)\.safetensors$")


class ClientStateError(FedtinyError):
    """A client's state file cannot be read (damaged or foreign)."""


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_FILE.match, os.listdir(folder)) if m)


def load_client_state(state_dir: str | Path, partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """Client ``partition_id``'s newest state from a round before ``server_round`` (empty if none)."""
    folder = Path(state_dir) / str(partition_id)
    earlier = [r for r in _rounds(folder) if r < server_round]
    if not earlier:
        return {}
    path = folder / f"r{earlier[-1]}.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ClientStateError(f"client state {path}: cannot be read ({exc})") from None


def save_client_state(
    state_dir: str | Path, partition_id: int, server_round: int, state: dict[str, np.ndarray]
) -> Path:
    """Write client ``partition_id``'s state after ``server_round`` atomically; drop states it no longer needs."""
    folder = Path(state_dir) / str(partition_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"r{server_round}.safetensors"
    tmp = folder / f".r{server_round}.{os.getpid()}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    rounds = [r for r in _rounds(folder) if r < server_round]
    for r in rounds[:-1]:  # keep the newest earlier state: a rerun of this round starts from it
        (folder / f"r{r}.safetensors").unlink(missing_ok=True)
    return path
