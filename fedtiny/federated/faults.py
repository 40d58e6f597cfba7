"""Injected client faults (``[fleet.faults]``) and poisoned changes (``fleet.malicious_*``), seeded.

A sampled client has at most one fault per round, drawn from the rates with a generator
seeded by (seed, round, client), so a rerun injects the same faults:

- ``crash``: the client dies mid-round and never replies;
- ``garbage``: random bytes of a random length in place of its update;
- ``truncated``: its update cut short at a random byte;
- ``stale``: it replays its reply of an earlier round (update, example count and round tag);
  a client without an earlier update sends its current one (no fault);
- ``bad_count``: an absurd example count (negative, zero or a billion) with a valid update.

The injector tags the reply with the fault's kind (``info["fault"]``) for the run's report
only; the server's decisions read nothing but the payload, the claimed count and the
round tag, as with a real device.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from fedtiny.scenario import FAULT_KINDS

__all__ = ["FAULT_KINDS", "ClientCrash", "draw_fault", "inject_fault", "remember_update", "poison"]

_STALE_PAYLOAD, _STALE_META = "stale/payload", "stale/meta"


class ClientCrash(RuntimeError):
    """An injected crash: the client never replies this round."""


def draw_fault(rates: Mapping[str, float], seed: int, server_round: int, partition_id: int) -> str:
    """The fault client ``partition_id`` has in ``server_round`` ('' for none)."""
    if not rates:
        return ""
    u = np.random.default_rng([seed, 4242, server_round, partition_id]).random()
    edge = 0.0
    for kind in FAULT_KINDS:
        edge += rates.get(kind, 0.0)
        if u < edge:
            return kind
    return ""


def remember_update(state: dict[str, np.ndarray], result, server_round: int) -> None:
    """Keep the honest reply in the client's state, for a later stale replay."""
    state[_STALE_PAYLOAD] = np.frombuffer(result.update, np.uint8).copy()
    state[_STALE_META] = np.array([server_round, result.num_examples], np.int64)


def inject_fault(kind: str, result, state: dict[str, np.ndarray], seed: int, server_round: int, partition_id: int):
    """``result`` with fault ``kind`` applied (the client's reply as the server receives it).

    Raises
    ------
    ClientCrash
        For ``crash``.
    """
    if not kind or result.refusal:
        return result
    rng = np.random.default_rng([seed, 4243, server_round, partition_id])
    update = result.update
    if kind == "crash":
        raise ClientCrash(f"injected crash of client {partition_id} in round {server_round}")
    if kind == "garbage":
        return dataclasses.replace(result, update=rng.bytes(int(rng.integers(1, 2 * len(update) + 17))), fault=kind)
    if kind == "truncated":
        return dataclasses.replace(result, update=update[: int(rng.integers(0, max(len(update), 1)))], fault=kind)
    if kind == "bad_count":
        return dataclasses.replace(result, num_examples=int(rng.choice([-1, 0, 10**9])), fault=kind)
    if kind == "stale":
        if _STALE_PAYLOAD not in state:
            return result
        old_round, old_count = (int(v) for v in state[_STALE_META])
        return dataclasses.replace(
            result, update=state[_STALE_PAYLOAD].tobytes(), num_examples=old_count, trained_round=old_round, fault=kind
        )
    raise ValueError(f"unknown fault kind {kind!r}")


def poison(
    trained: dict[str, np.ndarray], received: dict[str, np.ndarray], kind: str, scale: float
) -> dict[str, np.ndarray]:
    """A malicious client's tensors: the received model plus ``-scale`` (sign-flip) or ``scale`` times its change.

    Float64, unclipped: the uplink encoder rounds and saturates them to the wire's dtypes.
    """
    factor = -scale if kind == "sign-flip" else scale
    return {
        n: received[n].astype(np.float64) + factor * (a.astype(np.float64) - received[n].astype(np.float64))
        for n, a in trained.items()
    }
