"""Names inside the messages between the ServerApp and the ClientApps, written once.

A train message holds the downlink payload (``GLOBAL``) and a config record (``CONFIG``)
with the keys below; the reply holds the uplink payload (``UPDATE``), scalar metrics
(``METRICS``) and text facts (``INFO``). A query reply holds ``NODE`` with the
partition id. Payloads ride as raw bytes (``clients/wire.py``).

A cohort message (simulation, ``run.cohort_size > 1``) carries several virtual clients:
``CONFIG`` lists their partition ids under ``COHORT``, and every per-client record or key
is suffixed with the partition id (:func:`keyed`): ``global.7``, ``scheme.7``, ``update.7``...
A client whose round failed in a cohort reply has ``ERROR`` in its info record.
"""

from __future__ import annotations

__all__ = [
    "GLOBAL",
    "CONFIG",
    "UPDATE",
    "METRICS",
    "INFO",
    "NODE",
    "SCENARIO",
    "SERVER_ROUND",
    "SCHEME",
    "DOWNLINK",
    "PARTITION_ID",
    "NUM_EXAMPLES",
    "REFUSED",
    "COHORT",
    "STATE_DIR",
    "ERROR",
    "TRAINED_ROUND",
    "keyed",
]

# Record names.
GLOBAL = "global"
CONFIG = "config"
UPDATE = "update"
METRICS = "metrics"
INFO = "info"
NODE = "node"

# Keys of the train config record.
SCENARIO = "scenario"
SERVER_ROUND = "server-round"
SCHEME = "scheme"
DOWNLINK = "downlink"
COHORT = "cohort"
STATE_DIR = "state-dir"  # simulation: where clients keep their state between rounds

# Keys of the node record and of the reply's metrics.
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
TRAINED_ROUND = "trained-round"  # the round whose model the update was trained from (a replay shows an old one)
ERROR = "error"


def keyed(name: str, partition_id: int | None) -> str:
    """``name`` for one client of a cohort message (``name.<partition id>``); ``name`` itself outside cohorts."""
    return name if partition_id is None else f"{name}.{partition_id}"
