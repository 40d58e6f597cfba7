"""The firmware's plan: everything its C source says about one partition of a scenario, computed from the
code the simulator runs (:mod:`fedtiny.tools.firmware` checks the scenario first; :mod:`fedtiny.tools.firmware_emit`
writes the plan as C).

The plan holds values, not text: the C step's op table (each op's arrays, flash or RAM), its arena plans,
the downlink and uplink layouts, the samples, and the memory and time figures of the summary. A client
whose whole device does not fit its profile, or whose sizes the firmware's tables cannot index, is
refused here with the figure: those checks need the server's start-up.
"""

from __future__ import annotations

import ctypes
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fedtiny.bridge.protocol import model_hash
from fedtiny.budget.arena import lay_out
from fedtiny.budget.device_memory import FRAME_BYTES, TEXT_BYTES, DeviceMemory, encoded_bound
from fedtiny.budget.memory import c_layout, memory_report
from fedtiny.devices import DeviceProfile, compute_cycles, get_profile
from fedtiny.errors import ScenarioError
from fedtiny.federated.client import client_task
from fedtiny.federated.task import client_profile, limit_threads
from fedtiny.int8.cstep import CKind, CStep
from fedtiny.models.state import load_arrays, model_arrays
from fedtiny.scenario import CompressionSection, Scenario
from fedtiny.server_setup import server_task

__all__ = ["DownlinkTensor", "FirmwarePlan", "OpField", "OpRef", "StepModel", "UplinkTensor", "plan"]

# an op's array fields the step writes, and the op flag that says whether it does (None: always)
_MUTABLE = {"weight": "train_w", "bias": "train_b", "mom_w": None, "mom_b": None}

# scenario keys the device checks in each TRAIN against the values it was built with
_SETTINGS = [
    ("train", "lr"),
    ("train", "momentum"),
    ("train", "batch_size"),
    ("train", "local_epochs"),
    ("train", "optimizer"),
    ("train", "weight_rounding"),
    ("train", "shuffle"),
    ("train", "gradients"),
    ("compression", "uplink"),
    ("compression", "density"),
    ("compression", "values"),
    ("compression", "topk"),
    ("compression", "error_feedback"),
    ("compression", "residual"),
]


@dataclass(frozen=True)
class OpRef:
    """Op ``op``'s array field ``field`` (a trained weight or bias the frames read or write)."""

    op: int
    field: str


@dataclass(frozen=True, eq=False)
class OpField:
    """One field of an op of the C step's table that is set: an array (flash when ``const``), a float or an int."""

    name: str
    value: np.ndarray | float | int
    const: bool = True


@dataclass(frozen=True)
class StepModel:
    """The C step's ``ft_model`` scalars."""

    n_ops: int
    in_c: int
    in_h: int
    in_w: int
    classes: int
    logit_scale: float
    sm_mult: int
    sm_shift: int
    sm_diff_min: int
    lr: float
    momentum: float
    stochastic: int


@dataclass(frozen=True)
class DownlinkTensor:
    """A tensor of a full dense TRAIN frame: its bytes at ``offset``, copied to ``dest``, or (frozen, ``dest``
    None) checked against ``crc``."""

    name: str
    offset: int
    nbytes: int
    crc: int
    dest: OpRef | None


@dataclass(frozen=True, eq=False)
class UplinkTensor:
    """A trained tensor of the UPDATE: dense from ``src``, or its change at ``positions`` (increasing)."""

    name: str
    src: OpRef
    nbytes: int
    dtype: Any
    shape: tuple[int, ...]
    positions: np.ndarray


@dataclass(frozen=True, eq=False)
class FirmwarePlan:
    """Everything the firmware's C source, link script, make fragment and summary say."""

    # where it comes from
    scenario_path: str
    partition: int
    overrides: dict[str, Any]
    model_hash: str
    scheme: str
    profile: DeviceProfile
    kernels: str
    # the training it runs, and the scenario keys TRAIN must carry (path, JSON value)
    lr: float
    momentum: float
    batch_size: int
    local_epochs: int
    compression: CompressionSection
    settings: tuple[tuple[str, str], ...]
    # the C step: its model, op table, arena plans (one sample; more) and the ops' geometry
    model: StepModel
    ops: tuple[tuple[OpField, ...], ...]
    plan_one: np.ndarray
    plan_many: np.ndarray
    arena_bytes: int
    op_geometry: list[dict]
    # the frames
    downlink: tuple[DownlinkTensor, ...]
    uplink: tuple[UplinkTensor, ...]
    k_max: int  # elements one tensor of a sparse update sends at most
    enc_bytes: int  # one tensor's encoding, at most
    frame_bytes: int
    text_bytes: int
    # the compiled-in samples: int8 inputs, one row each, and their labels
    samples_x: np.ndarray
    samples_y: np.ndarray
    # memory and time: the whole device, the step's planner, the device-time model
    device: DeviceMemory
    planner_peak_bytes: int
    planner_arena_bytes: int
    macs_forward: int
    macs_backward: int
    cycles_per_sample: int
    update_cycles_per_step: int
    published_cycles_per_sample: int
    published_cycles_per_mac: float

    @property
    def samples(self) -> int:
        return len(self.samples_y)

    @property
    def downlink_bytes(self) -> int:
        return sum(t.nbytes for t in self.downlink)

    @property
    def uplink_bytes(self) -> int:
        return sum(t.nbytes for t in self.uplink)


