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

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fedtiny.budget.profiles import DeviceProfile
from fedtiny.errors import ScenarioError
from fedtiny.int8.graph import FloatHead, QConv, QModel
from fedtiny.int8.ledger import GRAD_BYTES, Ledger, fused_workspace_bytes, recording, workspace_bytes
from fedtiny.budget.schemes import ResolvedScheme, apply_scheme

__all__ = ["MemoryReport", "LayerRow", "plan", "paper_count", "persistent_bytes", "measure_step", "flash_bytes",
           "memory_report"]


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

    def reason(self) -> str:
        """One line saying whether and why it (does not) fit."""
        if self.fits is None:
            return f"peak SRAM {self.peak_sram_bytes:,} B (no device given)"
        if self.fits:
            return (f"fits {self.device}: peak SRAM {self.peak_sram_bytes:,} B <= {self.sram_bytes:,} B, "
                    f"flash {self.flash_bytes:,} B <= {self.device_flash_bytes:,} B")
        parts = []
        if self.peak_sram_bytes > (self.sram_bytes or 0):
            parts.append(f"peak SRAM {self.peak_sram_bytes:,} B > {self.sram_bytes:,} B at {self.peak_at}")
        if self.flash_bytes > (self.device_flash_bytes or 0):
            parts.append(f"flash {self.flash_bytes:,} B > {self.device_flash_bytes:,} B")
        return f"does not fit {self.device}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reason"] = self.reason()
        return d


def _optimizer_slots(optimizer: str, momentum: float) -> int:
    return 2 if optimizer == "adam" else (1 if momentum > 0 else 0)


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
    return {"trained_params": params, "optimizer_state": 4 * elements * _optimizer_slots(optimizer, momentum)}


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


def _ops(model: QModel, input_shape: tuple[int, int, int], batch: int, fuse: bool = True) -> list[dict[str, Any]]:
    """The forward schedule with shapes and what each op needs for backward."""
    c, h, w = input_shape
    ops: list[dict[str, Any]] = []
    trained_before = False  # any trained tensor upstream of the current activation

    def conv_op(conv: QConv, in_tag: str, in_shape: tuple[int, int, int], keep: bool, upstream: bool):
        oh, ow = conv.out_hw(in_shape[1:])
        need_w = conv.weight.requires_grad
        need_b = conv.bias.requires_grad
        sel = conv.train_channels
        n_sel = (conv.out_channels if conv.is_depthwise else conv.in_channels) if sel is None else len(sel)
        return {"kind": "conv", "tag": conv.tag, "module": conv, "in_tag": in_tag, "in_shape": in_shape,
                "out_shape": (conv.out_channels, oh, ow), "keep": keep, "need_x": upstream, "need_w": need_w,
                "need_b": need_b, "xsel": batch * n_sel * in_shape[1] * in_shape[2] if need_w else 0,
                "w_grad": (conv.trained_weight_elements() if need_w else 0), "skip_tag": conv.skip_tag}

    shape, tag = (c, h, w), "input"
    for conv in [model.first_conv]:
        op = conv_op(conv, tag, shape, False, trained_before)
        ops.append(op)
        trained_before |= op["need_w"] or op["need_b"]
        shape, tag = op["out_shape"], op["tag"]
    for block in model.blocks:
        block_in, block_tag, block_upstream = shape, tag, trained_before
        convs = block.convs()
        pw1, dw = block.pointwise1, block.depthwise
        if fuse and pw1 is not None and not trained_before and not any(
                p.requires_grad for c in (pw1, dw) for p in c.parameters()):
            mid = pw1.out_hw(shape[1:])
            out = (dw.out_channels, *dw.out_hw(mid))
            ops.append({"kind": "fused", "tag": dw.tag, "in_tag": tag, "in_shape": shape, "mid_hw": mid,
                        "out_shape": out, "keep": block.residual is not None, "need_x": False,
                        "pw1": pw1, "dw": dw})
            shape, tag = out, dw.tag
            convs = convs[2:]
        for conv in convs:
            op = conv_op(conv, tag, shape, conv is block.convs()[0] and block.residual is not None, trained_before)
            ops.append(op)
            trained_before |= op["need_w"] or op["need_b"]
            shape, tag = op["out_shape"], op["tag"]
        if block.residual is not None:
            ops.append({"kind": "add", "tag": block.residual.tag, "x_tag": block_tag, "b_tag": tag,
                        "out_shape": shape, "need_x": block_upstream, "need_b": trained_before})
            tag = block.residual.tag
    if model.feature_mix is not None:
        op = conv_op(model.feature_mix, tag, shape, False, trained_before)
        ops.append(op)
        trained_before |= op["need_w"] or op["need_b"]
        shape, tag = op["out_shape"], op["tag"]
    ops.append({"kind": "pool", "tag": "pool", "in_tag": tag, "in_shape": shape, "out_shape": (shape[0], 1, 1),
                "need_x": trained_before})
    shape, tag = (shape[0], 1, 1), "pool"
    head = model.classifier
    if isinstance(head, QConv):
        ops.append(conv_op(head, tag, shape, False, trained_before))
    else:
        ops.append({"kind": "head", "tag": head.tag, "in_tag": tag, "in_shape": shape,
                    "out_shape": (head.weight.shape[0],), "need_x": trained_before,
                    "need_w": head.weight.requires_grad, "need_b": head.bias.requires_grad,
                    "w_grad": head.weight.numel()})
    return ops


