"""The memory model: does one training step of an int8 model under a scheme fit a device?

``planner`` accounting walks the step's execution schedule from the model's
shapes alone and reports the peak SRAM and where it occurs:

- forward activation buffers (int8), freed as soon as no later op reads them (a
  residual block's input lives until its add); depthwise convolutions in place
  (TinyEngine) unless switched off;
- per-op workspace (im2col columns, padded depthwise channel);
- tensors saved for backward, only where a gradient needs them: 1-bit clamp masks
  of ops a gradient flows through, int8 inputs of the trained weight channels;
- activation gradients (fp32) during the backward pass, the residual's pending
  gradient until its block is done;
- weight/bias gradients: transient with operator reordering (each applied as soon
  as it is computed), otherwise all held until the optimizer step;
- persistent for the whole step: the trained parameters copied to SRAM (int8
  weights of the trained channels, int32 biases, an fp32 head), optimizer state
  (fp32 momentum or Adam moments). Frozen weights stay in flash.

``paper`` accounting is the tiny-training count of what a sparse update saves for
backward: 1-bit ReLU masks of updated layers, int8 inputs of weight-updated
channels, int8 updated weights, int32 updated biases, the classifier's input.

:func:`measure_step` runs a real training step of the same model with the
:class:`~fedtiny.int8.ledger.Ledger` recording; its peak equals the planner's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fedtiny.budget.schemes import ResolvedScheme, apply_scheme
from fedtiny.budget.step_time import StepWork, schedule_work
from fedtiny.devices import DeviceProfile
from fedtiny.errors import ScenarioError
from fedtiny.int8.graph import FloatHead, QConv, QModel, fusable, fused_events
from fedtiny.int8.ledger import GRAD_BYTES, Ledger, OpEvents, recording
from fedtiny.int8.optim import QuantizedOptimizer
from fedtiny.int8.optimizers import optimizer_kind
from fedtiny.int8.resolver import kind_of

__all__ = [
    "optimizer_slots",
    "MemoryReport",
    "LayerRow",
    "ScheduledOp",
    "schedule",
    "plan",
    "paper_count",
    "persistent_bytes",
    "measure_step",
    "flash_bytes",
    "memory_report",
    "step_macs",
    "step_work",
    "op_macs",
    "c_layout",
]


@dataclass
class LayerRow:
    """One op of the schedule."""

    index: int
    name: str
    kind: str
    out_shape: tuple[int, ...]
    activation_bytes: int
    saved_bytes: int = 0
    trained_param_bytes: int = 0
    forward_peak_bytes: int = 0
    backward_peak_bytes: int = 0


@dataclass
class MemoryReport:
    """The answer for one (model, scheme, device) triple."""

    accounting: str
    scheme: str
    peak_sram_bytes: int
    peak_at: str
    flash_bytes: int
    saved_for_backward_bytes: int
    persistent_bytes: int
    device: str | None
    sram_bytes: int | None
    device_flash_bytes: int | None
    fits: bool | None
    reorder: bool
    inplace_depthwise: bool
    batch_size: int
    layers: list[LayerRow] = field(default_factory=list)
    breakdown: dict[str, int] = field(default_factory=dict)
    macs_forward: int = 0
    macs_backward: int = 0
    arena_bytes: int = 0  # the peak without the persistent state and the input sample: a step's arena
    accumulate: bool = False
    work: Any = None  # one sample's work by op kind and part (fedtiny.budget.step_time.StepWork)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the step: forward plus the scheme's sparse backward."""
        return self.macs_forward + self.macs_backward

    def reason(self) -> str:
        """One line saying whether and why it (does not) fit."""
        if self.fits is None:
            return f"peak SRAM {self.peak_sram_bytes:,} B (no device given)"
        if self.fits:
            return (
                f"fits {self.device}: peak SRAM {self.peak_sram_bytes:,} B <= {self.sram_bytes:,} B, "
                f"flash {self.flash_bytes:,} B <= {self.device_flash_bytes:,} B"
            )
        parts = []
        if self.peak_sram_bytes > (self.sram_bytes or 0):
            parts.append(f"peak SRAM {self.peak_sram_bytes:,} B > {self.sram_bytes:,} B at {self.peak_at}")
        if self.flash_bytes > (self.device_flash_bytes or 0):
            parts.append(f"flash {self.flash_bytes:,} B > {self.device_flash_bytes:,} B")
        return f"does not fit {self.device}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason()
        d["macs"] = self.macs
        if self.work is not None:  # (kind, part) keys as "kind/part"
            d["work"] = {
                **d["work"],
                "macs": {f"{k}/{p}": n for (k, p), n in self.work.macs.items()},
                "written": {f"{k}/{p}": n for (k, p), n in self.work.written.items()},
            }
        return d


