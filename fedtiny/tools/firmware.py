"""``fedtiny device firmware``: a scenario's client as C source for the Cortex-M firmware (device/firmware).

The firmware trains one partition of one scenario. Everything it must agree on with the server is
computed here, from the same code the simulator runs, and written as C:

- the model as the server starts it (:func:`fedtiny.server_setup.server_task`: the model file, the
  scheme the server sends this partition's device profile, the learning rate), laid out as the C
  step's ``ft_op`` array by :class:`~fedtiny.int8.cstep.CStep` itself; frozen tensors ``const`` (flash),
  trained weights and biases and the momentum buffers in RAM;
- the memory planner's arena plans (:mod:`fedtiny.budget.arena`) for a step of one sample and of more;
- the downlink layout (where each dense tensor of a TRAIN frame goes, or the CRC-32 a frozen one must
  have) and the uplink (the dense trained tensors, in order);
- the partition's training samples, quantized to int8 as the simulated client quantizes them (a few
  hundred 8x8 images, or 16 of MCUNet's 3x128x128: compiled in, so the device needs no enrolment
  exchange and the samples are the simulator's by construction).
"""

from __future__ import annotations

import ctypes
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtiny.int8.optimizers import optimizer_kind, optimizer_names

__all__ = ["generate"]

_CTYPE = {np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t", np.dtype(np.int32): "int32_t",
          np.dtype(np.uint32): "uint32_t", np.dtype(np.float32): "float"}
_MUTABLE = {"weight": "train_w", "bias": "train_b", "mom_w": None, "mom_b": None}


# scenario keys the device checks in each TRAIN against the values it was built with
_SETTINGS = [("train", "lr"), ("train", "momentum"), ("train", "batch_size"), ("train", "local_epochs"),
             ("train", "optimizer"), ("train", "weight_rounding"), ("train", "shuffle"), ("train", "gradients"),
             ("compression", "uplink"), ("compression", "density"), ("compression", "values"),
             ("compression", "topk"), ("compression", "error_feedback"), ("compression", "residual")]


def _sets(overrides: dict | None) -> str:
    return "".join(f" --set {k}={v}" for k, v in (overrides or {}).items()).replace("*/", "* /")


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(v, dtype: np.dtype) -> str:
    if dtype == np.float32:
        f = float(np.float32(v))
        return f"{f.hex()}f" if np.isfinite(f) else "0.0f"
    return str(int(v))


def _array(name: str, a: np.ndarray, const: bool, per_line: int = 16) -> str:
    dtype = a.dtype
    flat = a.ravel()
    body = ",\n    ".join(", ".join(_literal(v, dtype) for v in flat[i:i + per_line])
                          for i in range(0, len(flat), per_line))
    return f"static {'const ' if const else ''}{_CTYPE[dtype]} {name}[{max(len(flat), 1)}] = {{\n    {body or '0'}\n}};\n"


@dataclass
class BridgedClient:
    """A scenario's client as the server sees it when a device trains it: the task, the scheme the server
    resolved for its profile, the client's task and the server's starting model as the full downlink."""

    task: Any
    scheme: Any
    client: Any
    downlink: bytes
    partition: int

    def train_meta(self, server_round: int) -> dict:
        """The TRAIN message's metadata for a round (the scenario, the scheme, the round's seed)."""
        from fedtiny.federated.train import round_seed

        return {"round": server_round, "scenario": self.task.scenario.to_json(), "scheme": self.scheme.to_json(),
                "downlink": "full", "seed": round_seed(self.task.scenario.run.seed, server_round, self.partition)}

    def model_hash(self) -> str:
        from fedtiny.bridge.protocol import model_hash

        return model_hash(self.client.downlink_spec)


