"""What the honest-but-curious server knows and observes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ThreatModel", "DEFENSES"]


@dataclass(frozen=True)
class ThreatModel:
    """The attacker's knowledge.

    Attributes
    ----------
    observation
        ``gradient`` (one gradient of the client's batch) or ``delta`` (the FedAvg
        parameter change after ``local_steps`` SGD steps of ``lr`` on that batch).
    local_steps, lr, batch_size
        The client's local training, known to the server (it sets them).
    labels
        ``known`` (the server knows the labels), ``idlg`` (recovered from the last
        layer's update), or ``optimize`` (DLG: optimized jointly as soft labels).
    density
        Share of each tensor's coordinates the client transmits (top-k by magnitude);
        only those are matched.
    values
        The value type the transmitted values travel in (:mod:`fedtiny.compress.values`); the attacker
        sees what arrives (the type's torch twin).
    trainable
        Names of the tensors the client sends (a sparse-update scheme); None = all.
    """

    observation: str = "gradient"
    local_steps: int = 1
    lr: float = 0.1
    batch_size: int = 1
    labels: str = "idlg"
    density: float = 1.0
    values: str = "fp32"
    trainable: tuple[str, ...] | None = None


# Defenses of `fedtiny attack --defense`: what the client does to its update before sending.
DEFENSES: dict[str, dict] = {
    "none": {},
    "prune-20": {"density": 0.8},  # DLG's pruning: the 20% smallest coordinates are not sent
    "prune-90": {"density": 0.1},
    "topk-1": {"density": 0.01},
    "fp16": {"values": "fp16"},
    "int8": {"values": "int8"},
    "ternary": {"values": "ternary"},
    "topk-1-ternary": {"density": 0.01, "values": "ternary"},
}