def optimizer_slots(optimizer: str, momentum: float) -> int:
    """fp32 values the optimizer keeps per trained element: Adam's two moments, momentum, or none."""
    return optimizer_kind(optimizer).state_slots(momentum)


def persistent_bytes(model: QModel, optimizer: str = "sgd+qas", momentum: float = 0.0) -> dict[str, int]:
    """SRAM held for the whole step: trained parameters (device dtypes) and optimizer state (fp32)."""
    params = elements = 0
    for conv in model.convs() + ([model.classifier] if isinstance(model.classifier, QConv) else []):
        w = conv.trained_weight_elements()
        b = conv.out_channels if conv.bias.requires_grad else 0
        params += w + 4 * b
        elements += w + b
    if isinstance(model.classifier, FloatHead):
        n = sum(p.numel() for p in model.classifier.parameters() if p.requires_grad)
        params += 4 * n
        elements += n
    return {"trained_params": params, "optimizer_state": 4 * elements * optimizer_slots(optimizer, momentum)}


def flash_bytes(model: QModel) -> int:
    """Model bytes in flash: int8 weights, int32 biases, fp32 scales and quantization parameters."""
    total = 0
    for name, t in model.state_dict().items():
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        attr = name.rpartition(".")[2]
        if isinstance(module, QConv) and attr == "weight":
            total += t.numel()
        else:
            total += 4 * t.numel()  # int32 biases, fp32 scales/zero points, an fp32 head
    return total


@dataclass(frozen=True)
class ScheduledOp:
    """One op of a training step's schedule: the module, its shapes and the buffers it holds."""

    kind: str  # conv, fused, add, pool, head
    module: Any  # the op's module; for a fused op, its (pointwise, depthwise) pair
    in_shape: tuple[int, ...]  # N x C x H x W
    out_shape: tuple[int, ...]  # C x H x W (per sample)
    events: OpEvents

    @property
    def trains(self) -> bool:
        """A weight or bias of this op is trained."""
        return self.kind in ("conv", "float-head") and any(p.requires_grad for p in self.module.parameters())


def _frozen(*modules: nn.Module) -> bool:
    return not any(p.requires_grad for m in modules for p in m.parameters())


def schedule(
    model: QModel,
    input_shape: tuple[int, int, int],
    batch: int = 1,
    *,
    fuse: bool = True,
    inplace_depthwise: bool = True,
) -> list[ScheduledOp]:
    """The forward schedule of one training step from shapes alone, with each op's buffers.

    Each op computes its own :class:`~fedtiny.int8.ledger.OpEvents` (the same method the
    int8 graph calls while a step runs) from its :class:`~fedtiny.int8.graph.Wiring`; this walk
    supplies the shapes and whether a gradient must reach each op's input (something upstream
    is trained). The graph runs up to its head.
    """
    ops: list[ScheduledOp] = []
    wiring = model.wiring()
    nodes = model.nodes[: len(wiring)]
    shapes: dict[str, tuple[int, ...]] = {"input": (batch, *input_shape)}
    upstream: dict[str, bool] = {"input": False}  # a trained tensor upstream of each tensor
    i = 0
    while i < len(nodes):
        node, m, w = nodes[i], model.op(nodes[i].op), wiring[i]
        ins = [shapes[t] for t in node.inputs]
        ups = [upstream[t] for t in node.inputs]
        kind = kind_of(m)
        if kind.view:
            shapes[node.op], upstream[node.op] = (batch, *m.out_shape(ins[0][1:])), ups[0]
            i += 1
            continue
        nxt = model.op(nodes[i + 1].op) if i + 1 < len(nodes) else None
        if (
            fuse
            and nxt is not None
            and fusable(m, nxt)
            and nodes[i + 1].inputs == (node.op,)
            and model._only_reader(i)
            and not ups[0]
            and _frozen(m, nxt)
        ):
            out = (nxt.out_channels, *nxt.out_hw(m.out_hw(ins[0][2:])))
            ops.append(ScheduledOp("fused", (m, nxt), ins[0], out, fused_events(m, nxt, ins[0], w)))
            shapes[nodes[i + 1].op], upstream[nodes[i + 1].op] = (batch, *out), False
            i += 2
            continue
        if not hasattr(m, "schedule"):
            raise ScenarioError(f"memory: op {node.op} ({kind.name}) cannot be part of a training step")
        out, events = m.schedule(ins, w, ups, inplace_depthwise=inplace_depthwise)
        op = ScheduledOp(kind.name, m, ins[0], out, events)
        ops.append(op)
        shapes[node.op] = (batch, *op.out_shape)
        upstream[node.op] = any(ups) or op.trains
        i += 1
    return ops


