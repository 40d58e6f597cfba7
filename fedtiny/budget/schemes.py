"""Sparse-update schemes: which biases, layers and input channels a client trains.

A scheme is written in the format of tiny-training's ``schemes.json``::

    {"n_bias_update": 20, "weight_update_idx": [23, 24], "weight_update_ratio": [0.25, 1],
     "weight_select_criteria": "magnitude+"}

Layer indices count the model's convolutions in forward order from 0 (the
classifier excluded); ``n_bias_update`` counts convolutions back from the last one;
a ratio is the fraction of input channels (of channels, for a depthwise conv)
whose weights are trained, picked by largest weight norm (``magnitude+``) or at
random (``random``, seeded), or named explicitly (``weight_update_channels``, one list per
entry of ``weight_update_idx``). The classifier is always trained. Presets: ``full``,
``bias-only``, ``last-k:N`` (weights and biases of the last N convolutions), and the rules a
device's budget decides (resolved by :mod:`fedtiny.federated.task` with :mod:`fedtiny.search`):
``last-k:fit``, ``search`` (contribution analysis + evolutionary search), ``fisher``
(Fisher-information ranking) and ``random:N`` (the N-th random scheme that fits).

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
from fedtiny.int8.lite_residual import LiteSpec, is_lite, lite_convs, parse_lite

__all__ = [
    "Scheme",
    "ResolvedScheme",
    "SchemeError",
    "parse_scheme",
    "resolve",
    "apply_scheme",
    "PRESETS",
    "trainable_slices",
    "redraw_channels",
    "union",
]

PRESETS = ("full", "bias-only", "last-k:N", "last-k:fit", "search", "fisher", "random:N", "lite-residual[:options]")
LAST_K_FIT = -1  # last-k:fit: the largest N whose step fits the device (the task resolves it)
CRITERIA = ("magnitude+", "random")
RULES = ("search", "fisher", "random")  # schemes chosen for a device's budget (the task resolves them)
# Facts a search writes beside a scheme; a scheme file may carry them, resolving ignores them.
INFO_KEYS = ("predicted_gain", "peak_sram_bytes", "budget_bytes", "device", "model", "rule")


@dataclass(frozen=True)
class Scheme:
    """A sparse-update scheme before it is fixed against a model (``None`` = every convolution)."""

    name: str = "full"
    n_bias_update: int | None = None
    weight_update: tuple[tuple[int, float], ...] | None = None
    weight_select: str = "magnitude+"
    last_k: int | None = None
    weight_channels: tuple[tuple[int, ...], ...] | None = None  # explicit channels per weight_update entry
    rule: str = ""  # search, fisher, random: chosen per device (``name`` then carries random's N)
    lite: LiteSpec | None = None  # TinyTL's lite residual modules (the task extends the model with them)


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

    def layout(self) -> tuple:
        """What the memory of a step depends on: trained biases and the number of trained channels."""
        return tuple(self.bias), tuple(-1 if c is None else len(c) for c in self.channels), self.classifier

    def to_dict(self) -> dict[str, Any]:
        """This scheme in ``schemes.json`` form, its channels named explicitly."""
        n = self.num_convs
        last = next((i for i in range(n) if all(self.bias[i:])), n)
        idx = [i for i, c in enumerate(self.channels) if c]
        return {
            "id": self.name,
            "n_bias_update": n - last,
            "weight_update_idx": idx,
            "weight_update_ratio": [
                round(len(self.channels[i]) / self.in_channels[i], 4) if self.in_channels else 1.0 for i in idx
            ],
            "weight_update_channels": [list(self.channels[i]) for i in idx],
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ResolvedScheme":
        d = json.loads(text)
        return cls(
            d["name"],
            [bool(b) for b in d["bias"]],
            [None if c is None else [int(i) for i in c] for c in d["channels"]],
            [int(i) for i in d.get("in_channels", [])],
            bool(d.get("classifier", True)),
        )

    def summary(self) -> str:
        w = sum(c is not None and len(c) > 0 for c in self.channels)
        return f"{self.name}: {sum(self.bias)} biases, {w} weight layers of {self.num_convs} convolutions + classifier"


def _from_dict(d: dict[str, Any], name: str) -> Scheme:
    allowed = {
        "id",
        "n_bias_update",
        "weight_update_idx",
        "weight_update_ratio",
        "weight_select_criteria",
        "weight_update_channels",
        *INFO_KEYS,
    }
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
    chans = d.get("weight_update_channels")
    if chans is not None:
        if (
            not isinstance(chans, list)
            or len(chans) != len(idx)
            or not all(
                isinstance(c, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in c)
                for c in chans
            )
        ):
            raise SchemeError(
                f"scheme {name}: weight_update_channels must be {len(idx)} lists of channel "
                "indices >= 0, one per weight_update_idx entry"
            )
        chans = tuple(tuple(sorted(set(c))) for c in chans)
    return Scheme(
        str(d.get("id", name)),
        n_bias,
        tuple((int(i), float(r)) for i, r in zip(idx, ratio)),
        crit,
        weight_channels=chans,
    )


def parse_scheme(text: str) -> Scheme:
    """Read a scheme: a preset, inline JSON, or a JSON/TOML file (``schemes.json#id`` picks an entry)."""
    text = text.strip()
    if is_lite(text):
        return Scheme(text, lite=parse_lite(text))
    if text == "full":
        return Scheme("full")
    if text == "bias-only":
        return Scheme("bias-only", None, ())
    if text == "last-k:fit":
        return Scheme(text, last_k=LAST_K_FIT)
    if text in ("search", "fisher"):
        return Scheme(text, rule=text)
    if text.startswith("random:"):
        n = text.split(":", 1)[1]
        if not n.isdigit():
            raise SchemeError(f"scheme {text!r}: expected random:N with an integer N >= 0")
        return Scheme(text, rule="random")
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
    values = norms.tolist()  # Python floats (a tensor indexed per element is slow in a search's loop)
    order = sorted(range(n), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def _in_channels(conv) -> int:
    """A convolution's weight channels a scheme selects among: a depthwise's channels, else its inputs."""
    return conv.out_channels if conv.is_depthwise else conv.in_channels


def resolve(scheme: Scheme, model, seed: int = 0) -> ResolvedScheme:
    """Fix ``scheme`` against an int8 model: which biases and which weight channels are trained."""
    convs = model.convs()
    n = len(convs)
    if scheme.last_k == LAST_K_FIT or scheme.rule:
        raise SchemeError(f"scheme {scheme.name} depends on the device; resolve it with fedtiny.federated.task")
    if scheme.lite is not None:
        lite = lite_convs(model)
        if not lite:
            raise SchemeError(
                f"scheme {scheme.name}: the model has no lite residual modules (the task adds them when "
                "train.scheme is lite-residual)"
            )
        n_bias = n if scheme.lite.biases == "all" else 0
        bias = [n_bias > 0 or i in lite for i in range(n)]
        in_ch = [_in_channels(c) for c in convs]
        channels = [list(range(in_ch[i])) if i in lite else None for i in range(n)]
        return ResolvedScheme(scheme.name, bias, channels, in_ch, True)
    if scheme.last_k is not None:
        k = min(scheme.last_k, n)
        n_bias, weights = k, tuple((i, 1.0) for i in range(n - k, n))
    else:
        n_bias = n if scheme.n_bias_update is None else scheme.n_bias_update
        weights = tuple((i, 1.0) for i in range(n)) if scheme.weight_update is None else scheme.weight_update
    # a scheme of layer indices is made for one model: another model needs a preset, which fits any
    other = "; a scheme names one model's layers: for this model use a preset (last-k:fit, full, bias-only or search)"
    if n_bias > n:
        raise SchemeError(f"scheme {scheme.name}: n_bias_update {n_bias} exceeds the model's {n} convolutions{other}")
    bias = [i >= n - n_bias for i in range(n)]
    channels: list[list[int] | None] = [None] * n
    in_ch = [_in_channels(c) for c in convs]
    for j, (idx, ratio) in enumerate(weights):
        if idx >= n:
            raise SchemeError(
                f"scheme {scheme.name}: weight_update_idx {idx} out of range "
                f"(the model has {n} convolutions, 0..{n - 1}){other}"
            )
        if scheme.weight_channels is not None:
            sel = list(scheme.weight_channels[j])
            if sel and sel[-1] >= in_ch[idx]:
                raise SchemeError(
                    f"scheme {scheme.name}: weight_update_channels of layer {idx} names channel "
                    f"{sel[-1]}; the layer has {in_ch[idx]}"
                )
        elif convs[idx].groups > 1 and not convs[idx].is_depthwise:  # grouped (a depth multiplier): whole or not
            if 0 < ratio < 1:
                raise SchemeError(
                    f"scheme {scheme.name}: layer {idx} ({convs[idx].tag}) is a grouped convolution, "
                    f"trained whole or not at all: weight_update_ratio {ratio} is not 0 or 1"
                )
            sel = list(range(in_ch[idx])) if ratio >= 1 else []
        else:
            sel = _select(convs[idx].weight, convs[idx].is_depthwise, ratio, scheme.weight_select, seed * 1000 + idx)
        if sel:
            channels[idx] = sel
            bias[idx] = True  # a weight-updated layer also updates its bias
    return ResolvedScheme(scheme.name, bias, channels, in_ch, True)


def redraw_channels(resolved: ResolvedScheme, seed: list[int]) -> ResolvedScheme:
    """The same layers and channel counts, with each trained layer's channels drawn afresh (seeded).

    Dynamic channels: the memory of a step depends only on the counts (:meth:`ResolvedScheme.layout`),
    so it is unchanged, while over many draws every channel of a trained layer gets updates.
    """
    rng = np.random.default_rng(seed)
    channels = [
        c if c is None or len(c) in (0, n) else sorted(int(i) for i in rng.choice(n, len(c), replace=False))
        for c, n in zip(resolved.channels, resolved.in_channels)
    ]
    return ResolvedScheme(resolved.name, list(resolved.bias), channels, list(resolved.in_channels), resolved.classifier)


def union(schemes: list[ResolvedScheme]) -> ResolvedScheme:
    """Everything any of ``schemes`` trains (the server's view of a mixed fleet)."""
    first = schemes[0]
    channels: list[list[int] | None] = []
    for i in range(first.num_convs):
        sets = [s.channels[i] for s in schemes if s.channels[i] is not None]
        channels.append(sorted(set().union(*sets)) if sets else None)
    return ResolvedScheme(
        "+".join(dict.fromkeys(s.name for s in schemes)),
        [any(s.bias[i] for s in schemes) for i in range(first.num_convs)],
        channels,
        list(first.in_channels),
        any(s.classifier for s in schemes),
    )


def apply_scheme(model, resolved: ResolvedScheme) -> None:
    """Make exactly the scheme's tensors trainable (``requires_grad``) and record weight channels."""
    convs = model.convs()
    if len(convs) != resolved.num_convs:
        raise SchemeError(
            f"scheme {resolved.name} was resolved for {resolved.num_convs} convolutions, the model has {len(convs)}"
        )
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
