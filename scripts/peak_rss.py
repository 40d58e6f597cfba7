#!/usr/bin/env python3
"""Run a command and report the peak of the summed resident memory of all its processes.

Samples every second (``--interval``) the RSS of the command's process tree (its
descendants, and every process of the session it starts in, which catches Ray's
raylet, GCS and workers), sums it, and prints the peak as JSON on stderr's last line:
``{"peak_rss_mb": ..., "peak_processes": ..., "wall_s": ..., "returncode": ...}``.
Linux only (reads /proc).

    scripts/peak_rss.py -- .venv/bin/fedtiny run scenarios/scale.toml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _procs() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, resident bytes) for every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (int(fields[1]), int(fields[3]), rss)
    return out


def tree_rss(root: int) -> tuple[int, int]:
    """Summed RSS and count of ``root``, its descendants and its session's processes."""
    procs = _procs()
    if root not in procs:
        return 0, 0
    session = procs[root][1]
    members = {pid for pid, (_, sid, _) in procs.items() if sid == session}
    members.add(root)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sum(procs[p][2] for p in members), len(members)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give a command after --")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    peak, peak_n = 0, 0
    while proc.poll() is None:
        rss, n = tree_rss(proc.pid)
        if rss > peak:
            peak, peak_n = rss, n
        time.sleep(args.interval)
    result = {
        "peak_rss_mb": round(peak / 2**20, 1),
        "peak_processes": peak_n,
        "wall_s": round(time.monotonic() - t0, 1),
        "returncode": proc.returncode,
    }
    print(json.dumps(result), file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
