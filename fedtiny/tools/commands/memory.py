"""``fedtiny memory``: one training step's peak SRAM and the whole device's RAM and flash across a round, of a
model under a scheme or of each client of a scenario."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from fedtiny.budget.device_memory import ClientLoad, DeviceMemory, client_memory, step_arena
from fedtiny.budget.memory import memory_report
from fedtiny.budget.schemes import parse_scheme, resolve
from fedtiny.devices import DeviceProfile, get_profile
from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.federated.client import client_task
from fedtiny.federated.task import client_profile
from fedtiny.int8.convert import ptq
from fedtiny.int8.graph import QModel, replace_head
from fedtiny.int8.modelfile import read_model
from fedtiny.models import build_model
from fedtiny.progress import say
from fedtiny.report.plots import plot_memory
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.server_setup import server_task
from fedtiny.tools.commands.output import table

__all__ = ["cmd_memory"]


def cmd_memory(args: argparse.Namespace) -> int:
    if args.scenario:
        return _memory_of_scenario(args)
    if not args.model:
        raise ScenarioError("fedtiny memory: give --model (with --scheme, --device ...) or --scenario FILE")

    model, shape = _load_memory_model(args.model, args.num_classes, args.classifier_precision)
    if args.input_size:
        shape = (shape[0], args.input_size, args.input_size)
    device = get_profile(args.device) if args.device else None
    report = memory_report(
        model,
        resolve(parse_scheme(args.scheme), model),
        shape,
        device=device,
        accounting=args.accounting,
        optimizer=args.optimizer,
        momentum=args.momentum,
        reorder=args.reorder,
        inplace_depthwise=args.inplace,
        fuse_frozen=args.fuse,
        batch=args.batch_size,
        accumulate=args.accumulate,
    )
    whole = _device_memory(args, model, shape, device)
    if args.plot:
        plot_memory(report, args.plot)
    if args.json:
        print(
            json.dumps(
                {
                    **report.to_dict(),
                    "device_ram_bytes": whole.device_ram_bytes,
                    "device_flash_bytes": whole.device_flash_bytes,
                    "device_ram": whole.ram,
                    "device_flash": whole.flash,
                    "device_fits": whole.fits,
                    "device_reason": whole.reason(),
                },
                sort_keys=True,
            )
        )
    else:
        print(
            table(
                [
                    ("model", args.model),
                    ("scheme", report.scheme),
                    ("accounting", report.accounting),
                    ("input", "x".join(map(str, shape))),
                    ("peak SRAM (bytes)", report.peak_sram_bytes),
                    ("peak at", report.peak_at),
                    ("arena (all but persistent and input)", report.arena_bytes),
                    ("saved for backward", report.saved_for_backward_bytes),
                    ("persistent (params+optimizer)", report.persistent_bytes),
                    ("flash (bytes)", report.flash_bytes),
                    *[(f"  {k}", v) for k, v in report.breakdown.items()],
                    ("verdict (one step)", report.reason()),
                    ("device RAM of a round (bytes)", whole.device_ram_bytes),
                    *[(f"  {k}", v) for k, v in whole.ram.items()],
                    ("device flash (bytes)", whole.device_flash_bytes),
                    ("verdict (whole device)", whole.reason()),
                ]
            )
        )
    verdict = whole if args.fit == "device" else report
    if verdict.fits is False:
        print(f"fedtiny: {verdict.reason()}", file=sys.stderr)
        return 3
    return 0


def _load_memory_model(spec: str, num_classes: int | None, classifier_precision: str) -> tuple[QModel, tuple]:
    """A built-in model name, a fedtiny model file, or a tiny-training .pkl -> (QModel, input shape)."""
    path = Path(spec)
    if spec == "tiny-ir":
        model = ptq(
            build_model("tiny-ir", 1, num_classes or 10, image_size=8),
            np.zeros((1, 1, 8, 8), np.float32),
            classifier_precision=classifier_precision,
        )
        return model, (1, 8, 8)
    if not path.is_file():
        raise ModelFileError(f"--model: {spec!r} is neither a built-in model (tiny-ir) nor a model file")
    model = read_model(path)
    if num_classes is not None or classifier_precision == "fp32":
        replace_head(model, num_classes or int(model.classifier.weight.shape[0]), precision=classifier_precision)
    return model, model.input_shape or (model.input_channels, 128, 128)


def _device_memory(args: argparse.Namespace, model: QModel, shape: tuple, device: DeviceProfile | None) -> DeviceMemory:
    """The whole client's memory across a round (fedtiny.budget.device_memory) for ``fedtiny memory``; the
    model carries its scheme (memory_report applied it)."""
    if args.fit == "device" and args.accounting != "planner":
        raise ScenarioError("--fit device counts the planner's step: use --accounting planner or --fit step")
    train_batch = args.train_batch or args.batch_size
    if train_batch < args.batch_size:
        raise ScenarioError(f"--train-batch {train_batch}: at least --batch-size ({args.batch_size})")
    load = ClientLoad(
        train_batch,
        args.batch_size,
        args.samples,
        math.prod(shape),
        args.uplink,
        args.density,
        args.residual != "none",
        args.residual if args.residual != "none" else "float64",
    )
    arena = step_arena(
        model,
        shape,
        load,
        optimizer=args.optimizer,
        momentum=args.momentum,
        reorder=args.reorder,
        inplace_depthwise=args.inplace,
        fuse_frozen=args.fuse,
    )
    return client_memory(model, arena, load, optimizer=args.optimizer, momentum=args.momentum, profile=device)


def _memory_of_scenario(args: argparse.Namespace) -> int:
    """``fedtiny memory --scenario S``: each method's clients, one step and the whole device, and who refuses."""
    scenario = load_scenario(args.scenario, parse_overrides(args.overrides))
    rows, out = [], []
    for name, sc in scenario.expand():
        if args.method and name not in args.method:
            continue
        if scenario.methods:
            say(f"method {name}: the server's start (model, scheme per device)")
        task, _, _, schemes = server_task(sc, progress=None)
        if task.scenario.model.precision != "int8":
            out.append({"method": name, "precision": "fp32", "note": "an fp32 model is not counted"})
            continue
        per: dict[str, dict] = {}
        for pid in range(task.scenario.run.clients):
            profile = client_profile(task.scenario, pid)
            client = client_task(task.scenario, schemes.by_profile[profile.name])
            samples = len(client.federation.client_data(pid)[0])
            step, whole = client.memory(profile), client.device_memory(profile, samples)
            row = per.setdefault(
                profile.name,
                {
                    "method": name,
                    "profile": profile.name,
                    "scheme": schemes.by_profile[profile.name].name,
                    "clients": 0,
                    "sram_bytes": profile.sram_bytes,
                    "peak_sram_bytes": step.peak_sram_bytes,
                    "device_ram_bytes": 0,
                    "device_ram": whole.ram,
                    "device_flash_bytes": whole.device_flash_bytes,
                    "refused_by_step": 0,
                    "refused_by_device": 0,
                },
            )
            row["clients"] += 1
            if whole.device_ram_bytes > row["device_ram_bytes"]:
                row["device_ram_bytes"], row["device_ram"] = whole.device_ram_bytes, whole.ram
            row["refused_by_step"] += not step.fits
            row["refused_by_device"] += not whole.fits
        for row in per.values():
            row["refused"] = row["refused_by_device" if task.scenario.device.fit == "device" else "refused_by_step"]
            out.append(row)
            rows.append(
                (
                    f"{row['method']} / {row['profile']}",
                    f"{row['scheme']}: step {row['peak_sram_bytes']:,} B, "
                    f"device {row['device_ram_bytes']:,} B of {row['sram_bytes']:,} B; refused "
                    f"{row['refused_by_step']}/{row['clients']} by the step, {row['refused_by_device']}/"
                    f"{row['clients']} by the device",
                )
            )
    if args.json:
        print(json.dumps({"scenario": str(args.scenario), "fit": scenario.device.fit, "methods": out}, sort_keys=True))
    else:
        print(table(rows or [("scenario", "no method matched --method")]))
    return 0
