"""Device time of a training step, op kind by op kind: the work of each kind and what it costs.

A step's work is counted per **kind** of op (``pointwise``, ``depthwise``, ``regular`` convolutions,
``fc`` fully connected layers) and **part**:

- ``forward``: the forward's MACs;
- ``input``: the input gradient's MACs (an op through which a gradient flows to a trained tensor);
- ``weight``: the weight gradient's MACs (trained channels only);
- ``gradient``: elements of the output gradient an op quantizes (QAS's int8 gradient, the bias gradient),
  counted as elements, not MACs;
- ``update``: weight elements the optimizer writes (every element of a trained weight: stochastic rounding
  and momentum move untrained ones too);
- ``elementwise``: elements of ADD and pooling, forward and backward;
- per (kind, part), the elements the part writes (outputs; input gradient elements; weight gradient
  elements), and the output planes the forward sets up.

:class:`fedtiny.devices.KernelCosts` holds a core's cycles per MAC and per element written of each kind
and part, per plane, per gradient element, per elementwise element and per weight element updated, measured on fedtiny's own C kernels in QEMU (``make firmware-profile``;
docs/results/device-time.md).
The same work is counted from the memory planner's schedule (:func:`schedule_work`, what the simulator
charges) and from the C step's op list (:func:`c_op_work`, what the firmware's profile is attributed to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from fedtiny.devices import KernelCosts

__all__ = ["KINDS", "PARTS", "conv_kind", "OpWork", "StepWork", "schedule_work", "c_op_work", "fit_costs"]

KINDS = ("pointwise", "depthwise", "regular", "fc")
PARTS = ("forward", "input", "weight")


def conv_kind(
    kernel_hw: tuple[int, int],
    groups: int,
    in_channels: int,
    out_channels: int,
    out_hw: tuple[int, int],
    stride: int = 1,
) -> str:
    """The kernel kind a convolution runs on: ``fc`` (1 x 1 output of a 1 x 1 kernel), ``pointwise`` (1 x 1,
    stride 1, one group), ``depthwise`` (one channel per group) or ``regular``."""
    if groups == in_channels == out_channels and groups > 1:
        return "depthwise"
    if tuple(kernel_hw) == (1, 1) and groups == 1:
        if tuple(out_hw) == (1, 1):
            return "fc"
        if stride == 1:
            return "pointwise"
    return "regular"


@dataclass
class OpWork:
    """One op's work in one sample's step."""

    name: str
    kind: str  # a KINDS entry, or an elementwise op's kind (add, avgpool, ...)
    macs: dict[str, int] = field(default_factory=dict)  # part -> MACs
    gradient_elements: int = 0
    elementwise: int = 0
    updated: int = 0  # weight elements the update writes
    written: dict[str, int] = field(default_factory=dict)  # part -> elements it writes (outputs, gx, gw)
    channels: int = 0  # output planes the forward sets up (a convolution's output channels)


@dataclass
class StepWork:
    """A step's work per sample, summed over ops."""

    macs: dict[tuple[str, str], int]  # (kind, part) -> MACs
    gradient_elements: int
    elementwise: int
    updated: int = 0
    written: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, part) -> elements written
    channels: int = 0  # convolutions' output planes the forward sets up

    @classmethod
    def of(cls, ops: Iterable[OpWork]) -> "StepWork":
        macs: dict[tuple[str, str], int] = {}
        written: dict[tuple[str, str], int] = {}
        grad = elem = upd = ch = 0
        for op in ops:
            for part, n in op.macs.items():
                if n:
                    macs[(op.kind, part)] = macs.get((op.kind, part), 0) + n
                    written[(op.kind, part)] = written.get((op.kind, part), 0) + op.written.get(part, 0)
            grad += op.gradient_elements
            elem += op.elementwise
            upd += op.updated
            ch += op.channels
        return cls(macs, grad, elem, upd, written, ch)

    @property
    def forward_macs(self) -> int:
        return sum(n for (_, part), n in self.macs.items() if part == "forward")

    @property
    def backward_macs(self) -> int:
        return sum(n for (_, part), n in self.macs.items() if part != "forward")