def trained_elements(model: QModel) -> int:
    """Elements of the trained parameters (the trained channels' weights and the trained biases)."""
    n = 0
    for conv in model.convs() + ([model.classifier] if isinstance(model.classifier, QConv) else []):
        n += conv.trained_weight_elements() + (conv.out_channels if conv.bias.requires_grad else 0)
    if isinstance(model.classifier, FloatHead):
        n += sum(p.numel() for p in model.classifier.parameters() if p.requires_grad)
    return n


def plan(
    model: QModel,
    input_shape: tuple[int, int, int],
    *,
    optimizer: str = "sgd+qas",
    momentum: float = 0.0,
    reorder: bool = True,
    inplace_depthwise: bool = True,
    fuse_frozen: bool = True,
    batch: int = 1,
    accumulate: bool = False,
) -> tuple[Ledger, list[ScheduledOp]]:
    """Replay one training step's buffers from shapes; return the accounting ledger and the schedule.

    ``accumulate``: the step trains more samples than ``batch`` (the micro-batch), summing the parameter
    gradients over micro-batches in fp32 accumulators held for the whole step.
    """
    L = Ledger(reorder=reorder, inplace_depthwise=inplace_depthwise, fuse_frozen=fuse_frozen, accumulate=accumulate)
    for k, v in persistent_bytes(model, optimizer, momentum).items():
        L.alloc(f"persistent:{k}", v, "persistent")
    if accumulate:
        L.alloc("accumulators", GRAD_BYTES * trained_elements(model), "accumulators")
    ops = schedule(model, input_shape, batch, fuse=fuse_frozen, inplace_depthwise=inplace_depthwise)
    OpEvents("input", batch * math.prod(input_shape)).forward(L)
    for op in ops:
        op.events.forward(L)
    for op in reversed(ops):
        if op.events.in_backward:
            op.events.backward(L)
    L.step_done()
    return L, ops


def c_layout(
    model: QModel, input_shape: tuple[int, int, int], *, fuse_frozen: bool = True, inplace_depthwise: bool = True
) -> dict[str, tuple[int, int, int]]:
    """The planner's decisions for the C step (``device/c/fedtiny_step.c``), per convolution's tag:
    ``(inplace, fuse_next, workspace_bytes)`` of one sample's schedule, so that the C step's arena
    holds the buffers this planner counts. The model must carry its scheme (``apply_scheme``)."""
    out: dict[str, tuple[int, int, int]] = {}
    for op in schedule(model, input_shape, 1, fuse=fuse_frozen, inplace_depthwise=inplace_depthwise):
        if op.kind == "fused":
            out[op.module[0].tag] = (0, 1, op.events.workspace)
        elif op.kind == "conv":
            out[op.module.tag] = (int(op.events.inplace), 0, op.events.workspace)
    return out


