"""Progress of long work, one way everywhere: ``[fedtiny] what i/N ... | 12 s | ~40 s left`` on stderr.

Runs, sweeps, the scheme search, attacks and benchmarks print through :func:`say`; the command line
silences them with ``--json`` (:func:`set_quiet`), whose stdout then carries only the JSON line.
"""

from __future__ import annotations

import sys

__all__ = ["say", "set_quiet", "quiet", "left", "seconds"]

_QUIET = False


def set_quiet(flag: bool) -> None:
    """Silence (or restore) every progress line of this process."""
    global _QUIET
    _QUIET = bool(flag)


def quiet() -> bool:
    return _QUIET


def say(text: str, stream=...) -> None:
    """Print ``[fedtiny] text`` on stderr (or ``stream``; ``None``: nowhere) unless quiet."""
    if not _QUIET and stream is not None:
        print(f"[fedtiny] {text}", file=sys.stderr if stream is ... else stream, flush=True)


def seconds(s: float) -> str:
    """A duration for people: ``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def left(done: int, total: int, elapsed_s: float) -> str:
    """``~N left`` at the mean pace so far (empty before the first item or after the last)."""
    if done <= 0 or done >= total or elapsed_s <= 0:
        return ""
    return f"~{seconds(elapsed_s / done * (total - done))} left"