def _conv_work(
    name: str,
    kind: str,
    forward: int,
    input_grad: bool,
    weight_macs: int,
    outputs: int,
    gradient: bool,
    updated: int,
    inputs: int,
    weight_elements: int,
    channels: int,
) -> OpWork:
    """``weight_elements``: the weight gradient's elements (trained rows x trained elements of a row)."""
    return OpWork(
        name,
        kind,
        {"forward": forward, "input": forward if input_grad else 0, "weight": weight_macs},
        outputs if gradient else 0,
        0,
        updated,
        {"forward": outputs, "input": inputs if input_grad else 0, "weight": weight_elements},
        channels,
    )


def c_op_work(ops: list[dict]) -> list[OpWork]:
    """Each op of the C step's list (:meth:`fedtiny.int8.cstep.CStep.op_geometry`) with its work per sample,
    as ``device/c/fedtiny_step.c`` does it: which tensors a gradient reaches (``needs``), input gradients
    where one flows to a trained tensor, weight gradients for trained channels."""

    def inputs(op: dict) -> list[int]:  # every input (a MUL's and a concat's too); in0 and in1 of older lists
        return op.get("inputs") or [op["in0"]] + ([op["in1"]] if op["kind"] == "add" else [])

    needs = [False]
    out: list[OpWork] = []
    for op in ops:
        trains = op["kind"] == "conv" and (op["train_w"] or op["train_b"])
        needs.append(any(needs[t] for t in inputs(op)) or trains)
    for i, op in enumerate(ops):
        outputs = op["oc"] * op["oh"] * op["ow"]
        if op["kind"] != "conv":
            backward = outputs if needs[i + 1] and any(needs[t] for t in inputs(op)) else 0
            out.append(OpWork(op["name"], op["kind"], {}, 0, outputs + backward))
            continue
        cpg, kk = op["c"] // op["groups"], op["kh"] * op["kw"]
        kind = conv_kind((op["kh"], op["kw"]), op["groups"], op["c"], op["oc"], (op["oh"], op["ow"]), op["stride"])
        forward = outputs * cpg * kk
        weight = grads = 0
        if op["train_w"]:
            trained = op["trained_channels"]  # input channels (depthwise: channels) whose weights train
            grads = (trained if kind == "depthwise" else op["oc"] * trained) * kk
            weight = grads * op["oh"] * op["ow"]
        updated = op["oc"] * cpg * kk if op["train_w"] else 0
        out.append(
            _conv_work(
                op["name"],
                kind,
                forward,
                needs[i + 1] and needs[op["in0"]],
                weight,
                outputs,
                needs[i + 1],
                updated,
                op["c"] * op["h"] * op["w"],
                grads,
                op["oc"],
            )
        )
    return out


