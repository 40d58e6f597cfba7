"""The C step's arena layout: where each buffer of a training step lives, decided ahead of time.

The C step (``device/c/fedtiny_step.c``) takes its buffers in an order that depends only on the model
and on whether the step accumulates (one sample or more), never on data. A recorded step
(:meth:`fedtiny.int8.cstep.CStep.record`) gives every buffer's size and lifetime; :func:`lay_out`
places them: largest first, each at the lowest offset where it overlaps no already placed buffer that
is alive at the same time (the greedy-by-size strategy of TFLM's memory planner). The offsets, one per
take in order, are the plan the step then follows (``ft_model.plan``), so a device's arena is exactly
``arena_bytes`` and known before it runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Buffer", "ArenaPlan", "buffers_from_log", "lay_out", "peak_live_bytes"]

CONTINUES = 0x40000000  # a take that continues the block just given, smaller, at the same offset


@dataclass
class Buffer:
    """One placed block: its takes (the plan entries it serves) and segments ``(start, end, bytes)``."""

    takes: list[int] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return max(s for _, _, s in self.segments)


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets of every take (in the step's order) and the arena they need."""

    offsets: tuple[int, ...]
    arena_bytes: int
    peak_live_bytes: int  # the most bytes alive at once: no layout needs less

    def to_dict(self) -> dict:
        return {"takes": len(self.offsets), "arena_bytes": self.arena_bytes, "peak_live_bytes": self.peak_live_bytes}


def buffers_from_log(log: list[int]) -> list[Buffer]:
    """The blocks of a recorded step (``ft_step_record``'s log); blocks never given live to the end."""
    end = len(log)
    buffers: list[Buffer] = []
    owner: dict[int, tuple[Buffer, int]] = {}  # take index -> (block, its segment's start)
    open_size: dict[int, int] = {}
    last_given: Buffer | None = None
    k = 0
    for t, v in enumerate(log):
        if v > 0:
            size = v & ~CONTINUES
            if v & CONTINUES:
                if last_given is None:
                    raise ValueError(f"arena log: event {t} continues no block")
                buf = last_given
            else:
                buf = Buffer()
                buffers.append(buf)
            buf.takes.append(k)
            owner[k], open_size[k] = (buf, t), size
            k += 1
            last_given = None
        elif v < 0:
            i = -v - 1
            if i not in open_size:
                raise ValueError(f"arena log: event {t} gives take {i}, which is not live")
            buf, start = owner[i]
            buf.segments.append((start, t, open_size.pop(i)))
            last_given = buf
        else:
            raise ValueError(f"arena log: event {t} is 0")
    for i, size in open_size.items():
        buf, start = owner[i]
        buf.segments.append((start, end, size))
    return buffers


def peak_live_bytes(buffers: list[Buffer]) -> int:
    """The most bytes alive at one time (a lower bound of any layout's arena)."""
    delta: dict[int, int] = {}
    for b in buffers:
        for start, end, size in b.segments:
            delta[start] = delta.get(start, 0) + size
            delta[end] = delta.get(end, 0) - size
    live = peak = 0
    for t in sorted(delta):
        live += delta[t]
        peak = max(peak, live)
    return peak


def _conflicts(buffers: list[Buffer]) -> list[list[tuple[int, tuple[tuple[int, int], ...]]]]:
    """For each block, the blocks alive at the same time as it and the sizes ``(own, other)`` of each
    pair of segments that overlap in time."""
    out: list[list[tuple[int, tuple[tuple[int, int], ...]]]] = [[] for _ in buffers]
    for i, a in enumerate(buffers):
        for j in range(i + 1, len(buffers)):
            pairs = {(z0, z1) for s0, e0, z0 in a.segments for s1, e1, z1 in buffers[j].segments if s0 < e1 and s1 < e0}
            if pairs:
                out[i].append((j, tuple(sorted(pairs))))
                out[j].append((i, tuple(sorted((z1, z0) for z0, z1 in pairs))))
    return out


def _place(buffers: list[Buffer], conflicts, order: list[int], align: int) -> tuple[int, list[int]]:
    """Each block in ``order`` at the lowest offset free of the placed blocks alive with it."""
    at: list[int | None] = [None] * len(buffers)
    top = 0
    for i in order:
        forbidden = sorted(
            (off - z0 + 1, off + z1) for j, pairs in conflicts[i] if (off := at[j]) is not None for z0, z1 in pairs
        )  # offsets o in [lo, hi) would collide
        o = 0
        for lo, hi in forbidden:
            if o < lo:
                break
            if o < hi:
                o = -(-hi // align) * align
        at[i] = o
        top = max(top, o + buffers[i].size)
    return top, at  # type: ignore[return-value]


def lay_out(log: list[int], align: int = 8, tries: int = 400, seed: int = 0) -> ArenaPlan:
    """Place a recorded step's blocks; return the plan.

    Blocks go in order, each at the lowest offset where it collides with no placed block alive at the
    same time. The first order is largest first (TFLM's greedy-by-size); then up to ``tries`` orders,
    each the best so far with two blocks swapped (a seeded, deterministic search), keeping any that is
    no larger, and stopping at the most bytes ever alive at once, which no layout can beat.
    """
    buffers = buffers_from_log(log)
    floor = peak_live_bytes(buffers)
    conflicts = _conflicts(buffers)
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, buffers[i].segments[0][0]))
    best, at = _place(buffers, conflicts, order, align)
    rng = random.Random(seed)
    for _ in range(tries if len(buffers) > 1 else 0):
        if best <= floor:
            break
        i, j = rng.randrange(len(order)), rng.randrange(len(order))
        trial = order.copy()
        trial[i], trial[j] = trial[j], trial[i]
        size, trial_at = _place(buffers, conflicts, trial, align)
        if size <= best:
            best, at, order = size, trial_at, trial
    offsets = [0] * sum(len(b.takes) for b in buffers)
    for b, o in zip(buffers, at):
        for k in b.takes:
            offsets[k] = o
    return ArenaPlan(tuple(offsets), best, floor)
