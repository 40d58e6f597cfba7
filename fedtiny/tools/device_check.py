"""``fedtiny device check``: the device's C step against the simulator's exact step, on the same data."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from fedtiny.budget.arena import lay_out
from fedtiny.budget.memory import c_layout, memory_report
from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
from fedtiny.data.sources import load_source
from fedtiny.devices import get_profile
from fedtiny.errors import ModelFileError
from fedtiny.federated.task import limit_threads
from fedtiny.federated.train import _exact_loss
from fedtiny.int8 import exact
from fedtiny.int8.cstep import CStep
from fedtiny.int8.graph import QConv, replace_head
from fedtiny.int8.modelfile import read_model
from fedtiny.int8.optim import QuantizedOptimizer

__all__ = ["device_check", "TINY_IR_FILE"]

# tiny-ir as the quickstart trains it: its shipped cloud model (a calibrated int8 network)
TINY_IR_FILE = Path(__file__).resolve().parents[2] / "scenarios" / "models" / "quickstart-cloud.safetensors"


def device_check(
    model_spec: str,
    scheme_text: str,
    device: str,
    steps: int = 3,
    batch: int = 16,
    lr: float = 1e-3,
    momentum: float = 0.0,
    seed: int = 0,
    progress=None,
) -> dict:
    """Run ``steps`` exact steps with PyTorch and with the C step from the same model, on the same images.

    Returns ``forward_mismatches`` (int8 logits that differ before each step), ``param_mismatches``
    (weight and bias elements that differ after each step, summed), ``arena_peak_bytes`` (the C step's
    high-water mark), ``planner_peak_bytes`` (fedtiny's memory planner for the same step: one sample at
    a time, with gradient accumulators when ``batch`` > 1), ``planner_arena_bytes`` (the part of it an
    arena holds: all but the trained parameters, the optimizer state and the input sample, which the
    C step keeps outside its arena), ``arena_vs_planner``, ``c_step_ms`` and ``torch_step_ms`` (mean per
    step, one thread).
    """
    limit_threads()
    say = progress or (lambda _: None)
    path = TINY_IR_FILE if model_spec == "tiny-ir" else Path(model_spec)
    try:
        q = read_model(path)
    except ModelFileError as exc:
        raise ModelFileError(f"--model: {exc}") from None
    c, h, w = q.input_shape or (q.input_channels, 128, 128)
    data = load_source("digits", image_size=h, image_width=w, channels=c)
    if not isinstance(q.classifier, QConv) or q.classifier.out_channels != data.num_classes:
        q = replace_head(q, data.num_classes, seed=seed)
    q.input_shape = (c, h, w)
    profile = get_profile(device)
    if scheme_text == "last-k:fit":  # the most last layers whose step (one sample, as scenarios train) fits the device
        k = next(
            (
                k
                for k in range(len(q.convs()), -1, -1)
                if memory_report(q, resolve(parse_scheme(f"last-k:{k}"), q), (c, h, w), device=profile).fits
            ),
            0,
        )
        scheme_text = f"last-k:{k}"
    resolved = resolve(parse_scheme(scheme_text), q)
    apply_scheme(q, resolved)
    # one sample at a time, as the C step; more than one per step sums parameter gradients in accumulators
    planner = memory_report(q, resolved, (c, h, w), device=profile, momentum=momentum, accumulate=batch > 1)
    qc = copy.deepcopy(q)
    cs = CStep(qc, lr=lr, momentum=momentum, layout=c_layout(q, (c, h, w)))
    arena_plan = lay_out(cs.record(batch))  # the planner places the step's buffers; the C step follows
    cs.use_plan(arena_plan.offsets, batch, arena_plan.arena_bytes)
    opt = QuantizedOptimizer(q, "sgd+qas", lr, momentum)
    q.number_convs()
    loss_fn = _exact_loss(q)
    order = np.random.default_rng(seed).permutation(len(data))
    forward_mismatches = param_mismatches = 0
    c_time = torch_time = 0.0
    for k in range(steps):
        idx = order[k * batch : (k + 1) * batch]
        xb, yb = torch.from_numpy(data.x[idx]), torch.from_numpy(data.y[idx])
        with torch.no_grad():
            xq = q.quantize_input(xb).numpy().astype(np.int8)
            want = q.int8_logits(xb).numpy().astype(np.int8)
        forward_mismatches += int((cs.forward(xq) != want).sum())
        t0 = time.perf_counter()
        opt.zero_grad()
        with exact.step(exact.StepKey(seed, k)):
            loss_fn(q(xb), yb).backward()
            opt.step()
        t1 = time.perf_counter()
        cs.step(xq, yb.numpy(), seed, k)
        t2 = time.perf_counter()
        torch_time, c_time = torch_time + (t1 - t0), c_time + (t2 - t1)
        cs.write_back()
        param_mismatches += sum(int((a.detach() != b.detach()).sum()) for a, b in zip(q.parameters(), qc.parameters()))
        say(f"step {k + 1}/{steps}: forward mismatches {forward_mismatches}, parameter mismatches {param_mismatches}")
    return {
        "model": str(model_spec),
        "scheme": resolved.name,
        "device": profile.name,
        "steps": steps,
        "batch": batch,
        "input": [c, h, w],
        "forward_mismatches": forward_mismatches,
        "param_mismatches": param_mismatches,
        "arena_peak_bytes": cs.high_water,
        "planner_peak_bytes": planner.peak_sram_bytes,
        "planner_arena_bytes": planner.arena_bytes,
        "planned_arena_bytes": arena_plan.arena_bytes,
        "arena_live_peak_bytes": arena_plan.peak_live_bytes,
        "arena_vs_planner": round(cs.high_water / planner.arena_bytes, 4),
        "planner_outside_arena_bytes": planner.peak_sram_bytes - planner.arena_bytes,
        "c_step_ms": round(1000 * c_time / steps, 1),
        "torch_step_ms": round(1000 * torch_time / steps, 1),
    }
