"""ClientApps for ``fedtiny bench secagg``: each returns its precomputed fedtiny change, with or without SecAgg+.

The changes are computed beforehand by fedtiny's own client round (dense int8 uplink, decoded
to integer changes) and read here from an ``.npz`` (``allow_pickle=False``), so that what is
timed is the protocol, not training. A mod outside SecAgg+'s records each call's seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod

__all__ = ["make_secagg_client_app"]


class _FixedChange(NumPyClient):
    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def fit(self, parameters, config):
        return self.arrays, 1, {}


def make_secagg_client_app(changes_path: str, timing_dir: str, *, secagg: bool) -> ClientApp:
    """A ClientApp whose partition ``p`` sends row ``p`` of ``changes_path`` (arrays ``p/<i>``)."""

    def client_fn(context: Context):
        pid = int(context.node_config["partition-id"])
        with np.load(changes_path, allow_pickle=False) as z:
            arrays = [
                z[k].astype(np.float32)
                for k in sorted((k for k in z.files if k.startswith(f"{pid}/")), key=lambda k: int(k.split("/")[1]))
            ]
        return _FixedChange(arrays).to_client()

    def timed(msg: Message, ctxt: Context, call_next) -> Message:
        t0 = time.perf_counter()
        reply = call_next(msg, ctxt)
        line = {"partition_id": int(ctxt.node_config["partition-id"]), "seconds": time.perf_counter() - t0}
        with open(Path(timing_dir) / f"client-{line['partition_id']}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return reply

    return ClientApp(client_fn=client_fn, mods=[timed, secaggplus_mod] if secagg else [timed])
