"""Whole-device memory: everything a client holds in RAM and flash across a round, not one step.

:func:`~fedtiny.budget.memory.memory_report` answers the publication's question (does one training
step fit: ``peak_sram_bytes``). A device must hold more for a whole round, and this module counts it
part by part, as the firmware (``device/firmware``) lays it out:

- the step's arena as the device runs it at the scenario's batch size: with more samples per step
  than the micro-batch, the fp32 gradient accumulators are in it whatever ``device.accumulate`` says;
- the step's batch (a pointer to each sample, read where it lies in flash, and its label) and the
  sample order (2 B per sample);
- the trained tensors, whole, in RAM (the device updates them in place; frozen ones stay in flash)
  and the optimizer state (fp32 per element of each trained tensor, per slot);
- the sparse uplink's state between rounds: the trainable values when the round began and the
  error-feedback residual (float64 per position, or ``compact``: int16 in 1/256 steps for int8
  tensors, float32 for int32 ones), a DGC velocity when momentum correction is on;
- the sparse uplink's buffers: each tensor is ranked, encoded and sent one at a time (a top-k heap,
  its positions and values, its encoding);
- the protocol's buffers (TRAIN streams into the tensors: no model-sized buffer), the step's report;
- the stack the firmware reserves.

Flash: the code, the whole model's initial values (frozen tensors and the trained tensors' start),
the C step's per-channel tables (requantization, QAS), the op table and arena plans, the compiled-in
samples, and for a sparse uplink the trainable positions of each uplink tensor (4 B each: 236 KB
for MCUNet's scheme s3).

The firmware generator (:mod:`fedtiny.tools.firmware`) sizes its buffers from the same constants, and
a test holds the linked image within 5% of :attr:`DeviceMemory.device_ram_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedtiny.budget.memory import flash_bytes, optimizer_slots, plan
from fedtiny.budget.schemes import apply_scheme, trainable_slices
from fedtiny.compress.uplink import uplink_codec
from fedtiny.compress.values import value_type
from fedtiny.int8.graph import QConv
from fedtiny.models.state import array_spec, trainable_names

__all__ = [
    "UplinkTensor",
    "ClientLoad",
    "DeviceMemory",
    "device_memory",
    "client_memory",
    "step_arena",
    "device_ram_bytes",
    "encoded_bound",
    "residual_bytes",
    "stack_bytes",
    "FRAME_BYTES",
    "TEXT_BYTES",
    "REPORT_BYTES",
    "CODE_BYTES",
    "RUNTIME_BYTES",
    "OP_BYTES",
]

FRAME_BYTES = 256  # the device's buffer for small frames (HELLO, ACK, ERROR); TRAIN streams into the tensors
TEXT_BYTES = 512  # JSON the device composes (HELLO, UPDATE's header, ERROR, BUSY)
REPORT_BYTES = 1032  # ft_step_report (device/c/fedtiny_step.h) on a 32-bit MCU
RUNTIME_BYTES = 512  # the C library's and the board's statics, section alignment (measured, see firmware README)
CODE_BYTES = (
    56 * 1024
)  # firmware code with libm/libc (newlib nano) on Cortex-M4F at -O2, DSP kernels: 53.0-58.9 KB measured
# (the linked flash less the parts below: KWS DS-CNN, tiny-ir, MCUNet; device/firmware/README.md), since the
# C step's windowed average pool and resize
STEP_TABLE_BYTES = 16  # per conv output channel: the C step's multiplier, shift, effective scale, QAS scales
# (fp32/int32 each) besides the bias, in place of the state's w_scales
OP_BYTES = 208  # one ft_op in flash (the op table)


def stack_bytes(ops: int, classes: int) -> int:
    """The stack the firmware reserves: the protocol and the C step's frames, whose tables have an entry
    per tensor (8 of 4 B) and per class (fedtiny_step.c and fedtiny_step_loss.c, built with FT_MAX_TENSORS = ops + 1), and the
    kernels' block accumulators and row pointers (fedtiny_kernels.h: about 256 B); rounded up to 256 B.
    tiny-ir's 13 ops measured 1,900 B in QEMU with the DSP kernels, 1,952 B with the portable ones."""
    need = 1792 + 32 * (ops + 1) + 4 * classes
    return -(-need // 256) * 256


@dataclass(frozen=True)
class UplinkTensor:
    """One uplink tensor as the device's encoder sees it."""

    name: str
    ndim: int
    positions: int  # trainable positions (the scheme's slice)
    itemsize: int  # bytes of one element on the device (1 int8, 4 int32 or fp32)


@dataclass(frozen=True)
class ClientLoad:
    """What a client does in a round besides one step: how it trains, what it sends, what it keeps."""

    batch_size: int  # samples per step (train.batch_size)
    micro_batch: int  # samples the step's buffers hold at once (device.micro_batch)
    samples: int  # training samples on the device
    sample_bytes: int  # bytes of one int8 sample
    uplink: str = "sparse"  # dense | sparse
    density: float = 1.0
    error_feedback: bool = True
    residual: str = "float64"  # float64 | compact
    dgc_velocity: bool = False  # compression.momentum_correction
    values: str = "int8"  # compression.values: the encoded update's value type


def residual_bytes(itemsize: int, residual: str) -> int:
    """Bytes of one position's error-feedback residual (``compression.residual``)."""
    if residual == "float64":
        return 8
    return 2 if itemsize == 1 else 4  # compact: int16 in 1/256 steps for int8 tensors, float32 otherwise


def encoded_bound(ndim: int, nnz: int, values: str = "int8") -> int:
    """Upper bound of one tensor's bytes in fedtiny's wire format (docs/compression.md): varint header
    fields (5 B each at most), flags, value type, scale, position coding, then at most 5 B of gap and a
    value per element (a lone value's bytes: ternary's sign bit takes a byte)."""
    return 5 * (4 + ndim) + 1 + 1 + 4 + 2 + (5 + value_type(values).nbytes(1)) * nnz


@dataclass
class DeviceMemory:
    """RAM and flash of a client's whole round on its device, by part."""

    device_ram_bytes: int
    device_flash_bytes: int
    ram: dict[str, int] = field(default_factory=dict)
    flash: dict[str, int] = field(default_factory=dict)
    sram_bytes: int | None = None  # the profile's
    flash_capacity_bytes: int | None = None
    device: str | None = None

    @property
    def fits(self) -> bool | None:
        if self.sram_bytes is None:
            return None
        return self.device_ram_bytes <= self.sram_bytes and self.device_flash_bytes <= (self.flash_capacity_bytes or 0)

    def reason(self) -> str:
        """One line: whether the whole client fits its device, and the figure that does not."""
        if self.fits is None:
            return f"device RAM {self.device_ram_bytes:,} B (no device given)"
        if self.fits:
            return (
                f"fits {self.device}: device RAM {self.device_ram_bytes:,} B <= {self.sram_bytes:,} B, "
                f"flash {self.device_flash_bytes:,} B <= {self.flash_capacity_bytes:,} B"
            )
        parts = []
        if self.device_ram_bytes > (self.sram_bytes or 0):
            big = max(self.ram, key=self.ram.get)
            parts.append(
                f"device RAM {self.device_ram_bytes:,} B > {self.sram_bytes:,} B "
                f"(largest part: {big} {self.ram[big]:,} B)"
            )
        if self.device_flash_bytes > (self.flash_capacity_bytes or 0):
            parts.append(f"flash {self.device_flash_bytes:,} B > {self.flash_capacity_bytes:,} B")
        return f"does not fit {self.device}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"], d["reason"] = self.fits, self.reason()
        return d