def paper_count(model: QModel, input_shape: tuple[int, int, int], batch: int = 1) -> dict[str, int]:
    """tiny-training's count of the memory a sparse update saves for backward (bytes, by part)."""
    parts = {"relu_masks": 0, "saved_inputs": 0, "updated_weights": 0, "updated_biases": 0, "classifier_input": 0}
    for op in schedule(model, input_shape, batch, fuse=False):
        m = op.module
        if op.kind == "conv" and m is not model.classifier:
            if op.trains and m.relu:
                parts["relu_masks"] += (batch * math.prod(op.out_shape) + 7) // 8
            parts["saved_inputs"] += m.trained_input_elements(op.in_shape)
            parts["updated_weights"] += m.trained_weight_elements()
            parts["updated_biases"] += 4 * m.out_channels if m.bias.requires_grad else 0
        elif m is model.classifier:
            parts["classifier_input"] += math.prod(op.in_shape)
            trained = m.trained_weight_elements() if op.kind == "conv" else m.weight.numel() * m.weight.requires_grad
            parts["updated_weights"] += (1 if op.kind == "conv" else 4) * trained
            parts["updated_biases"] += 4 * op.out_shape[0] if m.bias.requires_grad else 0
    return parts


def op_macs(op: ScheduledOp) -> int:
    """Multiply-accumulates of one scheduled op's forward (0 for adds and pooling)."""
    m = op.module
    if op.kind == "conv":
        return op.in_shape[0] * math.prod(op.out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_hw)
    if op.kind == "float-head":
        return op.in_shape[0] * m.weight.numel()
    if op.kind == "fused":
        return sum(op_macs(part) for part in _fused_parts(op))
    return 0


def _fused_parts(op: ScheduledOp) -> list[ScheduledOp]:
    """The expansion and depthwise convolutions of a fused op, as ops of their own (for their MACs)."""
    (pw, dw), n = op.module, op.in_shape[0]
    mid = (n, pw.out_channels, *pw.out_hw(op.in_shape[2:]))
    return [
        ScheduledOp("conv", pw, op.in_shape, mid[1:], op.events),
        ScheduledOp("conv", dw, mid, (dw.out_channels, *dw.out_hw(mid[2:])), op.events),
    ]


def step_work(ops: list[ScheduledOp]) -> StepWork:
    """One sample's work by op kind and part (:mod:`fedtiny.budget.step_time`) of a schedule, each fused pair
    counted as its two convolutions (what the C step runs, one channel at a time)."""
    return StepWork.of(schedule_work([p for op in ops for p in (_fused_parts(op) if op.kind == "fused" else [op])]))


def step_macs(ops: list[ScheduledOp]) -> tuple[int, int]:
    """Forward and backward multiply-accumulates of one training step of a schedule.

    Backward, each op at or after the first trained one pays an input gradient (its forward
    MACs) when a trained tensor lies upstream of it, and each trained convolution or head a
    weight gradient for its trained channels (forward MACs times the trained share of its
    weights). Bias gradients are sums, not MACs; adds and pooling pass gradients without MACs.
    """
    forward = sum(op_macs(op) for op in ops)
    backward, upstream = 0, False
    for op in ops:
        macs = op_macs(op)
        if upstream:
            backward += macs
        if op.kind in ("conv", "float-head") and op.module.weight.requires_grad:
            m = op.module
            share = m.trained_weight_elements() / m.weight.numel() if op.kind == "conv" else 1.0
            backward += round(macs * share)
        upstream |= op.trains
    return forward, backward


def _rows(ops: list[ScheduledOp], L: Ledger, batch: int) -> list[LayerRow]:
    fw, bw = {}, {}
    for where, _, _, total in L.events:
        phase, _, tag = where.partition(":")
        book = fw if phase == "fw" else bw if phase == "bw" else None
        if book is not None:
            book[tag] = max(book.get(tag, 0), total)
    rows = []
    for i, op in enumerate(ops):
        m, tag = op.module, op.events.tag
        params = 0
        if op.kind == "conv":
            params = m.trained_weight_elements() + (4 * m.out_channels if m.bias.requires_grad else 0)
        name = f"{m[0].tag}+{tag}" if op.kind == "fused" else tag
        kind = (
            op.kind
            if op.kind != "conv"
            else ("depthwise" if m.is_depthwise else "fc" if m.kind == "fc" else "conv{}x{}".format(*m.kernel_hw))
        )
        rows.append(
            LayerRow(
                i,
                name,
                kind,
                tuple(op.out_shape),
                batch * math.prod(op.out_shape),
                op.events.saved,
                params,
                fw.get(tag, 0),
                bw.get(tag, 0),
            )
        )
    return rows