def plan(
    scenario: Scenario,
    scenario_path: str,
    partition_id: int,
    overrides: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> FirmwarePlan:
    """The plan of ``scenario`` (checked by :func:`fedtiny.tools.firmware.check`) for ``partition_id``."""
    say = progress or (lambda _: None)
    t = scenario.train
    say("the server's starting point (model, scheme, learning rate)")
    task, profile, scheme, client, train = _server_start(scenario, partition_id)
    model = client.model
    shape = tuple(train.x.shape[1:])
    model.input_shape = shape
    report = memory_report(
        model, scheme, shape, device=profile, optimizer=t.optimizer, momentum=t.momentum, accumulate=t.batch_size > 1
    )
    whole = _device_memory(client, profile, len(train), scenario_path, partition_id)
    sections = task.scenario.to_dict()  # what TRAIN's scenario must say, checked on the device text for text
    say("the C step's layout and arena plans")
    cs = CStep(
        model,
        lr=task.scenario.train.lr,
        momentum=t.momentum,
        optimizer=t.optimizer,
        rounding=t.weight_rounding,
        layout=c_layout(model, shape),
    )
    one = lay_out(cs.record(1))
    many = lay_out(cs.record(2)) if t.batch_size > 1 else one  # every step of 2+ samples takes the same buffers
    tags = _conv_tags(cs)
    uplink = _uplink(client, cs, tags)
    sizes = [len(u.positions) for u in uplink]
    k_max = max([1] + [min(n, math.ceil(scenario.compression.density * n)) for n in sizes])
    ndim_max = max([1] + [len(u.shape) for u in uplink])
    with torch.no_grad():
        xq = model.quantize_input(torch.from_numpy(train.x)).numpy().astype(np.int8).reshape(len(train), -1)
    work, published = report.work, get_profile(profile.name)
    return FirmwarePlan(
        scenario_path=scenario_path,
        partition=partition_id,
        overrides=dict(overrides or {}),
        model_hash=model_hash(client.downlink_spec),
        scheme=scheme.name,
        profile=profile,
        kernels=scenario.device.kernels,
        lr=task.scenario.train.lr,
        momentum=t.momentum,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        compression=scenario.compression,
        settings=tuple((f"{sec}.{key}", json.dumps(sections[sec][key])) for sec, key in _SETTINGS),
        model=_step_model(cs.m),
        ops=_op_fields(cs),
        plan_one=np.asarray(one.offsets, np.uint32),
        plan_many=np.asarray(many.offsets, np.uint32),
        arena_bytes=max(one.arena_bytes, many.arena_bytes),
        op_geometry=cs.op_geometry(),
        downlink=_downlink(client, cs, tags),
        uplink=uplink,
        k_max=k_max,
        enc_bytes=encoded_bound(ndim_max, k_max),
        frame_bytes=FRAME_BYTES,
        text_bytes=TEXT_BYTES,
        samples_x=xq,
        samples_y=train.y.astype(np.uint8),
        device=whole,
        planner_peak_bytes=report.peak_sram_bytes,
        planner_arena_bytes=report.arena_bytes,
        macs_forward=report.macs_forward,
        macs_backward=report.macs_backward,
        cycles_per_sample=round(compute_cycles(profile, work, 1, 0)),
        update_cycles_per_step=round(compute_cycles(profile, work, 0, 1)),
        published_cycles_per_sample=round(compute_cycles(published, work)),
        published_cycles_per_mac=published.cycles_per_mac,
    )


def _server_start(scenario: Scenario, partition_id: int):
    """The server's start-up as server/server_app.py runs it, and the partition's client with its training split:
    ``(task, profile, scheme, client, train)``."""
    # with the server's one intra-op thread: a cloud step's new head, fitted in float, differs in its last
    # bits with the thread count, and its frozen scales must be the server's
    threads = torch.get_num_threads()
    limit_threads()
    try:
        task, initial, _, schemes = server_task(scenario, progress=None)
    finally:
        torch.set_num_threads(threads)
    profile = client_profile(task.scenario, partition_id)
    scheme = schemes.by_profile[profile.name]
    client = client_task(task.scenario, scheme)
    load_arrays(client.model, initial)
    train, _ = client.federation.client_data(partition_id)
    return task, profile, scheme, client, train


def _device_memory(client, profile: DeviceProfile, samples: int, scenario_path: str, partition_id: int) -> DeviceMemory:
    """The whole client on its device; a ScenarioError if the firmware cannot hold it."""
    if samples >= 1 << 16:  # main.c's sample order is uint16_t
        raise ScenarioError(
            f"{scenario_path}: partition {partition_id} holds {samples} training samples; the "
            f"firmware's sample order takes fewer than 65,536 (fewer data.max_samples or more clients)"
        )
    whole = client.device_memory(profile, samples)
    if not whole.fits:
        raise ScenarioError(
            f"{scenario_path}: partition {partition_id}'s client {whole.reason()}; its parts: "
            + ", ".join(f"{k} {v:,} B" for k, v in whole.ram.items() if v)
            + " (see fedtiny memory; docs/guide/memory.md)"
        )
    return whole


def _step_model(m) -> StepModel:
    return StepModel(
        m.n_ops,
        m.in_c,
        m.in_h,
        m.in_w,
        m.classes,
        m.logit_scale,
        m.sm_mult,
        m.sm_shift,
        m.sm_diff_min,
        m.lr,
        m.momentum,
        m.stochastic,
    )


def _op_fields(cs: CStep) -> tuple[tuple[OpField, ...], ...]:
    """Each op's set fields in the struct's order: its arrays (const unless the step writes them), floats, and
    the integers that are not 0."""
    arrays = {a.ctypes.data: a for a in cs.keep}
    ops = []
    for op in cs.ops:
        fields = []
        for f, ftype in type(op)._fields_:
            v = getattr(op, f)
            if ftype is ctypes.c_void_p:
                if v:
                    gate = _MUTABLE.get(f, "const")
                    fields.append(
                        OpField(f, arrays[v], gate == "const" or (gate is not None and not getattr(op, gate)))
                    )
            elif ftype is ctypes.c_float:
                fields.append(OpField(f, v))
            elif v:
                fields.append(OpField(f, int(v)))
        ops.append(tuple(fields))
    return tuple(ops)


def _conv_tags(cs: CStep) -> dict[int, str]:
    """The tag of each convolution of the op table, by op index."""
    return {
        i: next(c for c, w, _ in cs.params if w.ctypes.data == op.weight).tag
        for i, op in enumerate(cs.ops)
        if op.kind == CKind.CONV
    }


def _downlink(client, cs: CStep, tags: dict[int, str]) -> tuple[DownlinkTensor, ...]:
    """Where each tensor of a full dense model goes, or the CRC its bytes must have."""
    received = model_arrays(client.model, [n for n, *_ in client.downlink_spec])
    where = {}
    for i, tag in tags.items():
        op = cs.ops[i]
        where[f"{tag}.weight"] = OpRef(i, "weight") if op.train_w else None
        where[f"{tag}.bias"] = OpRef(i, "bias") if op.train_b else None
    out, offset = [], 0
    for name, _, dt in client.downlink_spec:
        data = np.ascontiguousarray(received[name]).astype(np.dtype(dt).newbyteorder("<")).tobytes()
        out.append(DownlinkTensor(name, offset, len(data), zlib.crc32(data), where.get(name)))
        offset += len(data)
    return tuple(out)


def _uplink(client, cs: CStep, tags: dict[int, str]) -> tuple[UplinkTensor, ...]:
    """The trained tensors of the UPDATE, with the scheme's trainable positions in each
    (:mod:`fedtiny.compress.sparsify`); a ScenarioError for one the firmware cannot send."""
    trained = {n for n, *_ in client.uplink_spec}
    out = []
    for name, shp, dt in client.uplink_spec:
        conv_tag, _, attr = name.rpartition(".")
        i = next(i for i, tag in tags.items() if tag == conv_tag)
        if name not in trained:
            raise ScenarioError(f"uplink tensor {name} is not trained")
        pos = np.asarray(client.slices[name], np.uint32)
        if np.any(np.diff(pos.astype(np.int64)) <= 0):
            raise ScenarioError(f"uplink tensor {name}: trainable positions are not increasing")
        if len(pos) >= 1 << 16:
            raise ScenarioError(f"uplink tensor {name}: {len(pos)} trainable positions (the firmware ranks < 65536)")
        out.append(
            UplinkTensor(
                name, OpRef(i, attr), int(np.prod(shp)) * np.dtype(dt).itemsize, dt, tuple(int(v) for v in shp), pos
            )
        )
    return tuple(out)