def device_memory(
    *,
    arena_bytes: int,
    trained_tensor_bytes: int,
    trained_tensor_elements: int,
    optimizer_slots: int,
    uplink: list[UplinkTensor],
    load: ClientLoad,
    model_flash_bytes: int,
    ops: int,
    classes: int,
    plans: int = 0,
    sram_bytes: int | None = None,
    flash_bytes: int | None = None,
    device: str | None = None,
    conv_channels: int = 0,
) -> DeviceMemory:
    """The whole client's RAM and flash (see the module docstring for the parts).

    Parameters
    ----------
    arena_bytes
        The step's arena at ``load.micro_batch`` samples, with the accumulators when
        ``load.batch_size > load.micro_batch`` (:attr:`MemoryReport.arena_bytes` of that plan).
    trained_tensor_bytes, trained_tensor_elements
        Whole tensors that have a trained element (device dtypes), and their elements.
    optimizer_slots
        fp32 values per trained element the optimizer keeps (1 momentum, 2 Adam, 0 none).
    uplink
        The uplink tensors and their trainable positions.
    model_flash_bytes
        The whole model's initial values (:func:`fedtiny.budget.memory.flash_bytes`).
    ops, classes, plans
        Ops of the step's table, the model's classes (the stack's tables) and entries of its arena
        plans (flash).
    conv_channels
        Output channels of the model's convolutions, the classifier's included (the step's tables).
    """
    ram = {
        "step arena": arena_bytes,
        "input batch": 8 * load.batch_size,  # a pointer to each sample (they stay in flash) and its label
        "sample order": 2 * load.samples,
        "trained tensors": trained_tensor_bytes,
        "optimizer state": 4 * optimizer_slots * trained_tensor_elements,
    }
    if uplink_codec(load.uplink).carries_state:
        state = sum(u.positions * u.itemsize for u in uplink)  # the values when the round began
        if load.error_feedback:
            state += sum(u.positions * residual_bytes(u.itemsize, load.residual) for u in uplink)
        if load.dgc_velocity:
            state += sum(8 * u.positions for u in uplink)
        ram["uplink state"] = state
        kmax = max((min(u.positions, math.ceil(load.density * u.positions)) for u in uplink), default=0)
        ndim = max((u.ndim for u in uplink), default=1)
        ram["uplink buffers"] = 2 * kmax + 8 * kmax + encoded_bound(ndim, kmax, load.values)
    ram["protocol buffers"] = FRAME_BYTES + TEXT_BYTES + REPORT_BYTES
    ram["runtime"] = RUNTIME_BYTES
    ram["stack"] = stack_bytes(ops, classes)
    flash = {
        "code": CODE_BYTES,
        "model": model_flash_bytes,
        "step tables": STEP_TABLE_BYTES * conv_channels,
        "op table and plans": OP_BYTES * ops + 4 * plans,
        "samples": load.samples * (load.sample_bytes + 1),
    }
    if uplink_codec(load.uplink).carries_state:  # each uplink tensor's trainable positions (uint32), in flash
        flash["uplink positions"] = 4 * sum(u.positions for u in uplink)
    return DeviceMemory(sum(ram.values()), sum(flash.values()), ram, flash, sram_bytes, flash_bytes, device)