def _numel(shape: tuple[int, ...], batch: int) -> int:
    n = batch
    for s in shape:
        n *= s
    return n


def plan(model: QModel, input_shape: tuple[int, int, int], *, optimizer: str = "sgd+qas", momentum: float = 0.0,
         reorder: bool = True, inplace_depthwise: bool = True, fuse_frozen: bool = True,
         batch: int = 1) -> tuple[Ledger, list[dict[str, Any]]]:
    """Walk one training step's schedule from shapes; return the accounting ledger and the ops."""
    L = Ledger(reorder=reorder, inplace_depthwise=inplace_depthwise, fuse_frozen=fuse_frozen)
    for k, v in persistent_bytes(model, optimizer, momentum).items():
        L.alloc(f"persistent:{k}", v, "persistent")
    ops = _ops(model, input_shape, batch, fuse_frozen)
    L.alloc("act:input", _numel(input_shape, batch), "fw:input")
    for op in ops:
        t, where = op["tag"], f"fw:{op['tag']}"
        out = _numel(op["out_shape"], batch)
        if op["kind"] == "fused":
            L.alloc(f"act:{t}", out, where)
            L.transient(f"ws:{t}", fused_workspace_bytes(op["pw1"].in_channels, op["dw"].kernel_size, op["mid_hw"],
                                                         op["out_shape"][1:]), where)
            if not op["keep"]:
                L.free(f"act:{op['in_tag']}", where)
        elif op["kind"] == "conv":
            conv = op["module"]
            inplace = inplace_depthwise and conv.is_depthwise and not op["keep"]
            if not inplace:
                L.alloc(f"act:{t}", out, where)
            L.transient(f"ws:{t}", workspace_bytes(conv.kernel_size, conv.in_channels, conv.is_depthwise,
                                                   op["in_shape"][1:], op["out_shape"][1:], inplace), where)
            if op["need_x"] or op["need_w"] or op["need_b"]:
                L.alloc(f"saved:{t}", (out + 7) // 8 + op["xsel"], where)
            if not op["keep"]:
                L.free(f"act:{op['in_tag']}", where)
            if inplace:
                L.alloc(f"act:{t}", out, where)
        elif op["kind"] == "add":
            L.alloc(f"act:{t}", out, where)
            if op["need_x"] or op["need_b"]:
                L.alloc(f"saved:{t}", (out + 7) // 8, where)
            L.free(f"act:{op['x_tag']}", where)
            L.free(f"act:{op['b_tag']}", where)
        elif op["kind"] == "pool":
            L.alloc(f"act:{t}", out, where)
            L.free(f"act:{op['in_tag']}", where)
        else:  # fp32 head
            L.alloc(f"act:{t}", 4 * out, where)
            if op["need_w"]:
                L.alloc(f"saved:{t}", 4 * _numel(op["in_shape"], batch), where)
            L.free(f"act:{op['in_tag']}", where)
    for op in reversed(ops):
        t, where = op["tag"], f"bw:{op['tag']}"
        out = _numel(op["out_shape"], batch)
        has_params = op.get("need_w", False) or op.get("need_b", False)
        if not (op["need_x"] or has_params or (op["kind"] == "add" and op["need_b"])):
            continue  # no gradient reaches this op: it is not in the backward graph
        L.free(f"act:{t}", where)
        L.ensure(f"grad:{t}", GRAD_BYTES * out, where)
        if op["kind"] == "add":
            if op["need_x"]:
                L.alloc(f"grad:skip:{t}", GRAD_BYTES * out, where)
            if op["need_b"]:
                L.alloc(f"grad:{op['b_tag']}", GRAD_BYTES * out, where)
        elif op["kind"] == "pool":
            L.alloc(f"grad:{op['in_tag']}", GRAD_BYTES * _numel(op["in_shape"], batch), where)
        else:
            n_out = op["out_shape"][0]
            if op["need_b"]:
                L.param_grad(f"pgrad:{t}:b", GRAD_BYTES * n_out, 1, where)
            if op["need_w"]:
                rows = op["module"].out_channels if op["kind"] == "conv" and not op["module"].is_depthwise else (
                    len(op["module"].train_channels or range(op["module"].out_channels)) if op["kind"] == "conv"
                    else op["out_shape"][0])
                L.param_grad(f"pgrad:{t}:w", GRAD_BYTES * op["w_grad"], rows, where)
            if op["need_x"]:
                L.alloc(f"grad:{op['in_tag']}", GRAD_BYTES * _numel(op["in_shape"], batch), where)
                if op.get("skip_tag"):
                    L.free(op["skip_tag"], where)
        L.free(f"grad:{t}", where)
        L.free(f"saved:{t}", where)
    L.step_done()
    return L, ops


def paper_count(model: QModel, input_shape: tuple[int, int, int], batch: int = 1) -> dict[str, int]:
    """tiny-training's count of the memory a sparse update saves for backward (bytes, by part)."""
    parts = {"relu_masks": 0, "saved_inputs": 0, "updated_weights": 0, "updated_biases": 0, "classifier_input": 0}
    for op in _ops(model, input_shape, batch, fuse=False):
        if op["kind"] == "conv" and op["module"] is not model.classifier:
            conv = op["module"]
            if (op["need_w"] or op["need_b"]) and conv.relu:
                parts["relu_masks"] += (_numel(op["out_shape"], batch) + 7) // 8
            parts["saved_inputs"] += op["xsel"]
            parts["updated_weights"] += op["w_grad"]
            parts["updated_biases"] += 4 * conv.out_channels if op["need_b"] else 0
        elif op["tag"] == "classifier":
            parts["classifier_input"] += _numel(op["in_shape"], batch)
            bytes_per = 1 if op["kind"] == "conv" else 4
            parts["updated_weights"] += bytes_per * (op["w_grad"] if op["need_w"] else 0)
            parts["updated_biases"] += 4 * op["out_shape"][0] if op["need_b"] else 0
    return parts


def _rows(ops: list[dict[str, Any]], L: Ledger, batch: int) -> list[LayerRow]:
    fw, bw = {}, {}
    for where, _, _, total in L.events:
        phase, _, tag = where.partition(":")
        book = fw if phase == "fw" else bw if phase == "bw" else None
        if book is not None:
            book[tag] = max(book.get(tag, 0), total)
    rows = []
    for i, op in enumerate(ops):
        saved = 0
        if op["kind"] == "conv" and (op["need_x"] or op["need_w"] or op["need_b"]):
            saved = (_numel(op["out_shape"], batch) + 7) // 8 + op["xsel"]
        elif op["kind"] == "add" and (op["need_x"] or op["need_b"]):
            saved = (_numel(op["out_shape"], batch) + 7) // 8
        params = 0
        if op["kind"] == "conv":
            conv = op["module"]
            params = conv.trained_weight_elements() + (4 * conv.out_channels if conv.bias.requires_grad else 0)
        rows.append(LayerRow(i, op["tag"] if op["kind"] != "fused" else f"{op['pw1'].tag}+{op['tag']}",
                             op["kind"] if op["kind"] != "conv" else
                             ("depthwise" if op["module"].is_depthwise else f"conv{op['module'].kernel_size}x"
                              f"{op['module'].kernel_size}"),
                             tuple(op["out_shape"]), _numel(op["out_shape"], batch), saved, params,
                             fw.get(op["tag"], 0), bw.get(op["tag"], 0)))
    return rows


def memory_report(model: QModel, resolved: ResolvedScheme, input_shape: tuple[int, int, int], *,
                  device: DeviceProfile | None = None, accounting: str = "planner", optimizer: str = "sgd+qas",
                  momentum: float = 0.0, reorder: bool = True, inplace_depthwise: bool = True,
                  fuse_frozen: bool = True, batch: int = 1) -> MemoryReport:
    """Memory of one training step of ``model`` under ``resolved`` (applied to the model in place)."""
    apply_scheme(model, resolved)
    L, ops = plan(model, input_shape, optimizer=optimizer, momentum=momentum, reorder=reorder,
                  inplace_depthwise=inplace_depthwise, fuse_frozen=fuse_frozen, batch=batch)
    persistent = persistent_bytes(model, optimizer, momentum)
    paper = paper_count(model, input_shape, batch)
    saved_planner = sum(r.saved_bytes for r in _rows(ops, L, batch))
    if accounting == "planner":
        peak, at, saved = L.peak, L.peak_at, saved_planner
        breakdown = {**persistent, "saved_for_backward": saved_planner}
    elif accounting == "paper":
        peak, at, saved = sum(paper.values()), "sum of saved-for-backward parts", sum(paper.values())
        breakdown = dict(paper)
    else:
        raise ScenarioError(f"accounting: expected planner or paper, got {accounting!r}")
    flash = flash_bytes(model)
    fits = None if device is None else (peak <= device.sram_bytes and flash <= device.flash_bytes)
    return MemoryReport(accounting, resolved.name, peak, at, flash, saved, sum(persistent.values()),
                        device.name if device else None, device.sram_bytes if device else None,
                        device.flash_bytes if device else None, fits, reorder, inplace_depthwise, batch,
                        _rows(ops, L, batch), breakdown)


def measure_step(model: QModel, resolved: ResolvedScheme, x: torch.Tensor, y: torch.Tensor, *,
                 optimizer: str = "sgd+qas", lr: float = 1e-3, momentum: float = 0.0, reorder: bool = True,
                 inplace_depthwise: bool = True, fuse_frozen: bool = True) -> Ledger:
    """Run one real training step (the clients' code path) with the ledger recording; return it."""
    from fedtiny.federated.train import make_optimizer

    apply_scheme(model, resolved)
    opt = make_optimizer(model, optimizer, lr, momentum, gen=torch.Generator().manual_seed(0))
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