def bridged_client(scenario_path: str, partition_id: int, overrides: dict | None = None) -> BridgedClient:
    """:class:`BridgedClient` of ``partition_id`` (the server's start-up with its one intra-op thread, as
    server/server_app.py runs it)."""
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task
    from fedtiny.server_setup import server_task
    from fedtiny.federated.task import client_profile, limit_threads
    from fedtiny.scenario import load_scenario

    limit_threads()
    task, initial, _, schemes = server_task(load_scenario(scenario_path, overrides), progress=None)
    scheme = schemes.by_profile[client_profile(task.scenario, partition_id).name]
    client = client_task(task.scenario, scheme)
    down = pack_dense({n: initial[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    return BridgedClient(task, scheme, client, down, partition_id)


def generate(scenario_path: str, partition_id: int, out_dir: str | Path, progress=None,
             overrides: dict | None = None) -> dict:
    """Write ``firmware_model.c``, ``firmware_model.h``, ``firmware_memory.ld`` and ``firmware.mk`` into
    ``out_dir``; return a summary. A client that does not fit its profile (the whole device,
    :mod:`fedtiny.budget.device_memory`) is refused here, with the figure, before anything is built."""
    import torch

    from fedtiny.budget.arena import lay_out
    from fedtiny.budget.device_memory import FRAME_BYTES, TEXT_BYTES, encoded_bound
    from fedtiny.budget.memory import c_layout, memory_report
    from fedtiny.bridge.protocol import model_hash
    from fedtiny.devices import compute_cycles, get_profile
    from fedtiny.errors import ScenarioError
    from fedtiny.federated.client import client_task
    from fedtiny.server_setup import server_task
    from fedtiny.federated.task import client_profile, limit_threads
    from fedtiny.int8.cstep import CStep, CKind
    from fedtiny.models.state import load_arrays, model_arrays
    from fedtiny.scenario import load_scenario

    say = progress or (lambda _: None)
    scenario = load_scenario(scenario_path, overrides)
    t = scenario.train
    problems = []
    if scenario.model.precision != "int8" or t.gradients != "exact":
        problems.append("model.precision = \"int8\" and train.gradients = \"exact\"")
    if t.shuffle != "hash":
        problems.append("train.shuffle = \"hash\" (the order a device can compute)")
    cmp = scenario.compression
    if cmp.downlink != "full":
        problems.append("compression.downlink = \"full\" (the whole model each round)")
    if cmp.uplink == "sparse" and (cmp.values != "int8" or cmp.topk != "tensor" or cmp.momentum_correction
                                   or cmp.warmup_rounds):
        problems.append("a sparse uplink with values = \"int8\", topk = \"tensor\", no momentum_correction "
                        "and warmup_rounds = 0")
    if scenario.device.micro_batch != 1:
        problems.append("device.micro_batch = 1 (the C step trains one sample at a time)")
    if not optimizer_kind(t.optimizer).exact or scenario.privacy.dp != "none" or t.batch_size > 64:
        exact = ", ".join(n for n in optimizer_names() if optimizer_kind(n).exact)
        problems.append(f"train.optimizer one of {exact}, privacy.dp = \"none\", train.batch_size <= 64")
    if not 0 <= partition_id < scenario.run.clients:
        problems.append(f"a partition in 0..{scenario.run.clients - 1} (got {partition_id})")
    if problems:
        raise ScenarioError(f"{scenario_path}: the firmware needs " + "; ".join(problems))
    say("the server's starting point (model, scheme, learning rate)")
    # with the server's one intra-op thread (server/server_app.py): a cloud step's new head, fitted in
    # float, differs in its last bits with the thread count, and its frozen scales must be the server's
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
    model, lr = client.model, task.scenario.train.lr
    train, _ = client.federation.client_data(partition_id)
    shape = tuple(train.x.shape[1:])
    model.input_shape = shape
    report = memory_report(model, scheme, shape, device=profile, optimizer=t.optimizer, momentum=t.momentum,
                           accumulate=t.batch_size > 1)
    if len(train) >= 1 << 16:  # main.c's sample order is uint16_t
        raise ScenarioError(f"{scenario_path}: partition {partition_id} holds {len(train)} training samples; the "
                            f"firmware's sample order takes fewer than 65,536 (fewer data.max_samples or more clients)")
    whole = client.device_memory(profile, len(train))
    if not whole.fits:
        raise ScenarioError(f"{scenario_path}: partition {partition_id}'s client {whole.reason()}; its parts: "
                            + ", ".join(f"{k} {v:,} B" for k, v in whole.ram.items() if v)
                            + " (see fedtiny memory; docs/guide/memory.md)")
    # what TRAIN's scenario must say for this image to train it (checked on the device, text for text)
    sections = task.scenario.to_dict()
    settings = [(f"{sec}.{key}", json.dumps(sections[sec][key])) for sec, key in _SETTINGS]
    say("the C step's layout and arena plans")
    cs = CStep(model, lr=lr, momentum=t.momentum, optimizer=t.optimizer, rounding=t.weight_rounding,
               layout=c_layout(model, shape))
    one = lay_out(cs.record(1))
    many = lay_out(cs.record(2)) if t.batch_size > 1 else one  # every step of 2+ samples takes the same buffers
    arena_bytes = max(one.arena_bytes, many.arena_bytes)

    arrays: dict[int, tuple[str, np.ndarray]] = {a.ctypes.data: (f"a{i}", a) for i, a in enumerate(cs.keep)}
    out, ops = [], []
    for i, op in enumerate(cs.ops):
        fields = []
        for f, ftype in type(op)._fields_:
            v = getattr(op, f)
            if ftype is ctypes.c_void_p:
                if not v:
                    continue
                name, a = arrays[v]
                gate = _MUTABLE.get(f, "const")
                const = gate == "const" or (gate is not None and not getattr(op, gate))
                out.append(_array(f"op{i}_{f}", a, const))
                ctype = _CTYPE[a.dtype]
                fields.append(f".{f} = ({ctype} *)op{i}_{f}")
            elif ftype is ctypes.c_float:
                fields.append(f".{f} = {_literal(v, np.dtype(np.float32))}")
            elif v:
                fields.append(f".{f} = {int(v)}")
        ops.append("    {" + ", ".join(fields) + "}")
    m = cs.m
    out.append(_array("plan_one", np.asarray(one.offsets, np.uint32), True))
    out.append(_array("plan_many", np.asarray(many.offsets, np.uint32), True))

    # the downlink: where each tensor of a full dense model goes, or the CRC its bytes must have
    received = model_arrays(model, [n for n, *_ in client.downlink_spec])
    trained = {n for n, *_ in client.uplink_spec}
    where = {}
    for i, op in enumerate(cs.ops):
        if op.kind == CKind.CONV:
            conv = next(c for c, w, _ in cs.params if w.ctypes.data == op.weight)
            where[f"{conv.tag}.weight"] = f"op{i}_weight" if op.train_w else None
            where[f"{conv.tag}.bias"] = f"op{i}_bias" if op.train_b else None
    down, offset = [], 0
    for name, shp, dt in client.downlink_spec:
        data = np.ascontiguousarray(received[name]).astype(np.dtype(dt).newbyteorder("<")).tobytes()
        dest = where.get(name)
        down.append(f"    {{{offset}u, {len(data)}u, {f'(void *){dest}' if dest else '0'}, 0x{zlib.crc32(data):08x}u}}"
                    f"  /* {name} */")
        offset += len(data)
    up, up_bytes, sparse, k_max, ndim_max = [], 0, [], 1, 1
    for tid, (name, shp, dt) in enumerate(client.uplink_spec):
        conv_tag, _, attr = name.rpartition(".")
        i = next(i for i, op in enumerate(cs.ops) if op.kind == CKind.CONV and
                 next(c for c, w, _ in cs.params if w.ctypes.data == op.weight).tag == conv_tag)
        n = int(np.prod(shp)) * np.dtype(dt).itemsize
        up.append(f"    {{(const void *)op{i}_{attr}, {n}u}}  /* {name} */")
        up_bytes += n
        if name not in trained:
            raise ScenarioError(f"uplink tensor {name} is not trained")
        # the sparse uplink: the change at the scheme's trainable positions (fedtiny.compress.sparsify)
        pos = np.asarray(client.slices[name], np.uint32)
        if np.any(np.diff(pos.astype(np.int64)) <= 0):
            raise ScenarioError(f"uplink tensor {name}: trainable positions are not increasing")
        out.append(_array(f"slice{tid}_pos", pos, True))
        rtype = ("double" if cmp.residual == "float64" else "int16_t" if dt == "int8" else "float")
        out.append(f"static {'int32_t' if dt == 'int32' else 'int8_t'} slice{tid}_before[{max(len(pos), 1)}];\n"
                   + (f"static {rtype} slice{tid}_residual[{max(len(pos), 1)}];\n" if cmp.error_feedback else ""))
        k_max = max(k_max, min(len(pos), math.ceil(cmp.density * len(pos))))
        ndim_max = max(ndim_max, len(shp))
        dims = ", ".join(str(int(v)) for v in shp)
        sparse.append(f"    {{(const void *)op{i}_{attr}, {int(dt == 'int32')}, {tid}u, {len(shp)}, {{{dims}}}, "
                      f"{len(pos)}u, slice{tid}_pos, slice{tid}_before, "
                      f"{f'slice{tid}_residual' if cmp.error_feedback else '0'}}}  /* {name} */")
        if len(pos) >= 1 << 16:
            raise ScenarioError(f"uplink tensor {name}: {len(pos)} trainable positions (the firmware ranks < 65536)")

    with torch.no_grad():
        xq = model.quantize_input(torch.from_numpy(train.x)).numpy().astype(np.int8).reshape(len(train), -1)
    out.append(_array("samples_x", xq, True))
    out.append(_array("samples_y", train.y.astype(np.uint8), True))

    hash_ = model_hash(client.downlink_spec)
    h = f"""/* Generated by `fedtiny device firmware {scenario_path} --partition {partition_id}{_sets(overrides)}`: do not edit. */
#ifndef FIRMWARE_MODEL_H
#define FIRMWARE_MODEL_H
#include <stddef.h>
#include <stdint.h>
#include "fedtiny_step.h"

#define FW_MODEL_HASH "{hash_}"
#define FW_PROFILE "{profile.name}"
#define FW_PARTITION {partition_id}
#define FW_SAMPLES {len(train)}
#define FW_SAMPLE_BYTES {xq.shape[1]}
#define FW_BATCH {t.batch_size}
#define FW_EPOCHS {t.local_epochs}
#define FW_ARENA_BYTES {arena_bytes}
#define FW_N_OPS {m.n_ops}
#define FW_DOWNLINK_BYTES {offset}
#define FW_UPLINK_BYTES {up_bytes}
#define FW_DOWNLINK_TENSORS {len(down)}
#define FW_UPLINK_TENSORS {len(up)}
#define FW_UPLINK_SPARSE {int(cmp.uplink == "sparse")}
#define FW_DENSITY {float(cmp.density).hex()} /* top-k density (a double, bit for bit the scenario's) */
#define FW_ERROR_FEEDBACK {int(cmp.error_feedback)}
#define FW_K_MAX {k_max} /* elements one tensor of a sparse update sends at most */
#define FW_ENC_BYTES {encoded_bound(ndim_max, k_max)} /* one tensor's encoding, at most */
#define FW_RESIDUAL_COMPACT {int(cmp.residual == "compact")}
#define FW_FRAME_BYTES {FRAME_BYTES}
#define FW_TEXT_BYTES {TEXT_BYTES}
#define FW_SETTINGS {len(settings)}
/* fedtiny.budget.device_memory: what the simulator counts for this client (RAM and flash) and its profile */
#define FW_DEVICE_RAM_BYTES {whole.device_ram_bytes}
#define FW_DEVICE_FLASH_BYTES {whole.device_flash_bytes}
#define FW_PROFILE_SRAM_BYTES {profile.sram_bytes}
#define FW_PLANNER_PEAK_BYTES {report.peak_sram_bytes}
#define FW_MACS_FORWARD {report.macs_forward}
#define FW_MACS_BACKWARD {report.macs_backward}

typedef struct {{ uint32_t offset, bytes; void *dest; uint32_t crc; }} fw_tensor; /* dest 0: frozen, check crc */
typedef struct {{ const void *src; uint32_t bytes; }} fw_upload;
/* an uplink tensor's trainable positions, their values when the round's model arrived, and the
 * error-feedback residual there (kept across rounds) */
typedef struct {{ const void *data; uint8_t is_int32; uint32_t id; uint8_t ndim; uint32_t dims[8]; uint32_t n;
                 const uint32_t *pos; void *before; void *residual; }} fw_slice;
typedef struct {{ const char *path, *json; }} fw_setting; /* a scenario key TRAIN must carry with this value */

extern ft_model fw_model;
extern const uint32_t *const fw_plan_one, *const fw_plan_many;
extern const int32_t fw_plan_one_len, fw_plan_many_len;
extern const fw_tensor fw_downlink[FW_DOWNLINK_TENSORS];
extern const fw_upload fw_uplink[FW_UPLINK_TENSORS];
extern const fw_slice fw_slices[FW_UPLINK_TENSORS];
extern const fw_setting fw_settings[FW_SETTINGS];
extern const int8_t *const fw_samples_x;
extern const uint8_t *const fw_samples_y;
extern uint8_t fw_arena[FW_ARENA_BYTES];
#endif
"""
    c = f"""/* Generated by `fedtiny device firmware {scenario_path} --partition {partition_id}{_sets(overrides)}`: do not edit.
 * Model {hash_}, scheme {scheme.name}, profile {profile.name}, lr {lr!r}, momentum {t.momentum}. */
#include "firmware_model.h"

{''.join(out)}
static const ft_op ops[{len(ops)}] = {{ /* flash: the step never writes its op table */
{(',' + chr(10)).join(ops)}
}};

ft_model fw_model = {{.n_ops = {m.n_ops}, .ops = (ft_op *)ops, .in_c = {m.in_c}, .in_h = {m.in_h}, .in_w = {m.in_w},
    .classes = {m.classes}, .logit_scale = {_literal(m.logit_scale, np.dtype(np.float32))},
    .sm_mult = {m.sm_mult}, .sm_shift = {m.sm_shift}, .sm_diff_min = {m.sm_diff_min},
    .lr = {_literal(m.lr, np.dtype(np.float32))}, .momentum = {_literal(m.momentum, np.dtype(np.float32))},
    .stochastic = {m.stochastic}}};

const uint32_t *const fw_plan_one = plan_one, *const fw_plan_many = plan_many;
const int32_t fw_plan_one_len = {len(one.offsets)}, fw_plan_many_len = {len(many.offsets)};
const fw_tensor fw_downlink[FW_DOWNLINK_TENSORS] = {{
{(',' + chr(10)).join(down)}
}};
const fw_upload fw_uplink[FW_UPLINK_TENSORS] = {{
{(',' + chr(10)).join(up)}
}};
const fw_slice fw_slices[FW_UPLINK_TENSORS] = {{
{(',' + chr(10)).join(sparse)}
}};
const fw_setting fw_settings[FW_SETTINGS] = {{
{(',' + chr(10)).join(f'    {{"{k}", {_c_string(v)}}}' for k, v in settings)}
}};
const int8_t *const fw_samples_x = (const int8_t *)samples_x;
const uint8_t *const fw_samples_y = samples_y;
uint8_t fw_arena[FW_ARENA_BYTES] __attribute__((aligned(8)));
"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "firmware_model.h").write_text(h)
    (out_dir / "firmware_model.c").write_text(c)
    # the board's link script includes this: the image must link within the profile's memory
    (out_dir / "firmware_memory.ld").write_text(
        f"/* Generated for profile {profile.name}: the device this client is. */\n"
        f"FW_RAM_BYTES = {profile.sram_bytes};\nFW_FLASH_BYTES = {profile.flash_bytes};\n"
        f"FW_STACK_BYTES = {whole.ram['stack']};\n")
    # the C step's stack tables sized to this model (fedtiny_step.c), the first-fit allocator unused (plans),
    # and the kernels device.kernels names (optimized: the DSP build; reference: the portable loops)
    (out_dir / "firmware.mk").write_text(
        f"FW_CFLAGS := -DFT_MAX_TENSORS={m.n_ops + 1} -DFT_MAX_CLASSES={m.classes} -DFT_MAX_BLOCKS=8\n"
        f"FW_KERNELS := {'dsp' if scenario.device.kernels == 'optimized' else 'portable'}\n")
    summary = {"scenario": str(scenario_path), "overrides": {k: str(v) for k, v in (overrides or {}).items()},
               "model_hash": hash_, "scheme": scheme.name, "profile": profile.name, "partition": partition_id,
               "samples": len(train), "batch_size": t.batch_size, "arena_bytes": arena_bytes,
               "planner_peak_bytes": report.peak_sram_bytes, "planner_arena_bytes": report.arena_bytes,
               "downlink_bytes": offset, "uplink": cmp.uplink, "dense_uplink_bytes": up_bytes, "lr": lr,
               "macs_forward_per_sample": report.macs_forward, "macs_backward_per_sample": report.macs_backward,
               "clock_mhz": profile.clock_mhz, "kernels": scenario.device.kernels,
               "cycles_per_sample": round(compute_cycles(profile, report.work, 1, 0)),
               "update_cycles_per_step": round(compute_cycles(profile, report.work, 0, 1)),
               "published_cycles_per_sample": round(compute_cycles(get_profile(profile.name), report.work)),
               "published_cycles_per_mac": get_profile(profile.name).cycles_per_mac,
               "backward_factor": profile.backward_factor, "device_ram_bytes": whole.device_ram_bytes,
               "device_flash_bytes": whole.device_flash_bytes, "device_ram": whole.ram, "device_flash": whole.flash,
               "profile_sram_bytes": profile.sram_bytes, "profile_flash_bytes": profile.flash_bytes,
               "stack_reserved_bytes": whole.ram["stack"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    # the C step's ops, for attributing a measurement build's profile (scripts/firmware_profile.py)
    (out_dir / "ops.json").write_text(json.dumps(cs.op_geometry(), indent=1))
    return summary
