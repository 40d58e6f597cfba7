"""PNG plots of a run: accuracy per round and bytes per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def plot_run(records: list[dict[str, Any]], run_dir: Path, title: str = "") -> list[Path]:
    """Write ``accuracy.png`` and ``bytes.png`` into ``run_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["global_accuracy"] for r in records], marker="o", label="global test")
    ax.set_xlabel("round (0 = cloud-pretrained model)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{title}: global test accuracy")
    ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    up = [r.get("uplink_bytes", 0) / 1024 for r in records]
    down = [r.get("downlink_bytes", 0) / 1024 for r in records]
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], up, width, label="uplink (clients -> server)")
    ax.bar([x + width / 2 for x in rounds], down, width, label="downlink (server -> clients)")
    ax.set_xlabel("round")
    ax.set_ylabel("kB per round (all clients)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{title}: bytes on the radio")
    ax.legend()
    fig.tight_layout()
    paths.append(run_dir / "bytes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
