"""Server -> client: the global change since a client's last participation, or the full model.

The server remembers the state it sent in each round and, per client, the round it
last received; the change since then travels as a sparse update (exact integer
differences for int8/int32 tensors, replaced values for float tensors) when that
is smaller than the full model, else the full model goes out.
"""

from __future__ import annotations

import numpy as np

from fedtiny.compress.codec import CodecError, SparseTensor, SparseUpdate, decode, encode
from fedtiny.compress.dense import Spec, pack_dense, unpack_dense
from fedtiny.errors import ScenarioError

__all__ = ["DownlinkPlanner", "apply_downlink", "FULL", "DELTA"]

FULL, DELTA = "full", "delta"


def _int_type(peak: int) -> str:
    return "int8" if peak <= 127 else "int16" if peak <= 32767 else "int32"


def diff_update(old: dict[str, np.ndarray], new: dict[str, np.ndarray], spec: Spec) -> SparseUpdate | None:
    """The exact change ``old -> new`` as a sparse update (None when it cannot be exact)."""
    update = SparseUpdate()
    for tid, (name, shape, dtype) in enumerate(spec):
        a, b = old[name].ravel(), new[name].ravel()
        if np.dtype(dtype).kind in "iu":
            d = b.astype(np.int64) - a.astype(np.int64)
            idx = np.flatnonzero(d)
            if len(idx):
                update.tensors.append(
                    SparseTensor(
                        tid, tuple(shape), idx, d[idx].astype(np.float64), _int_type(int(np.abs(d[idx]).max()))
                    )
                )
        else:
            idx = np.flatnonzero(a != b)
            if len(idx):
                if np.dtype(dtype) != np.float32:
                    return None  # fp64 values cannot travel exactly as fp32
                update.tensors.append(
                    SparseTensor(tid, tuple(shape), idx, b[idx].astype(np.float64), "fp32", replace=True)
                )
    return update


def apply_downlink(kind: str, payload: bytes, spec: Spec, base: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The client's new global state from a downlink message (``base``: what it had)."""
    if kind == FULL:
        return unpack_dense(payload, spec)
    if kind != DELTA:
        raise CodecError(f"unknown downlink kind {kind!r}")
    if base is None:
        raise CodecError("a change was sent but this client holds no model to apply it to")
    state = {k: v.copy() for k, v in base.items()}
    for t in decode(payload, spec).tensors:
        name, _, dtype = spec[t.tensor_id]
        flat = state[name].reshape(-1)
        if t.replace:
            flat[t.indices] = t.values.astype(flat.dtype)
        else:
            info = np.iinfo(flat.dtype)
            flat[t.indices] = np.clip(
                flat[t.indices].astype(np.int64) + np.round(t.values).astype(np.int64), info.min, info.max
            ).astype(flat.dtype)
    return state


class DownlinkPlanner:
    """Chooses, per client, the smaller of the global change since its last round and the full model.

    Parameters
    ----------
    spec
        The downlink spec (the whole model state).
    mode
        ``delta`` (send the change when smaller) or ``full`` (always the full model).
    max_history
        Rounds of sent states kept; a client away longer gets the full model.
    """

    def __init__(self, spec: Spec, mode: str = FULL, max_history: int = 64) -> None:
        if mode not in (FULL, DELTA):
            raise ScenarioError(f"compression.downlink: expected full or delta, got {mode!r}")
        self.spec, self.mode, self.max_history = spec, mode, max_history
        self.history: dict[int, dict[str, np.ndarray]] = {}
        self.last_seen: dict[int, int] = {}
        self._full: tuple[int, bytes] | None = None  # the round whose full model is packed, and its bytes

    def payload(self, partition_id: int, server_round: int, state: dict[str, np.ndarray]) -> tuple[str, bytes]:
        """``(kind, bytes)`` to send client ``partition_id`` in ``server_round``.

        ``state`` is the round's global state: the first call of a round keeps it in the history and
        packs the full model once for all of the round's clients.
        """
        if server_round not in self.history:
            self.history[server_round] = {k: v.copy() for k, v in state.items()}
        if self._full is None or self._full[0] != server_round:
            self._full = (server_round, pack_dense(state, self.spec))
        full = self._full[1]
        seen = self.last_seen.get(partition_id)
        if self.mode == DELTA and seen is not None and seen in self.history:
            update = diff_update(self.history[seen], state, self.spec)
            if update is not None:
                data = encode(update)
                if len(data) < len(full):
                    return DELTA, data
        return FULL, full

    def received(self, partition_ids: int | list[int], server_round: int) -> None:
        """Clients ``partition_ids`` hold the state of ``server_round`` now (one id or a round's list)."""
        for pid in [partition_ids] if isinstance(partition_ids, int) else partition_ids:
            self.last_seen[pid] = server_round
        # Once per call, not per client: with thousands of clients this set is the costly part.
        keep = set(sorted(self.history)[-self.max_history :]) | set(self.last_seen.values())
        self.history = {r: s for r, s in self.history.items() if r in keep}
