"""Sparse-update schemes: which biases, layers and input channels a client trains.

A scheme is written in the format of tiny-training's ``schemes.json``::

    {"n_bias_update": 20, "weight_update_idx": [23, 24], "weight_update_ratio": [0.25, 1],
     "weight_select_criteria": "magnitude+"}

Layer indices count the model's convolutions in forward order from 0 (the
classifier excluded); ``n_bias_update`` counts convolutions back from the last one;
a ratio is the fraction of input channels (of channels, for a depthwise conv)
whose weights are trained, picked by largest weight norm (``magnitude+``) or at
random (``random``, seeded). The classifier is always trained. Presets: ``full``,
``bias-only``, ``last-k:N`` (weights and biases of the last N convolutions).

:func:`parse_scheme` reads a preset name, a JSON/TOML file (a ``schemes.json`` file
takes ``#id`` to pick one entry), or inline JSON; :func:`resolve` fixes it against a
model (channel indices); :func:`apply_scheme` sets what is trainable.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtiny.errors import SchemeError

__all__ = ["Scheme", "ResolvedScheme", "SchemeError", "parse_scheme", "resolve", "apply_scheme", "PRESETS",
           "trainable_slices"]

PRESETS = ("full", "bias-only", "last-k:N", "last-k:fit")
LAST_K_FIT = -1  # last-k:fit: the largest N whose step fits the fleet's smallest device (the task resolves it)
CRITERIA = ("magnitude+", "random")



@dataclass(frozen=True)
class Scheme:
    """A sparse-update scheme before it is fixed against a model (``None`` = every convolution)."""

    name: str = "full"
    n_bias_update: int | None = None
    weight_update: tuple[tuple[int, float], ...] | None = None
    weight_select: str = "magnitude+"
    last_k: int | None = None


@dataclass
class ResolvedScheme:
    """A scheme fixed against one model: per convolution, bias trained and weight channels trained."""

    name: str
    bias: list[bool]
    channels: list[list[int] | None]  # None: weight frozen; else trained input channels (sorted)
    in_channels: list[int] = field(default_factory=list)
    classifier: bool = True

    @property
    def num_convs(self) -> int:
        return len(self.bias)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ResolvedScheme":
        d = json.loads(text)
        return cls(d["name"], [bool(b) for b in d["bias"]],
                   [None if c is None else [int(i) for i in c] for c in d["channels"]],
                   [int(i) for i in d.get("in_channels", [])], bool(d.get("classifier", True)))

    def summary(self) -> str:
        w = sum(c is not None and len(c) > 0 for c in self.channels)
        return f"{self.name}: {sum(self.bias)} biases, {w} weight layers of {self.num_convs} convolutions + classifier"


def _from_dict(d: dict[str, Any], name: str) -> Scheme:
    allowed = {"id", "n_bias_update", "weight_update_idx", "weight_update_ratio", "weight_select_criteria"}
    extra = sorted(set(d) - allowed)
    if extra:
        raise SchemeError(f"scheme {name}: unknown key {extra[0]!r} (expected {', '.join(sorted(allowed))})")
    idx = list(d.get("weight_update_idx", []))
    ratio = list(d.get("weight_update_ratio", [1.0] * len(idx)))
    if len(idx) != len(ratio):
        raise SchemeError(f"scheme {name}: weight_update_idx has {len(idx)} entries, weight_update_ratio {len(ratio)}")
    for i, r in zip(idx, ratio):
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise SchemeError(f"scheme {name}: weight_update_idx {i!r} must be an integer >= 0")
        if not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise SchemeError(f"scheme {name}: weight_update_ratio {r!r} must be in [0, 1]")
    n_bias = d.get("n_bias_update", 0)
    if not isinstance(n_bias, int) or n_bias < 0:
        raise SchemeError(f"scheme {name}: n_bias_update {n_bias!r} must be an integer >= 0")
    crit = d.get("weight_select_criteria", "magnitude+")
    if crit not in CRITERIA:
        raise SchemeError(f"scheme {name}: weight_select_criteria {crit!r}; expected one of {', '.join(CRITERIA)}")
    return Scheme(str(d.get("id", name)), n_bias, tuple((int(i), float(r)) for i, r in zip(idx, ratio)), crit)


def parse_scheme(text: str) -> Scheme:
    """Read a scheme: a preset, inline JSON, or a JSON/TOML file (``schemes.json#id`` picks an entry)."""
    text = text.strip()
    if text == "full":
        return Scheme("full")
    if text == "bias-only":
        return Scheme("bias-only", None, ())
    if text == "last-k:fit":
        return Scheme(text, last_k=LAST_K_FIT)
    if text.startswith("last-k:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise SchemeError(f"scheme {text!r}: expected last-k:N with an integer N") from None
        if k < 0:
            raise SchemeError(f"scheme {text!r}: N must be >= 0")
        return Scheme(text, last_k=k)
    if text.startswith("{"):
        try:
            return _from_dict(json.loads(text), "inline")
        except json.JSONDecodeError as exc:
            raise SchemeError(f"scheme (inline JSON): {exc}") from None
    path_text, _, entry = text.partition("#")
    path = Path(path_text)
    if not path.is_file():
        raise SchemeError(f"scheme {text!r}: not a preset ({', '.join(PRESETS)}), inline JSON or an existing file")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SchemeError(f"{path}: cannot parse scheme ({exc})") from None
    if "schemes" in raw:  # a schemes.json collection
        entries = {s.get("id"): s for ss in raw["schemes"].values() for s in ss}
        if entry not in entries:
            raise SchemeError(f"{path}: pick a scheme with #id; known ids: {', '.join(sorted(map(str, entries)))}")
        return _from_dict(entries[entry], entry)
    return _from_dict(raw, path.stem)


def _select(weight: torch.Tensor, depthwise: bool, ratio: float, criterion: str, seed: int) -> list[int]:
    n = weight.shape[0] if depthwise else weight.shape[1]
    k = n if ratio >= 1 else int(n * ratio)
    if k >= n:
        return list(range(n))
    if k == 0:
        return []
    if criterion == "random":
        return sorted(int(i) for i in np.random.default_rng(seed).choice(n, k, replace=False))
    w = weight.detach().double()
    norms = w.flatten(1).norm(dim=1) if depthwise else w.transpose(0, 1).flatten(1).norm(dim=1)
    order = sorted(range(n), key=lambda i: (-float(norms[i]), i))
    return sorted(order[:k])


def resolve(scheme: Scheme, model, seed: int = 0) -> ResolvedScheme:
    """Fix ``scheme`` against an int8 model: which biases and which weight channels are trained."""
    convs = model.convs()
    n = len(convs)
    if scheme.last_k == LAST_K_FIT:
        raise SchemeError("scheme last-k:fit depends on the devices; resolve it with fedtiny.federated.task")
    if scheme.last_k is not None:
        k = min(scheme.last_k, n)
        n_bias, weights = k, tuple((i, 1.0) for i in range(n - k, n))
    else:
        n_bias = n if scheme.n_bias_update is None else scheme.n_bias_update
        weights = tuple((i, 1.0) for i in range(n)) if scheme.weight_update is None else scheme.weight_update
    if n_bias > n:
        raise SchemeError(f"scheme {scheme.name}: n_bias_update {n_bias} exceeds the model's {n} convolutions")
    bias = [i >= n - n_bias for i in range(n)]
    channels: list[list[int] | None] = [None] * n
    for idx, ratio in weights:
        if idx >= n:
            raise SchemeError(f"scheme {scheme.name}: weight_update_idx {idx} out of range "
                              f"(the model has {n} convolutions, 0..{n - 1})")
        sel = _select(convs[idx].weight, convs[idx].is_depthwise, ratio, scheme.weight_select, seed * 1000 + idx)
        if sel:
            channels[idx] = sel
            bias[idx] = True  # a weight-updated layer also updates its bias
    in_ch = [c.out_channels if c.is_depthwise else c.in_channels for c in convs]
    return ResolvedScheme(scheme.name, bias, channels, in_ch, True)


def apply_scheme(model, resolved: ResolvedScheme) -> None:
    """Make exactly the scheme's tensors trainable (``requires_grad``) and record weight channels."""
    convs = model.convs()
    if len(convs) != resolved.num_convs:
        raise SchemeError(f"scheme {resolved.name} was resolved for {resolved.num_convs} convolutions, "
                          f"the model has {len(convs)}")
    for conv, b, ch in zip(convs, resolved.bias, resolved.channels):
        conv.bias.requires_grad_(b)
        conv.weight.requires_grad_(ch is not None)
        conv.set_train_channels(ch)
    for p in model.classifier.parameters():
        p.requires_grad_(resolved.classifier)
    if hasattr(model.classifier, "set_train_channels"):
        model.classifier.set_train_channels(None)


def trainable_slices(model, spec: list[tuple[str, tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Flat positions each tensor of ``spec`` may change under the applied scheme (all, for whole tensors)."""
    out = {}
    for name, shape, _ in spec:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        n = int(np.prod(shape))
        sel = getattr(module, "train_channels", None) if attr == "weight" else None
        if sel is None:
            out[name] = np.arange(n, dtype=np.int64)
            continue
        mask = np.zeros(shape, bool)
        if module.is_depthwise:
            mask[sel] = True
        else:
            mask[:, sel] = True
        out[name] = np.flatnonzero(mask.ravel())
    return out