def schedule_work(ops) -> list[OpWork]:
    """Each op of the memory planner's schedule (one sample; fused pairs given as their two convolutions:
    :func:`fedtiny.budget.memory.step_work` does that) with its work, as
    :func:`fedtiny.budget.memory.step_macs` counts it: an input gradient for every op after the first
    trained one (a trained tensor lies upstream), weight gradients for trained channels."""
    out: list[OpWork] = []
    upstream = False
    for op in ops:
        m = op.module
        outputs = math.prod(op.out_shape)
        if op.kind not in ("conv", "float-head"):  # elementwise: no MACs
            out.append(OpWork(getattr(m, "tag", op.kind), op.kind, {}, 0, outputs * (2 if upstream else 1)))
            continue
        updated = m.weight.numel() if m.weight.requires_grad else 0
        inputs = math.prod(op.in_shape[1:])
        if op.kind == "float-head":  # a float head: a fully connected layer
            kind, forward = "fc", m.weight.numel()
            trained = grads = forward if m.weight.requires_grad else 0
        else:
            hw = tuple(op.out_shape[1:]) if len(op.out_shape) == 3 else (1, 1)
            kind = conv_kind(tuple(m.kernel_hw), m.groups, m.in_channels, m.out_channels, hw, getattr(m, "stride", 1))
            forward = outputs * (m.in_channels // m.groups) * math.prod(m.kernel_hw)
            grads = m.trained_weight_elements() if m.weight.requires_grad else 0
            trained = round(forward * grads / m.weight.numel())
        trains = any(p.requires_grad for p in m.parameters())
        out.append(
            _conv_work(
                getattr(m, "tag", kind),
                kind,
                forward,
                upstream,
                trained,
                outputs,
                upstream or trains,
                updated,
                inputs,
                grads,
                op.out_shape[0],
            )
        )
        upstream |= trains
    return out


def fit_costs(
    measured: list[tuple[OpWork, dict[str, float]]], samples_per_step: float, source: str, outside: float = 0.0
) -> KernelCosts:
    """Costs from a profile. Per part, the ops' cycles are fitted (non-negative least squares) as a cost per
    MAC and a cost per element written of each kind (an output's requantization and store; a gathered input
    gradient element against a float add; a weight gradient element), and, in the forward, one cost per
    output plane set up (padding a plane, a kernel call per row), shared by every kind: the terms that make
    a small layer dearer per MAC than a large one. The quantization part costs per gradient element, ADD
    and pooling per element, the update (once per step) per weight element written. ``measured`` pairs
    each op's work (one sample's) with its cycles per step by part (``forward``, ``quantize``, ``input``,
    ``weight``, ``update``), steps of ``samples_per_step`` samples. ``outside`` is the step's cycles outside
    any op (the loss, the float gradient buffers taken zeroed, the ADD and pooling backward, the step's
    set-up: 4% of tiny-ir's step at batch 1 and 16): it is charged with the quantization per gradient
    element, the count that follows the gradient buffers' sizes."""
    from scipy.optimize import nnls  # ~0.5 s to import: loaded only when costs are fitted

    sums = {"quantize": [0.0, 0], "update": [0.0, 0], "elementwise": [0.0, 0]}
    per_mac: list[tuple[tuple[str, str], float]] = []
    per_written: list[tuple[tuple[str, str], float]] = []
    per_channel = 0.0
    for part in PARTS:
        rows = [(w, c[part] / samples_per_step) for w, c in measured if w.macs.get(part)]
        if not rows:
            continue
        kinds = sorted({w.kind for w, _ in rows})
        # A kind whose ops all do the same MACs per element written (tiny-ir's depthwise layers are all 3x3)
        # cannot tell the two terms apart: its cost is charged per MAC, so that a 7x7 window costs more
        # than a 3x3 one, as the window kernels' loops do (per element, it would cost the same).
        ratios = {
            k: {w.macs[part] / w.written[part] for w, _ in rows if w.kind == k and w.written.get(part)} for k in kinds
        }
        fixed = {k for k in kinds if len(ratios[k]) == 1}
        a = np.array(
            [
                [w.macs[part] if w.kind == k else 0 for k in kinds]
                + [w.written.get(part, 0) if w.kind == k and k not in fixed else 0 for k in kinds]
                + ([w.channels] if part == "forward" else [])
                for w, _ in rows
            ],
            dtype=float,
        )
        y = np.array([c for _, c in rows])
        scale = a.max(axis=0)
        scale[scale == 0] = 1.0
        x, _ = nnls(a / scale, y)
        x = x / scale
        per_mac += [((k, part), round(float(v), 3)) for k, v in zip(kinds, x[: len(kinds)])]
        per_written += [((k, part), round(float(v), 2)) for k, v in zip(kinds, x[len(kinds) : 2 * len(kinds)])]
        if part == "forward":
            per_channel = round(float(x[-1]), 1)
    for work, per_step in measured:
        cycles = {part: v / samples_per_step for part, v in per_step.items() if part != "update"}
        if not work.macs:  # elementwise ops
            sums["elementwise"][0] += sum(cycles.values())
            sums["elementwise"][1] += work.elementwise
            continue
        sums["quantize"][0] += cycles.get("quantize", 0.0)
        sums["quantize"][1] += work.gradient_elements
        sums["update"][0] += per_step.get("update", 0.0)
        sums["update"][1] += work.updated

    sums["quantize"][0] += outside / samples_per_step

    def per(name: str) -> float:
        total, count = sums[name]
        return round(total / count, 2) if count else 0.0

    return KernelCosts(
        tuple(sorted(per_mac)),
        per("quantize"),
        per("elementwise"),
        per("update"),
        source,
        tuple(sorted(per_written)),
        per_channel,
    )