def client_memory(
    model, arena_bytes: int, load: ClientLoad, *, optimizer: str = "sgd+qas", momentum: float = 0.0, profile=None
) -> DeviceMemory:
    """:func:`device_memory` of an int8 ``model`` that carries its scheme, whose step's arena (at
    ``load.micro_batch`` samples, with accumulators when ``load.batch_size`` is larger) is ``arena_bytes``
    (:attr:`~fedtiny.budget.memory.MemoryReport.arena_bytes`). The uplink tensors are the trained ones, in
    device dtypes."""
    spec = array_spec(model, trainable_names(model))
    slices = trainable_slices(model, spec)
    uplink = [UplinkTensor(n, len(shape), len(slices[n]), np.dtype(dt).itemsize) for n, shape, dt in spec]
    return device_memory(
        arena_bytes=arena_bytes,
        trained_tensor_bytes=sum(math.prod(s) * np.dtype(dt).itemsize for _, s, dt in spec),
        trained_tensor_elements=sum(math.prod(s) for _, s, _ in spec),
        optimizer_slots=optimizer_slots(optimizer, momentum),
        uplink=uplink,
        load=load,
        model_flash_bytes=flash_bytes(model),
        ops=len(model.nodes),
        classes=_classes(model),
        sram_bytes=profile.sram_bytes if profile else None,
        flash_bytes=profile.flash_bytes if profile else None,
        device=profile.name if profile else None,
        conv_channels=_conv_channels(model),
    )


def step_arena(
    model,
    input_shape: tuple[int, int, int],
    load: ClientLoad,
    *,
    optimizer: str = "sgd+qas",
    momentum: float = 0.0,
    reorder: bool = True,
    inplace_depthwise: bool = True,
    fuse_frozen: bool = True,
) -> int:
    """The arena of one step of ``model`` (which carries its scheme) as the device runs it: ``load.micro_batch``
    samples at a time, with the accumulators when ``load.batch_size`` is larger (the planner, without the
    persistent state and the input, which the device holds apart)."""
    ledger, _ = plan(
        model,
        input_shape,
        optimizer=optimizer,
        momentum=momentum,
        reorder=reorder,
        inplace_depthwise=inplace_depthwise,
        fuse_frozen=fuse_frozen,
        batch=load.micro_batch,
        accumulate=load.batch_size > load.micro_batch,
    )
    return ledger.peak_without("persistent:", "act:input")


def device_ram_bytes(
    model,
    resolved,
    input_shape: tuple[int, int, int],
    load: ClientLoad,
    *,
    optimizer: str = "sgd+qas",
    momentum: float = 0.0,
    **options,
) -> int:
    """:attr:`DeviceMemory.device_ram_bytes` of ``model`` under ``resolved`` (applied in place), for a search
    that asks it of many schemes. ``options``: the planner's (reorder, inplace_depthwise, fuse_frozen)."""
    apply_scheme(model, resolved)
    arena = step_arena(model, input_shape, load, optimizer=optimizer, momentum=momentum, **options)
    return client_memory(model, arena, load, optimizer=optimizer, momentum=momentum).device_ram_bytes


def _conv_channels(model) -> int:
    return sum(int(m.out_channels) for m in model.modules() if isinstance(m, QConv))


def _classes(model) -> int:
    head = model.classifier
    return int(head.out_channels if hasattr(head, "out_channels") else head.weight.shape[0])