def memory_report(
    model: QModel,
    resolved: ResolvedScheme,
    input_shape: tuple[int, int, int],
    *,
    device: DeviceProfile | None = None,
    accounting: str = "planner",
    optimizer: str = "sgd+qas",
    momentum: float = 0.0,
    reorder: bool = True,
    inplace_depthwise: bool = True,
    fuse_frozen: bool = True,
    batch: int = 1,
    accumulate: bool = False,
) -> MemoryReport:
    """Memory of one training step of ``model`` under ``resolved`` (applied to the model in place).

    ``batch`` samples are trained at once (the device's micro-batch); ``accumulate`` counts the fp32
    gradient accumulators a step of more samples than that needs.
    """
    apply_scheme(model, resolved)
    L, ops = plan(
        model,
        input_shape,
        optimizer=optimizer,
        momentum=momentum,
        reorder=reorder,
        inplace_depthwise=inplace_depthwise,
        fuse_frozen=fuse_frozen,
        batch=batch,
        accumulate=accumulate,
    )
    persistent = persistent_bytes(model, optimizer, momentum)
    paper = paper_count(model, input_shape, batch)
    saved_planner = sum(r.saved_bytes for r in _rows(ops, L, batch))
    if accounting == "planner":
        peak, at, saved = L.peak, L.peak_at, saved_planner
        breakdown = {**persistent, "saved_for_backward": saved_planner}
        if accumulate:
            breakdown["accumulators"] = L.live.get("accumulators", 0) or GRAD_BYTES * trained_elements(model)
    elif accounting == "paper":
        peak, at, saved = sum(paper.values()), "sum of saved-for-backward parts", sum(paper.values())
        breakdown = dict(paper)
    else:
        raise ScenarioError(f"accounting: expected planner or paper, got {accounting!r}")
    flash = flash_bytes(model)
    fits = None if device is None else (peak <= device.sram_bytes and flash <= device.flash_bytes)
    return MemoryReport(
        accounting,
        resolved.name,
        peak,
        at,
        flash,
        saved,
        sum(persistent.values()),
        device.name if device else None,
        device.sram_bytes if device else None,
        device.flash_bytes if device else None,
        fits,
        reorder,
        inplace_depthwise,
        batch,
        _rows(ops, L, batch),
        breakdown,
        *step_macs(ops),
        L.peak_without("persistent:", "act:input"),
        accumulate,
        step_work(ops),
    )


def peak_sram_bytes(
    model: QModel,
    resolved: ResolvedScheme,
    input_shape: tuple[int, int, int],
    *,
    optimizer: str = "sgd+qas",
    momentum: float = 0.0,
    reorder: bool = True,
    inplace_depthwise: bool = True,
    fuse_frozen: bool = True,
    batch: int = 1,
    accumulate: bool = False,
) -> int:
    """:func:`memory_report`'s ``peak_sram_bytes`` alone (the planner's accounting), for a search that
    asks it of thousands of schemes: the plan without the report's tables."""
    apply_scheme(model, resolved)
    return plan(
        model,
        input_shape,
        optimizer=optimizer,
        momentum=momentum,
        reorder=reorder,
        inplace_depthwise=inplace_depthwise,
        fuse_frozen=fuse_frozen,
        batch=batch,
        accumulate=accumulate,
    )[0].peak


def measure_step(
    model: QModel,
    resolved: ResolvedScheme,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: str = "sgd+qas",
    lr: float = 1e-3,
    momentum: float = 0.0,
    reorder: bool = True,
    inplace_depthwise: bool = True,
    fuse_frozen: bool = True,
) -> Ledger:
    """Run one real training step (the clients' code path) with the ledger recording; return it."""
    apply_scheme(model, resolved)
    opt = QuantizedOptimizer(model, optimizer, lr, momentum, gen=torch.Generator().manual_seed(0))
    led = Ledger(reorder=reorder, inplace_depthwise=inplace_depthwise, fuse_frozen=fuse_frozen)
    for k, v in persistent_bytes(model, optimizer, momentum).items():
        led.alloc(f"persistent:{k}", v, "persistent")
    with recording(led):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        led.step_done()
        opt.step()
    return led
