"""Names inside the messages between the ServerApp and the ClientApps, written once.

A train message holds the downlink payload (``GLOBAL``) and a config record (``CONFIG``)
with the keys below; the reply holds the uplink payload (``UPDATE``), scalar metrics
(``METRICS``) and text facts (``INFO``). A query reply holds ``NODE`` with the
partition id. Payloads ride as raw bytes (``clients/wire.py``).
"""

from __future__ import annotations

__all__ = ["GLOBAL", "CONFIG", "UPDATE", "METRICS", "INFO", "NODE", "SCENARIO", "SERVER_ROUND", "SCHEME",
           "DOWNLINK", "PARTITION_ID", "NUM_EXAMPLES", "REFUSED"]

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

# Keys of the node record and of the reply's metrics.
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
